"""The persistent compilation cache (efficientlm.compile_cache): where it lives, that a second
process loads what the first compiled (jax's own cache-hit events), and main's flag."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from efficientlm import compile_cache, main

ROOT = pathlib.Path(__file__).parent.parent
# One process: configure the cache as main does, compile one program, print the cache directory
# and how many compiles jax answered from the cache.
SCRIPT = '''
import jax, jax.numpy as jnp
from efficientlm import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == '/jax/compilation_cache/cache_hits' else 0)
directory = compile_cache.configure(None)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8))).block_until_ready()
print(directory, len(hits))
'''


def _run(env) -> tuple[str, int]:
  out = subprocess.run([sys.executable, '-c', SCRIPT], cwd=ROOT, env=env, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[0], int(out[1])


def test_a_second_process_loads_the_first_ones_programs(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV_DIR}
  # The tiny program compiles faster than MIN_COMPILE_SECONDS; the override is respected.
  env.update(XDG_CACHE_HOME=str(tmp_path), JAX_PLATFORMS='cpu',
             **{compile_cache.ENV_MIN_SECONDS: '0'})
  expected = tmp_path / 'efficientlm' / 'jax'
  assert _run(env) == (str(expected), 0)
  assert any(expected.iterdir())
  directory, hits = _run(env)  # the jitted program, and the small ones jnp.ones compiles
  assert directory == str(expected) and hits >= 1


def test_the_minimum_compile_time_and_the_off_switch(monkeypatch, tmp_path):
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_enable_compilation_cache')
  saved = {name: getattr(jax.config, name) for name in names}
  monkeypatch.delenv(compile_cache.ENV_MIN_SECONDS, raising=False)
  try:
    assert compile_cache.configure(str(tmp_path / 'c')) == str(tmp_path / 'c')
    assert jax.config.jax_persistent_cache_min_compile_time_secs == (
        compile_cache.MIN_COMPILE_SECONDS)
    assert compile_cache.configure('') is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


def test_main_configures_the_cache_before_anything_else(monkeypatch):
  seen = []
  monkeypatch.setattr(compile_cache, 'configure', seen.append)
  with pytest.raises(Exception):  # the gin file does not exist: the run stops after the cache
    main.main(['--gin_file=no_such_file.gin', '--compilation_cache_dir='])
  assert seen == ['']
