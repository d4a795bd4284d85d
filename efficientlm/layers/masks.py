"""Boolean attention masks [batch, 1, q_len, k_len]: True where attention is allowed."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_attention_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
  """Pairwise AND of [batch, q] and [batch, k] validity."""
  return jnp.logical_and(query_valid[:, None, :, None], key_valid[:, None, None, :])


def make_segment_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
  """Packed sequences: positions attend only within their own segment."""
  return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def make_causal_mask(q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
  """Keys at or before the query position; positions are [batch, len]."""
  return k_positions[:, None, None, :] <= q_positions[:, None, :, None]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def make_decoder_mask(decoder_target_tokens: jax.Array,
                      segment_ids: jax.Array | None = None,
                      causal_attention: jax.Array | None = None) -> jax.Array:
  """Self-attention mask of a decoder: causal, padding, packing, optional prefix-LM.

  Padding comes from the *targets*: the first input token is 0 (start of sequence), which is
  also the pad id. `causal_attention` (T5X's `decoder_causal_attention`) marks prefix positions
  that attend to each other bidirectionally (prefix LM).
  """
  length = decoder_target_tokens.shape[-1]
  index = jnp.broadcast_to(jnp.arange(length), decoder_target_tokens.shape)
  allowed = make_causal_mask(index, index)
  if causal_attention is not None:
    prefix = causal_attention > 0
    allowed = jnp.logical_or(allowed, make_attention_mask(prefix, prefix))
  valid = decoder_target_tokens > 0
  segments = None if segment_ids is None else make_segment_mask(segment_ids, segment_ids)
  return combine_masks(allowed, make_attention_mask(valid, valid), segments)
