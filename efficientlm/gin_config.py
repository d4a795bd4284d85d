"""Parsing gin files from configs/ (and user search paths), T5X style.

Model gins define `MODEL`, mesh gins define `PARTITIONER`; run gins (the trainer's) join them
with UPPER_CASE macros. Gin files use `from __gin__ import dynamic_registration`, so plain
functions and dataclasses are configured without decorators.
"""

from __future__ import annotations

import ast
import difflib
import logging
import pathlib
import re
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import gin
from gin import config as gin_lib
from gin import resource_reader

from efficientlm.errors import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
# The macros that the gin files of the last `parse` define: what a command-line binding may set
# besides the macros the config uses. Gin keeps no record of where a binding came from.
_macros_in_files: frozenset[str] = frozenset()


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
  global _macros_in_files
  gin.clear_config()
  for path in (str(CONFIG_DIR), *search_paths):
    gin.add_config_file_search_path(path)
  # Gin logs an ERROR for every search-path prefix that misses; a real miss still raises.
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
    _macros_in_files = frozenset(_macro_values())
    gin.parse_config(list(bindings))
    if finalize:
      gin.finalize()
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


def _macro_values() -> dict[str, Any]:
  """Macro name -> its bound value (gin stores `NAME = v` as `NAME/gin.macro.value = v`)."""
  config = gin_lib._CONFIG  # pylint: disable=protected-access
  return {scope: params['value'] for (scope, selector), params in config.items()
          if selector == 'gin.macro' and 'value' in params}


def _macro_name(value: Any) -> str | None:
  """NAME for a `%NAME` reference, else None."""
  if (isinstance(value, gin_lib.ConfigurableReference) and value.evaluate
      and value.configurable.wrapped is gin_lib.macro):
    return '/'.join(value.scopes)
  return None


def _resolve(value: Any, macros: dict[str, Any]) -> tuple[str | None, Any]:
  """(the last macro of a %A -> %B -> ... chain, its value), or (None, value) for a literal."""
  name, seen = None, set()
  while _macro_name(value) in macros and _macro_name(value) not in seen:  # A = %B, B = %A ends
    name = _macro_name(value)
    seen.add(name)
    value = macros[name]
  return name, value


def _references(value: Any) -> Iterator[str]:
  """Names of the macros referenced anywhere inside a bound value."""
  if _macro_name(value) is not None:
    yield _macro_name(value)
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      yield from _references(item)
  elif isinstance(value, dict):
    for item in value.items():
      yield from _references(item)


_ASSIGNED_MACRO = re.compile(r'^([A-Z][A-Z0-9_]*)\s*=', re.MULTILINE)


def check_command_line_macros(bindings: Sequence[str]) -> None:
  """Raises ValueError for a binding `NAME = ...` of an UPPER_CASE macro that no gin file of the
  last `parse` defines and nothing in the config references (%NAME): a misspelled macro would
  otherwise be defined, never read, and the run would silently use the gin file's value."""
  known = set(_macros_in_files)
  for params in gin_lib._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      known.update(_references(value))
  problems = []
  for name in dict.fromkeys(_ASSIGNED_MACRO.findall('\n'.join(bindings))):
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = (f'did you mean {" or ".join(close)}?' if close else
              'check its spelling against the macros of the gin files.')
      problems.append(f'--gin.{name}: no loaded gin file defines or uses the macro {name}; '
                      f'{hint}')
  if problems:
    raise ConfigError('\n'.join(problems))


def binding_source(selector: str, parameter: str) -> str | None:
  """The macro that feeds `selector`'s `parameter` in the active gin config and scope: e.g.
  'TRAIN_STEPS' for `optimizers.warmup_cosine_schedule.total_steps = %TRAIN_STEPS`. None when the
  parameter is bound to a literal, unbound, or no gin config is active. For error messages, so
  they can say which macro to change."""
  try:
    configurable = gin_lib._REGISTRY.get_match(selector)  # pylint: disable=protected-access
  except KeyError:  # ambiguous
    return None
  if configurable is None:
    return None
  scopes = gin.current_scope()
  for depth in range(len(scopes), -1, -1):  # gin's precedence: the innermost scope first
    key = ('/'.join(scopes[:depth]), configurable.selector)
    bindings = gin_lib._CONFIG.get(key, {})  # pylint: disable=protected-access
    if parameter in bindings:
      return _resolve(bindings[parameter], _macro_values())[0]
  return None


