"""Test setup: 8 emulated CPU devices, set before JAX is imported anywhere."""

import os
import pathlib

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
# The suite checks sharding on 8 devices; on a GPU machine keep it on the emulated CPUs.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
