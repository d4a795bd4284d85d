"""Parsing gin files from configs/ (and user search paths), T5X style.

Model gins define `MODEL`, mesh gins define `PARTITIONER`; run gins (the trainer's) join them
with UPPER_CASE macros. Gin files use `from __gin__ import dynamic_registration`, so plain
functions and dataclasses are configured without decorators.
"""

from __future__ import annotations

# gin-config 0.5.0's resource_reader calls importlib.util without importing it; without this
# every lookup through a search path fails with AttributeError.
import importlib.util  # pylint: disable=unused-import
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import gin

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def parse(gin_files: Sequence[str], bindings: Sequence[str] = (),
          search_paths: Sequence[str] = (), finalize: bool = True) -> None:
  """Clears gin, then parses `gin_files` (searched in configs/ and `search_paths`) and bindings."""
  gin.clear_config()
  for path in (str(CONFIG_DIR), *search_paths):
    gin.add_config_file_search_path(path)
  # Gin logs an ERROR for every search-path prefix that misses; a real miss still raises.
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings), finalize_config=finalize)
  finally:
    logging.disable(previous)


def macro(name: str) -> Any:
  """The value of a macro; a configurable reference (`@f()`) is called."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError as e:
    raise ValueError(f'Gin macro {name} is not defined; bind it in a gin file or with '
                     f'--gin.{name}=...') from e
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn()
  return value


def shipped_gin_files() -> list[pathlib.Path]:
  return sorted(CONFIG_DIR.rglob('*.gin'))
