"""The persistent XLA compilation cache for runs started by efficientlm.main.

A compiled program is stored on disk keyed by its HLO, the compile options, the backend and the
jax/XLA versions, so a second run of the same configuration (a resumed run, the second `make
train`) loads its train step instead of compiling it again; a hit is exactly the executable a
compile would give. Where it lives, first match wins:

  --compilation_cache_dir=DIR     that directory; '' turns the cache off for the run
  $JAX_COMPILATION_CACHE_DIR      jax's own variable (the test suite sets it)
  $XDG_CACHE_HOME/efficientlm/jax or ~/.cache/efficientlm/jax

Programs that compile in at least MIN_COMPILE_SECONDS are cached (jax's default, 1 s, misses
the tiny models' train steps on a fast machine); $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
overrides it. Entries are never evicted here: delete the directory to reclaim space.
"""

from __future__ import annotations

import os
import pathlib

import jax

ENV_DIR = 'JAX_COMPILATION_CACHE_DIR'
ENV_MIN_SECONDS = 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'
MIN_COMPILE_SECONDS = 0.1


def default_dir() -> pathlib.Path:
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'efficientlm' / 'jax'


def configure(directory: str | None = None) -> str | None:
  """Turns the cache on in `directory` (None: the environment's or the default, see module
  doc) or off (''). Call before anything compiles. Returns the directory, None when off."""
  if directory == '':
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  current = jax.config.jax_compilation_cache_dir  # jax reads $JAX_COMPILATION_CACHE_DIR itself
  directory = directory or current or os.environ.get(ENV_DIR) or str(default_dir())
  directory = str(pathlib.Path(directory).expanduser())
  jax.config.update('jax_enable_compilation_cache', True)
  if directory != current:
    jax.config.update('jax_compilation_cache_dir', directory)
  if ENV_MIN_SECONDS not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return directory
