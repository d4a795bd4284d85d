"""Prefill and one-token steps of our Flax models against a KV cache.

The cache is the models' 'cache' collection: per attention layer `cached_key`/`cached_value`
[batch, slots, kv_heads, head_dim] (a leading layer axis when layers are scanned); per H3 or
GSS layer its recurrent state (`ssm_state`, H3's `shift_state`), whose size does not grow
with the length. Only the KV
heads are stored, so multi-query and grouped-query models keep their memory saving. Sequences
are right-padded; slot i holds position i, so prompts of different lengths decode in one batch,
each writing at its own position.

Decoder-only models: the decoder prompt is [0] + prompt (seqio's decoder inputs begin with the
pad id 0). Encoder-decoder models: the encoder reads the inputs once during prefill, its
cross-attention keys and values are cached, and the decoder prompt is [0].

int8 weights (inference.quantization's QuantizedWeight leaves) are passed to the model as they
are: each layer dequantizes inside its own matmul, so no float copy of the weights is made.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efficientlm.models.model import BaseModel, EncoderDecoderModel

Cache = Any


def is_encoder_decoder(model: BaseModel) -> bool:
  return isinstance(model, EncoderDecoderModel)


def _apply(model: BaseModel, params, cache, method: str, **kwargs):
  variables = {'params': params}
  if cache is not None:
    variables['cache'] = cache
  out, state = model.module.apply(variables, mutable=['cache'], method=method, **kwargs)
  return out, state['cache']


def _decoder_call(model: BaseModel, params, cache, tokens, decode, encoder_tokens=None,
                  encoded=None, **kwargs):
  if is_encoder_decoder(model):
    return _apply(model, params, cache, 'decode', encoded=encoded,
                  encoder_input_tokens=encoder_tokens, decoder_input_tokens=tokens,
                  decode=decode, **kwargs)
  return _apply(model, params, cache, '__call__', decoder_input_tokens=tokens, decode=decode,
                **kwargs)


def init_cache(model: BaseModel, params, batch_size: int, cache_length: int,
               encoder_length: int | None = None) -> Cache:
  """Zeros shaped for `batch_size` sequences of up to `cache_length` decoder tokens (shapes
  come from jax.eval_shape of a decode='init' call; nothing is computed)."""
  if is_encoder_decoder(model) and encoder_length is None:
    raise ValueError('An encoder-decoder cache needs encoder_length (the inputs length).')

  def shapes(p):
    tokens = jnp.ones((batch_size, cache_length), jnp.int32)
    encoded = None
    if is_encoder_decoder(model):
      cfg = model.module.config
      encoded = jnp.zeros((batch_size, encoder_length, cfg.emb_dim), cfg.activation_dtype)
    return _decoder_call(model, p, None, tokens, 'init',
                         encoder_tokens=jnp.ones((batch_size, encoder_length or 1), jnp.int32),
                         encoded=encoded)[1]

  abstract = jax.eval_shape(shapes, params)
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


def cache_length(cache: Cache) -> int | None:
  """Decoder slots of a cache (from any self-attention key); None for a decoder of recurrent
  layers only (H3, GSS, block-recurrent: their states and windows have no slots, so any length
  decodes)."""
  recurrent = False
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    names = [str(getattr(k, 'key', k)) for k in path]
    if 'self_attention' in names and names[-1] == 'cached_key':
      return leaf.shape[-3]
    # SSM states (H3, GSS) and block-recurrent windows have no slots to count.
    recurrent |= names[-1] in ('ssm_state', 'window_keys')
  if recurrent:
    return None
  raise ValueError('No self-attention KV cache found; create one with init_cache.')


def prefill(model: BaseModel, params, cache: Cache, prompt: jax.Array, prompt_lengths: jax.Array,
            encoder_tokens: jax.Array | None = None) -> tuple[jax.Array, Cache]:
  """Runs the decoder prompt [batch, P] (right-padded, `prompt_lengths` [batch] real tokens,
  BOS included) through the model, filling slots [0, P). Returns (logits [batch, P, vocab],
  cache). Encoder-decoder models encode `encoder_tokens` here and cache the cross-attention."""
  slots = cache_length(cache)
  if slots is not None and prompt.shape[1] > slots:
    raise ValueError(f'Prompt of {prompt.shape[1]} tokens does not fit the KV cache of {slots} '
                     'slots; create a longer cache.')
  valid = (jnp.arange(prompt.shape[1])[None, :] < prompt_lengths[:, None]).astype(jnp.int32)
  kwargs = {'decoder_target_tokens': valid}
  if is_encoder_decoder(model):
    if encoder_tokens is None:
      raise ValueError('An encoder-decoder prefill needs encoder_tokens.')
    encoded = model.module.apply({'params': params}, encoder_tokens,
                                 method='encode')
    return _decoder_call(model, params, cache, prompt, 'prefill', encoder_tokens=encoder_tokens,
                         encoded=encoded, **kwargs)
  if getattr(model, 'prefix_lm', False):  # the prompt attends to itself bidirectionally
    kwargs['decoder_causal_attention'] = valid
  return _decoder_call(model, params, cache, prompt, 'prefill', **kwargs)


def step(model: BaseModel, params, cache: Cache, tokens: jax.Array, positions: jax.Array,
         encoder_tokens: jax.Array | None = None) -> tuple[jax.Array, Cache]:
  """One token per sequence, `tokens` [batch] at slots `positions` [batch]. Returns
  (logits [batch, vocab], cache)."""
  logits, cache = _decoder_call(model, params, cache, tokens[:, None], 'step',
                                encoder_tokens=encoder_tokens,
                                decoder_positions=positions[:, None],
                                cache_length=cache_length(cache))
  return logits[:, 0], cache
