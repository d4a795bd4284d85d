"""The efficient architectures through the real trainer: a run stopped at its checkpoint and
resumed ends with exactly the parameters of an uninterrupted run. The Reformer carries the most
state of them: LSH's per-step hash rotations (an rng stream of their own) and the reversible
layers' parameter tree. H3 and GSS layers carry SSM parameter tables of their own."""

import jax
import numpy as np
import pytest

from efficientlm.layers.gss import GssConfig
from efficientlm.layers.h3 import H3Config
from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.layers.ssm import SsmConfig
from tests import helpers
from tests.training import tiny_run

MODELS = {
    'reformer': dict(token_mixers=('lsh',), lsh=LshConfig(num_hashes=2, chunk_length=4),
                     residual='reversible', num_kv_heads=None),
    # Recurrent layers sharded over the 2 x 4 tensor-parallel mesh of tiny_run.
    'h3_gss': dict(token_mixers=('h3', 'gss'), h3=H3Config(SsmConfig(state_size=8), shift_size=3),
                   gss=GssConfig(SsmConfig(state_size=8, convolution='blocked', block_size=4))),
}


@pytest.mark.slow  # three short runs, each compiling its train step
@pytest.mark.parametrize('name', sorted(MODELS))
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, name):
  model = helpers.decoder_model(vocab_size=tiny_run.VOCAB, **MODELS[name])
  tiny_run.train(tmp_path / 'straight', 20, model=model)
  tiny_run.train(tmp_path / 'resumed', 10, model=model)  # ends with checkpoint 10
  tiny_run.train(tmp_path / 'resumed', 20, model=model)
  step_a, a = tiny_run.latest_params(tmp_path / 'straight', model)
  step_b, b = tiny_run.latest_params(tmp_path / 'resumed', model)
  assert step_a == step_b == 20
  jax.tree.map(np.testing.assert_array_equal, a, b)
