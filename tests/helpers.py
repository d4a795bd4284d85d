"""Small shared test helpers: random batches and model construction."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from efficientlm import partitioning
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.layer_stacking import unstack_layers
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.model import DecoderOnlyModel, EncoderDecoderModel

TINY_T5 = TransformerConfig(vocab_size=64, emb_dim=16, num_heads=4, head_dim=8, mlp_dim=32,
                            num_encoder_layers=2, num_decoder_layers=2, dtype='float32')
TINY_DECODER = TransformerConfig(vocab_size=64, emb_dim=16, num_heads=4, num_kv_heads=2,
                                 head_dim=8, mlp_dim=32, num_encoder_layers=0,
                                 num_decoder_layers=2, mlp_activations=('gelu',),
                                 position_embedding='rotary', scale_attention_logits=True,
                                 logits_via_embedding=True, scale_tied_logits=True,
                                 dtype='float32')


def t5_model(**overrides) -> EncoderDecoderModel:
  return EncoderDecoderModel(EncoderDecoder(dataclasses.replace(TINY_T5, **overrides)))


def decoder_model(**overrides) -> DecoderOnlyModel:
  return DecoderOnlyModel(DecoderOnly(dataclasses.replace(TINY_DECODER, **overrides)))


def tokens(rng: np.random.Generator, shape, vocab: int, low: int = 2) -> np.ndarray:
  return rng.integers(low, vocab, size=shape, dtype=np.int32)


def lm_batch(seed: int, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  """Decoder-only batch: inputs are targets shifted right (0 = start), with some padding."""
  rng = np.random.default_rng(seed)
  targets = tokens(rng, (batch, length), vocab)
  targets[0, length - 3:] = 0
  inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': (targets > 0).astype(np.float32)}


def seq2seq_batch(seed: int, batch: int, inputs_len: int, targets_len: int,
                  vocab: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  enc = tokens(rng, (batch, inputs_len), vocab)
  enc[-1, inputs_len // 2:] = 0
  out = lm_batch(seed + 1, batch, targets_len, vocab)
  out['encoder_input_tokens'] = enc
  return out


def init_params(model, batch, seed: int = 0):
  # One jitted program: run eagerly, init would compile each of the forward pass's ops apart.
  return jax.jit(lambda rng: partitioning.unbox(model.init(rng, batch)['params']))(
      jax.random.key(seed))


def param_shapes(tree, prefix: str = '') -> dict[str, tuple[int, ...]]:
  """{'encoder/layers_0/attention/query/kernel': shape, ...} for a nested dict of arrays."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(param_shapes(value, f'{prefix}{key}/'))
    else:
      out[prefix + key] = tuple(value.shape)
  return out


def assert_scanned_equals_unrolled(scanned, scanned_params, unrolled, params, batch):
  """Same tree shapes as the scanned model's own init, same loss, same gradients."""
  abstract = jax.eval_shape(lambda: init_params(scanned, batch))
  assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(np.shape, scanned_params)

  def loss_and_grads(model, p):  # jitted: op by op, compiling each op costs more than this
    return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))(p)

  loss_scan, g_scan = loss_and_grads(scanned, scanned_params)
  loss_unrolled, g_unrolled = loss_and_grads(unrolled, params)
  np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               unstack_layers(g_scan), g_unrolled)


def bump(batch, feature: str, index, vocab: int) -> dict:
  """A copy of `batch` whose `feature` tokens at `index` change to another in-vocab token."""
  tokens = np.array(batch[feature])
  tokens[index] = (tokens[index] - 2 + 1) % (vocab - 2) + 2
  return dict(batch, **{feature: tokens})


def intermediate_shapes(fn, *args) -> set[tuple[int, ...]]:
  """Shapes of every value in the jaxpr of fn, sub-jaxprs (pjit, custom_jvp, ...) included."""
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes
