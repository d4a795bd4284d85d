"""The decoder presets learn: associative recall in a few hundred steps, dense and with a Switch
layer whose experts stay evenly loaded. (Also an initialization regression test: with GPT-2's
0.02 embeddings under unit-scale layers the dense model stayed at the copy-a-value plateau of
~30% for 8000 steps.)"""

import jax
import numpy as np
import pytest

from efficientlm.layers.moe.config import MoeConfig
from efficientlm.training import optimizers
from efficientlm.training.steps import TrainState, make_train_step
from tests import helpers

pytestmark = pytest.mark.slow  # every test here runs for 10 s or more

KEYS, VALUES, PAIRS, QUERIES = 8, 16, 4, 8


def recall_batch(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  """k1 v1 .. k4 v4 q1 a1 .. q8 a8 EOS; queries drawn from the pairs; loss on the answers."""
  keys = np.argsort(rng.random((n, KEYS)), axis=1)[:, :PAIRS] + 2
  values = rng.integers(2 + KEYS, 2 + KEYS + VALUES, (n, PAIRS))
  asked = rng.integers(0, PAIRS, (n, QUERIES))
  queries = np.stack([np.take_along_axis(keys, asked, 1), np.take_along_axis(values, asked, 1)],
                     axis=2).reshape(n, -1)
  targets = np.concatenate([np.stack([keys, values], axis=2).reshape(n, -1), queries,
                            np.ones((n, 1), int)], axis=1).astype(np.int32)
  weights = np.concatenate([np.zeros((n, 2 * PAIRS)), np.tile([0.0, 1.0], (n, QUERIES)),
                            np.zeros((n, 1))], axis=1).astype(np.float32)
  return {'decoder_input_tokens': np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          'decoder_target_tokens': targets, 'decoder_loss_weights': weights}


@pytest.mark.parametrize('moe', [None, MoeConfig(4, layout='every', period=2)],
                         ids=['dense', 'switch'])
def test_tiny_decoder_learns_associative_recall(moe):
  model = helpers.decoder_model(vocab_size=2 + KEYS + VALUES, emb_dim=64, head_dim=16,
                                mlp_dim=256, num_kv_heads=1, moe=moe)
  rng = np.random.default_rng(0)
  params = helpers.init_params(model, recall_batch(rng, 2))
  optimizer = optimizers.adamw(optimizers.warmup_cosine_schedule(3e-3, 50, 400),
                               weight_decay=0.0)
  state = TrainState(step=jax.numpy.int32(0), params=params,
                     opt_state=jax.jit(optimizer.tx.init)(params))
  # The suite compiles at XLA backend optimization level 0 (tests/conftest.py); this step runs
  # 400 times, and optimized it runs twice as fast.
  step = jax.jit(make_train_step(model, optimizer),
                 compiler_options={'xla_backend_optimization_level': 2})
  losses = []
  for _ in range(400):  # losses stay on the device until the end: no wait after each step
    state, train_metrics = step(state, recall_batch(rng, 32))
    losses.append(train_metrics['cross_entropy'])
  losses = np.asarray(jax.device_get(losses), np.float64)
  _, metrics = jax.jit(model.loss_fn)(state.params, recall_batch(np.random.default_rng(1), 512))
  assert float(metrics['accuracy']) > 0.9
  assert np.mean(losses[-20:]) < 0.1 * np.mean(losses[:20])
  if moe is not None:  # the load-balancing loss kept the 4 experts evenly used
    assert float(metrics['moe/expert_load_min']) > 0.15
    assert float(metrics['moe/expert_load_max']) < 0.35
