"""Reversible residual stacks in the models (TransformerConfig.residual = 'reversible').

The reference is written here: the two-stream recurrence y1 = x1 + F(x2), y2 = x2 + G(y1)
(Gomez et al. 2017, Sec. 3), (x1, x2) = (x, x), output (y1 + y2) / 2, with F and G assembled
in the test from the standard layer's sub-modules (norms, attention, MLP) applied to the
subtrees of a *standard* model's checkpoint, differentiated by plain autodiff. The model must
match it in value and gradient while its custom VJP recomputes activations instead.
The core itself is tested in tests/models/test_reversible.py.

Tolerances (float32): the custom VJP evaluates the branches at reconstructed inputs
x2 = (x2 + G) - G, off by rounding at the residual stream's scale (~1e-7 relative per layer);
through 3 layers and the logits this is ~1e-6, so 1e-5 leaves a margin while a wrong term
(a missing cotangent, a swapped branch) is O(1e-2) or more.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import partitioning
from efficientlm.layers.evolving_attention import EvolvingAttentionConfig
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.models import reversible_transformer
from efficientlm.models.config import TransformerConfig
from efficientlm.models.reversible import ReversibleConfig
from efficientlm.models.transformer import feed_forward, norm, token_mixer
from tests import helpers

TOL = dict(rtol=1e-5, atol=1e-5)  # see the module docstring


def _with_plain_autodiff(monkeypatch, fn, *args):
  """(fn(*args), fn(*args) with the core's switch custom_gradient=False: the same forward
  differentiated by ordinary autodiff), traced and compiled as one program."""

  def both(*args):
    custom = fn(*args)
    with monkeypatch.context() as patch:
      patch.setattr(reversible_transformer, 'stack_config', lambda cfg, n: ReversibleConfig(
          n, ff_chunks=cfg.reversible_ff_chunks, custom_gradient=False))
      return custom, fn(*args)

  return jax.jit(both)(*args)


def _reference_logits(cfg: TransformerConfig, params, tokens):
  """Decoder-only logits of the reversible recurrence, by hand (no padding: causal mask only)."""
  length = tokens.shape[1]
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  positions = jnp.arange(length)[None]
  x = params['token_embedder']['embedding'][tokens]
  x1 = x2 = x
  for i in range(cfg.num_decoder_layers):
    p = params['decoder'][f'layers_{i}']

    def sub(module, name, *args):
      return module.apply({'params': p[name]}, *args)  # pylint: disable=cell-var-from-loop

    h = sub(norm(cfg, 'n'), 'pre_self_attention_layer_norm', x2)
    attn = token_mixer(cfg, 'attention', 'a', causal=True, layer_index=i)
    x1 = x1 + sub(attn, 'self_attention', h, h, mask, None, positions, positions, True)
    h = sub(norm(cfg, 'n'), 'pre_mlp_layer_norm', x1)
    x2 = x2 + sub(feed_forward(cfg, False, causal=True), 'mlp', h, True)
  y = norm(cfg, 'n').apply({'params': params['decoder']['decoder_norm']}, (x1 + x2) / 2)
  logits = y @ params['token_embedder']['embedding'].T  # tied, as TINY_DECODER
  return logits * cfg.emb_dim**-0.5


def test_decoder_only_equals_the_two_stream_recurrence_in_value_and_gradient():
  overrides = dict(num_decoder_layers=3, residual='reversible')
  model = helpers.decoder_model(**overrides)
  cfg = model.module.config
  batch = helpers.lm_batch(0, 2, 8, 64)
  batch['decoder_target_tokens'][0, -3:] = 5  # no padding: the reference's mask is causal only
  tokens = jnp.asarray(batch['decoder_input_tokens'])
  params = helpers.init_params(helpers.decoder_model(num_decoder_layers=3), batch)  # standard's
  weights = jax.random.normal(jax.random.key(1), (2, 8, 64))

  standard = helpers.decoder_model(num_decoder_layers=3)

  @jax.jit
  def run(p):  # jitted: op by op, compiling each op costs more than the test
    def objective(logits_fn):
      return jax.value_and_grad(lambda p: jnp.sum(logits_fn(p) * weights), has_aux=False)(p)
    logits = (model.logits(p, batch), _reference_logits(cfg, p, tokens), standard.logits(p, batch))
    return logits, objective(lambda p: model.logits(p, batch)), objective(
        lambda p: _reference_logits(cfg, p, tokens))

  (logits, ref_logits, standard_logits), (value, grads), (ref_value, ref_grads) = run(params)
  np.testing.assert_allclose(logits, ref_logits, **TOL)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, ref_grads)
  # Not the standard model's function (the same weights, another network).
  assert np.abs(np.asarray(logits - standard_logits)).max() > 1e-3


def test_dropout_and_chunks_gradients_equal_plain_autodiff(monkeypatch):
  """With dropout on and the MLP in 2 chunks, the recomputing backward pass regenerates the
  forward pass's masks: the loss gradient equals autodiff of the same forward."""
  model = helpers.decoder_model(residual='reversible', dropout_rate=0.2, reversible_ff_chunks=2,
                                position_embedding='relative')
  batch = helpers.lm_batch(0, 2, 8, 64)
  params = helpers.init_params(model, batch)
  rng = jax.random.key(3)

  (loss, grads), (ref_loss, ref_grads) = _with_plain_autodiff(
      monkeypatch, jax.value_and_grad(lambda p: model.loss_fn(p, batch, rng)[0]), params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, ref_grads)
  # Dropout is on: the loss differs from the deterministic one.
  assert abs(float(loss) - float(jax.jit(model.loss_fn)(params, batch)[0])) > 1e-4


