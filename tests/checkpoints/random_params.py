"""Random parameters of a model's shapes and dtypes, without running its (slow to compile) init."""

import jax
import numpy as np

from tests import helpers


def random_params(model, seed: int = 0):
  """Kernels N(0, 1 / fan_in) (fan_in: the second-to-last axis), norm scales near 1, embeddings
  N(0, 1): logits of order one, and routers that spread tokens over the experts."""
  batch = helpers.seq2seq_batch(0, 2, 6, 4, model.module.config.vocab_size)
  shapes = jax.eval_shape(lambda: helpers.init_params(model, batch))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(s.shape)
    if 'scale' in name:
      x = 1 + 0.1 * x
    elif 'embedding' not in name:
      x = x * s.shape[-2] ** -0.5
    return x.astype(s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
