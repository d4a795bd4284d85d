"""TransformerConfig.attention_implementation: 'pallas' (interpret mode on CPU) against 'xla' on
valid positions, in forward passes, training steps and cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efficientlm.inference import kv_cache
from efficientlm.kernels import attention as dispatch
from efficientlm.kernels import decode_attention
from efficientlm.models.config import TransformerConfig
from tests import helpers


@pytest.fixture
def kernel_calls(monkeypatch):
  """Counts of flash / decode kernel calls, so a test knows the kernels really ran."""
  calls = {'flash': 0, 'decode': 0}

  def spy(name, fn):
    def wrapped(*args, **kwargs):
      if kwargs.get('implementation') == 'pallas':
        calls[name] += 1
      return fn(*args, **kwargs)
    return wrapped

  monkeypatch.setattr(dispatch, 'flash_attention', spy('flash', dispatch.flash_attention))
  monkeypatch.setattr(decode_attention, 'decode_attention',
                      spy('decode', decode_attention.decode_attention))
  return calls


def _assert_valid_close(a, b, valid, atol=1e-5):
  valid = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=atol, rtol=1e-5)


def test_config_validates_the_implementation():
  with pytest.raises(ValueError, match='attention_implementation'):
    TransformerConfig(attention_implementation='flash')


@pytest.mark.parametrize('packed', [False, True])
def test_decoder_only_rotary_mqa_forward_is_unchanged(kernel_calls, packed):
  model = helpers.decoder_model(num_kv_heads=1)
  batch = helpers.lm_batch(0, 2, 10, 64)  # the first row has 3 padding positions
  if packed:
    batch['decoder_segment_ids'] = np.array([[1] * 4 + [2] * 3 + [0] * 3, [1] * 6 + [2] * 4])
    batch['decoder_positions'] = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 0, 0],
                                           [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], np.int32)
  params = helpers.init_params(model, batch)
  # Jitted, each forward is traced once, so the kernel counts stay one per layer and call.
  want = jax.jit(model.logits)(params, batch)
  got = jax.jit(helpers.decoder_model(num_kv_heads=1, attention_implementation='pallas').logits)(
      params, batch)
  assert kernel_calls['flash'] == 2  # one per layer
  _assert_valid_close(got, want, batch['decoder_target_tokens'] > 0)


def test_t5_encoder_decoder_forward_is_unchanged(kernel_calls):
  """T5.1.1 (relative bias, padded encoder input) with the kernel's relative-bias option."""
  model = helpers.t5_model()
  batch = helpers.seq2seq_batch(0, 2, 7, 5, 64)
  params = helpers.init_params(model, batch)
  want = jax.jit(model.logits)(params, batch)
  got = jax.jit(helpers.t5_model(attention_implementation='pallas').logits)(params, batch)
  assert kernel_calls['flash'] == 2 + 2 * 2  # encoder self; decoder self and cross
  _assert_valid_close(got, want, batch['decoder_target_tokens'] > 0)


def test_t5_cases_without_kernel_structure_raise_under_pallas_and_run_under_auto():
  batch = helpers.seq2seq_batch(0, 2, 7, 5, 64)
  params = helpers.init_params(helpers.t5_model(), batch)
  # Explicit positions (packing): the kernel's relative bias has no per-example offsets yet.
  packed = dict(batch, encoder_positions=np.tile(np.arange(7, dtype=np.int32), (2, 1)))
  with pytest.raises(ValueError, match='relative position bias .* not yet supported by the pal'):
    jax.jit(helpers.t5_model(attention_implementation='pallas').logits)(params, packed)
  want = jax.jit(helpers.t5_model().logits)(params, packed)
  got = jax.jit(helpers.t5_model(attention_implementation='auto').logits)(params, packed)
  _assert_valid_close(got, want, batch['decoder_target_tokens'] > 0)