def test_the_reformer_lsh_in_reversible_layers_recomputes_the_same_hashes(monkeypatch):
  """LSH attention inside reversible layers (the Reformer): in training, the hash rotations come
  from the step's rng; the recomputing backward pass must draw the same ones, so the gradient
  equals autodiff of the same forward."""
  model = helpers.decoder_model(residual='reversible', token_mixers=('lsh',), num_kv_heads=None,
                                lsh=LshConfig(num_hashes=2, chunk_length=4))
  batch = helpers.lm_batch(0, 2, 16, 64)
  params = helpers.init_params(model, batch)
  rng = jax.random.key(5)
  (loss, grads), (ref_loss, ref_grads) = _with_plain_autodiff(
      monkeypatch, jax.value_and_grad(lambda p: model.loss_fn(p, batch, rng)[0]), params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, ref_grads)
  # Training hashes are not the evaluation ones: the loss depends on the step's rng.
  assert abs(float(loss) - float(jax.jit(model.loss_fn)(params, batch)[0])) > 1e-5


def test_bfloat16_activations_keep_float32_streams_and_match_plain_autodiff(monkeypatch):
  """Branches compute in bfloat16, the two streams stay float32 (exact reconstruction)."""
  model = helpers.decoder_model(residual='reversible', dtype='bfloat16',
                                position_embedding='relative')
  batch = helpers.lm_batch(0, 2, 8, 64)
  params = helpers.init_params(model, batch)
  (loss, grads), (ref_loss, ref_grads) = _with_plain_autodiff(
      monkeypatch, jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]), params)
  # bfloat16 branches re-evaluated at reconstructed inputs may round differently (eps 2^-8):
  # 3e-2 of each leaf's largest entry; a wrong term would be O(1) of it.
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, atol=3e-2 * float(np.abs(b).max())), grads, ref_grads)


def test_decoder_only_reversible_is_causal():
  model = helpers.decoder_model(residual='reversible', position_embedding='relative')
  batch = helpers.lm_batch(0, 2, 8, 64)
  params = helpers.init_params(model, batch)
  logits_fn = jax.jit(model.logits)  # one program for both batches
  logits = logits_fn(params, batch)
  t = 4
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), t), 64))
  np.testing.assert_array_equal(changed[:, :t], logits[:, :t])
  assert np.abs(np.asarray(changed[:, t] - logits[:, t])).max() > 1e-4


@pytest.mark.parametrize('kind', ['decoder', 't5'])
def test_a_standard_checkpoint_has_the_reversible_tree(kind):
  """Same names, shapes and logical axes (a standard checkpoint loads, shards the same)."""
  if kind == 'decoder':
    make, batch = helpers.decoder_model, helpers.lm_batch(0, 1, 8, 64)
  else:
    make, batch = helpers.t5_model, helpers.seq2seq_batch(0, 1, 6, 8, 64)
  # Abstract trees (shapes and boxes, nothing computed): all that the assertions below read.
  standard = jax.eval_shape(make().init, jax.random.key(0), batch)['params']
  reversible = jax.eval_shape(make(residual='reversible').init, jax.random.key(0), batch)['params']
  assert helpers.param_shapes(partitioning.unbox(reversible)) == helpers.param_shapes(
      partitioning.unbox(standard))
  assert partitioning.logical_axes(reversible) == partitioning.logical_axes(standard)
  assert 'layers_1' in reversible['decoder'] and 'self_attention' in reversible['decoder'][
      'layers_1']


def test_t5_reversible_gradients_reach_the_encoder_and_equal_plain_autodiff(monkeypatch):
  """Encoder-decoder: the decoder's F holds its cross-attention; the encoder output is an
  argument of every F, its cotangent summed by the custom VJP."""
  model = helpers.t5_model(residual='reversible', num_encoder_layers=1)
  batch = helpers.seq2seq_batch(0, 2, 6, 8, 64)
  params = helpers.init_params(model, batch)

  (loss, grads), (ref_loss, ref_grads) = _with_plain_autodiff(
      monkeypatch, jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]), params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), grads, ref_grads)
  encoder_grad = grads['encoder']['layers_0']['attention']['query']['kernel']
  assert np.abs(np.asarray(encoder_grad)).max() > 1e-6
  # The decoder stays causal.
  logits_fn = jax.jit(model.logits)
  logits = logits_fn(params, batch)
  changed = logits_fn(params, helpers.bump(batch, 'decoder_input_tokens', (slice(None), 5), 64))
  np.testing.assert_array_equal(changed[:, :5], logits[:, :5])


def test_what_reversible_cannot_do_is_a_clear_error():
  rev = dataclasses.replace  # configs built from the tiny decoder's
  base = dict(residual='reversible')
  cases = [
      (dict(moe=MoeConfig(4, layout='every', period=1)), 'set moe = None'),
      (dict(evolving_attention=EvolvingAttentionConfig()), 'set evolving_attention = None'),
      (dict(parallel_block=True), 'set parallel_block = False'),
      (dict(scan_layers=True), 'set scan_layers = False'),
      (dict(remat_policy='full'), "set remat_policy = 'none'"),
      (dict(residual='standard', reversible_ff_chunks=2), "set residual = 'reversible'"),
      (dict(residual='revnet'), "residual 'revnet' not in"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      rev(helpers.TINY_DECODER, **{**base, **overrides})
  model = helpers.decoder_model(residual='reversible', reversible_ff_chunks=3)
  batch = helpers.lm_batch(0, 1, 8, 64)
  with pytest.raises(ValueError, match='choose a divisor of 8'):
    helpers.init_params(model, batch)