_SIMPLE_TYPES = (bool, int, float, str, type(None))
_TYPE_NAMES = {bool: 'True or False', int: 'an int', float: 'a float', str: 'a string',
               type(None): 'None'}
_SAMPLE_VALUES = {bool: 'True', int: '1000', float: '0.001', str: '"\'text\'"'}


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
  """The types of an annotation such as `int` or `float | None`; None for one not to judge."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    members = typing.get_args(annotation)
  else:
    members = (annotation,)
  if all(m in _SIMPLE_TYPES for m in members) and members != (type(None),):
    return members
  return None


def _accepts(expected: tuple[type, ...], value: Any) -> bool:
  """isinstance, except that bool is no int and an int is a float."""
  for t in expected:
    if t is bool and isinstance(value, bool):
      return True
    if t is int and isinstance(value, int) and not isinstance(value, bool):
      return True
    if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return True
    if t in (str, type(None)) and isinstance(value, t):
      return True
  return False


def _example(expected: tuple[type, ...], value: Any) -> str:
  """A command-line value of an expected type: `value` converted where that is unambiguous
  ('100' -> 100, 1e6 -> 1000000, 5 -> "'5'"), else a sample."""
  if str in expected:
    return f'"{str(value)!r}"'  # gin strings are quoted, and the shell must keep the quotes
  candidates = [value]
  if isinstance(value, str):
    try:
      candidates.append(ast.literal_eval(value))
    except (ValueError, SyntaxError):
      pass
  candidates += [int(c) for c in list(candidates) if isinstance(c, float) and c.is_integer()]
  for candidate in candidates:
    if not isinstance(candidate, str) and _accepts(expected, candidate):
      return repr(candidate)
  return next(_SAMPLE_VALUES[t] for t in expected if t in _SAMPLE_VALUES)


def _type_hints(fn: Any) -> dict[str, Any]:
  """The parameter annotations of a function or class, as types; {} if they do not resolve
  (names imported only for type checking), so such a configurable goes unchecked."""
  try:
    return typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
  except Exception:  # pylint: disable=broad-except
    return {}


def check_binding_types() -> None:
  """Raises one ValueError listing every binding whose value (a macro's value, for `%MACRO`) does
  not match its parameter's annotation, when that annotation is int, float, str, bool or a union
  of them and None. References to configurables (@f, @f()) and other annotations are not judged.
  Run after `parse`, so that a wrong type names the macro instead of failing deep in the run."""
  macros = _macro_values()
  # (macro or parameter, repr of the value, expected types) -> (value, parameters bound to it)
  problems: dict[tuple[str, str, tuple[type, ...]], tuple[Any, list[str]]] = {}
  for (scope, selector), params in gin_lib._CONFIG.items():  # pylint: disable=protected-access
    configurable = gin_lib._REGISTRY.get(selector)  # pylint: disable=protected-access
    if selector == 'gin.macro' or configurable is None:
      continue
    hints = _type_hints(configurable.wrapped)
    for parameter, bound in params.items():
      expected = _simple_types(hints.get(parameter))
      macro_name, value = _resolve(bound, macros)
      if (expected is None or isinstance(value, gin_lib.ConfigurableReference)
          or _accepts(expected, value)):
        continue
      name = ('/'.join(filter(None, [scope, '.'.join(selector.split('.')[-2:])]))
              + f'.{parameter}')
      key = (macro_name or name, repr(value), expected)
      problems.setdefault(key, (value, []))[1].append(name)
  lines = []
  for (source, shown, expected), (value, names) in problems.items():
    wanted = ' or '.join(_TYPE_NAMES[t] for t in expected)
    fix = f'e.g. --gin.{source}={_example(expected, value)}'
    if names == [source]:  # bound to a literal, not through a macro
      lines.append(f'{source} = {shown}, but it expects {wanted}: {fix}')
    else:
      lines.append(f'{source} = {shown} is bound to {" and ".join(names)}, which '
                   f'expect{"s" if len(names) == 1 else ""} {wanted}: {fix}')
  if lines:
    raise ConfigError('\n'.join(lines))