def test_prefix_lm_raises_under_pallas():
  model = helpers.decoder_model(attention_implementation='pallas')
  batch = helpers.lm_batch(0, 2, 10, 64)
  batch['decoder_causal_attention'] = (np.arange(10) < 4).astype(np.int32)[None].repeat(2, 0)
  with pytest.raises(ValueError, match='prefix-LM'):
    jax.jit(model.logits)(helpers.init_params(helpers.decoder_model(), batch), batch)


def test_training_steps_reduce_the_loss_like_xla():
  batch = helpers.lm_batch(1, 2, 8, 64)
  params = helpers.init_params(helpers.decoder_model(), batch)
  optimizer = optax.adam(1e-2)

  def curve(implementation, steps=4):
    model = helpers.decoder_model(attention_implementation=implementation)
    grad_fn = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, batch)[0]))
    p, state, losses = params, optimizer.init(params), []
    for _ in range(steps):
      loss, grads = grad_fn(p)
      updates, state = optimizer.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      losses.append(float(loss))
    return np.array(losses)

  xla, pallas = curve('xla'), curve('pallas')
  assert xla[-1] < xla[0] - 0.1
  np.testing.assert_allclose(pallas, xla, rtol=1e-4)


def test_cached_decoding_with_the_decode_kernel_equals_xla(kernel_calls):
  """Prefill (flash) and steps (decode kernel, lengths = position + 1) against xla."""
  model = helpers.decoder_model(num_kv_heads=1)
  params = jax.jit(model.module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  pallas = helpers.decoder_model(num_kv_heads=1, attention_implementation='pallas')
  rng = np.random.default_rng(2)
  toks = jnp.asarray(rng.integers(2, 64, size=(3, 9)), jnp.int32).at[:, 0].set(0)
  lengths = jnp.array([2, 5, 3])
  prompt = jnp.where(jnp.arange(5)[None] < lengths[:, None], toks[:, :5], 0)

  def run(m, params):
    cache = kv_cache.init_cache(m, params, 3, 10)
    logits, cache = kv_cache.prefill(m, params, cache, prompt, lengths)
    out, positions = [logits], lengths
    for _ in range(3):
      step_logits, cache = kv_cache.step(m, params, cache, toks[jnp.arange(3), positions],
                                         positions)
      out.append(step_logits)
      positions = positions + 1
    return out

  # Each whole decode jitted (traced once, steps unrolled): the same kernel calls as op by op.
  want = jax.jit(lambda p: run(model, p))(params)
  got = jax.jit(lambda p: run(pallas, p))(params)
  # Flash: 2 layers x (init_cache's shape-only trace + prefill); decode: 2 layers x 3 steps.
  assert kernel_calls == {'flash': 4, 'decode': 2 * 3}
  prompt_valid = jnp.arange(5)[None] < lengths[:, None]
  _assert_valid_close(got[0], want[0], prompt_valid)
  for g, w in zip(got[1:], want[1:]):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_t5_decoding_step_raises_under_pallas():
  """The decode kernel has no relative bias: explicit 'pallas' refuses a T5 step."""
  model = helpers.t5_model(attention_implementation='pallas')
  enc = jnp.ones((1, 4), jnp.int32)
  # Shapes suffice: the step refuses while it is traced (running the prefill's interpret-mode
  # kernels op by op would take most of a minute).
  params = jax.eval_shape(lambda: helpers.t5_model().module.init(
      jax.random.key(0), enc, jnp.zeros((1, 2), jnp.int32))['params'])
  cache = jax.eval_shape(lambda p: kv_cache.init_cache(model, p, 1, 4, encoder_length=4), params)
  _, cache = jax.eval_shape(lambda p, c: kv_cache.prefill(
      model, p, c, jnp.zeros((1, 1), jnp.int32), jnp.array([1]), enc), params, cache)
  with pytest.raises(ValueError, match='relative position bias .* decoding step'):
    jax.eval_shape(lambda p, c: kv_cache.step(model, p, c, jnp.array([3]), jnp.array([1]), enc),
                   params, cache)
