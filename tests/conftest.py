"""Test setup: 8 emulated CPU devices, set before JAX is imported anywhere."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Backend optimization level 0 (no LLVM optimization of the generated code; a later flag in
# XLA_FLAGS overrides it): the suite compiles some ten thousand tiny programs (tests run models
# op by op, and kernel tests compile interpret-mode kernels), and compiling is 85% of its time.
# At level 0 that time halves; the tiny programs run hardly slower and compute the same values
# up to float rounding (the HLO passes, so fusion and collectives, are unchanged).
os.environ['XLA_FLAGS'] = ' '.join(
    ['--xla_backend_optimization_level=0', os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8']).strip()
# The suite checks sharding on 8 devices; on a GPU machine keep it on the emulated CPUs.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session, shared by the pytest-xdist workers and the
# training runs tests start as subprocesses (they inherit the environment): many compile the
# same tiny train steps. Entries are keyed by the program, the flags and the jax/XLA version, so
# a hit is the executable a compile would give. Made by the process that loads this file first
# (pytest's main process), removed when that process exits; a fresh one per run.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='efficientlm-test-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # Cache every program, not only those that take a second or more to compile (most take less
  # at optimization level 0, and there are thousands).
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Test modules import TensorFlow, seqio and TFDS directly: TF comes in through efficientlm.data's
# quiet import first (its start-up INFO lines dropped, GPUs hidden), as in a training run.
from efficientlm.data import tensorflow_cpu  # noqa: E402,F401  pylint: disable=C0413

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@pytest.fixture(scope='session')
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


def pytest_sessionstart(session):
  del session
  if jax.device_count() != 8:
    raise RuntimeError(f'Tests need 8 emulated devices, found {jax.devices()}; XLA_FLAGS was set '
                       'after JAX initialized its backend.')


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'slow: takes over ~10 s on 2 CPU cores. Run like every other test (make test '
      'runs them all); collected first, so that under pytest-xdist they start first.')
  # pytest-xdist's default hands each worker a quarter of the suite at once, in collection order,
  # which would give all the slow tests (collected first) to one worker. One at a time, the
  # slow ones spread over the workers and the run ends with short tests on every worker.
  if getattr(config.option, 'numprocesses', None) and config.option.maxschedchunk is None:
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # stable: slow first
