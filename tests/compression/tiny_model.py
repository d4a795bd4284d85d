"""The tiny decoder the pruning tests share, with the run mode's mesh and batch shape."""

import jax

from tests import helpers
from tests.training import tiny_run

VOCAB, LENGTH, BATCH = 64, 16, 8


def model_32(**overrides):
  """Every kernel 32 x 32 (d_model, heads x head_dim and the MLP), so one SparseGPT program per
  pattern serves them all (and test_sparsegpt's layer)."""
  return helpers.decoder_model(vocab_size=VOCAB, emb_dim=32, num_heads=4, head_dim=8,
                               num_kv_heads=None, mlp_dim=32, **overrides)


def batch_spec():
  batch = helpers.lm_batch(0, BATCH, LENGTH, VOCAB)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def abstract(model):
  return tiny_run.partitioner().abstract_params(model.param_initializer(batch_spec()),
                                                jax.random.key(0))[0]


def init_params(model):
  """Random parameters with the shardings the run mode gives them."""
  return tiny_run.partitioner().sharded_init(model.param_initializer(batch_spec()),
                                             jax.random.key(0))[0]
