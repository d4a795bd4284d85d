"""Shared fixtures of the inference tests."""

import pytest

from efficientlm import partitioning


@pytest.fixture(scope='module')
def mesh():
  """The 8 emulated devices as the paper's smallest torus, (2, 2, 2) over ('x', 'y', 'z')."""
  return partitioning.create_mesh((2, 2, 2), ('x', 'y', 'z'))
