"""Parsing gin files from configs/ (and user search paths), T5X style.

Model gins define `MODEL`, mesh gins define `PARTITIONER`; run gins (the trainer's) join them
with UPPER_CASE macros. Gin files use `from __gin__ import dynamic_registration`, so plain
functions and dataclasses are configured without decorators.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import gin
from gin import config as gin_lib
from gin import resource_reader

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'


def _lookup_never_raises(exists):
  def safe(path):
    try:
      return exists(path)
    except Exception:  # pylint: disable=broad-except
      return False

  return safe


# gin-config 0.5.0 also tries every gin path as a Python package resource and crashes doing so:
# it calls importlib.util without importing it, and a directory in the working directory named
# like a config folder (say `runs/`) is a namespace package without a file, which it cannot
# handle. Our configs are found through search paths, so a failed package lookup means "not
# there" and the next location is tried.
gin_lib._FILE_READERS[:] = [  # pylint: disable=protected-access
    (reader, _lookup_never_raises(exists) if exists is resource_reader.system_path_file_exists
     else exists) for reader, exists in gin_lib._FILE_READERS]  # pylint: disable=protected-access


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
