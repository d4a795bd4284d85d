"""Encoder and decoder stacks: embeddings in, layers, final norm, logits out."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.errors import ConfigError
from efficientlm.kernels.flash_attention import RelativeBias
from efficientlm.layers import masks
from efficientlm.layers.attention import (AttentionMask, padding_segment_ids,
                                          segment_ids_from_block_mask)
from efficientlm.layers.dense import DenseGeneral, Embed
from efficientlm.layers.position import RelativePositionBias
from efficientlm.models.config import ATTENTION_MIXERS, TransformerConfig
from efficientlm.models.reversible_transformer import reversible_stack_layers
from efficientlm.models.transformer import (DecoderLayer, EncoderLayer, hidden, initial_carry,
                                            layer_pattern, norm, residual_dropout, stack_layers)

_HIDDEN = ('batch', 'length', 'embed')


def default_positions(tokens: jax.Array, positions: jax.Array | None) -> jax.Array:
  """Given positions ([batch, len], packed data), else [1, len]: the row broadcasts, so the
  relative position bias stays [1, heads, len, len] instead of one copy per example."""
  if positions is not None:
    return positions
  return jnp.arange(tokens.shape[-1], dtype=jnp.int32)[None]


def position_bias(cfg: TransformerConfig, positions: jax.Array, bidirectional: bool,
                  key_positions: jax.Array | None = None, as_table: bool = False):
  """The stack's shared T5 relative position bias (None with rotary embeddings); keys are at
  `positions` too unless `key_positions` says otherwise (decoding against a cache).

  `as_table` (positions 0..len-1 only): for the kernels and the sparse token mixers, the bias
  as its [heads, buckets] table, which they rebuild per block instead of materializing
  [heads, len, len].
  """
  if cfg.position_embedding != 'relative':
    return None
  module = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, dtype=cfg.activation_dtype,
                                param_dtype=cfg.weight_dtype, name='relpos_bias')
  bias = module(positions, positions if key_positions is None else key_positions, bidirectional)
  if not as_table or not cfg.structured_masks:
    return bias
  # The dense bias above is then unused (jit drops it); the call creates the table.
  table = nn.unbox(module.get_variable('params', 'rel_embedding'))
  return RelativeBias(table.astype(cfg.activation_dtype), cfg.relative_attention_num_buckets,
                      cfg.relative_attention_max_distance, bidirectional)


def with_structure(cfg: TransformerConfig, dense: jax.Array, valid: jax.Array,
                   segment_ids: jax.Array | None, causal: bool):
  """The dense mask for dense 'xla' attention (unchanged); for the kernels and the sparse token
  mixers an AttentionMask that also carries its structure (causal, padding and packing as
  segment ids). Under jit, a dense mask nobody reads is never built."""
  if not cfg.structured_masks:
    return dense
  ids = padding_segment_ids(valid, segment_ids)
  return AttentionMask(dense, ids, ids, causal=causal)


def check_sequence_features(cfg: TransformerConfig, packed: bool, prefix_lm: bool = False,
                            stack: str = 'decoder'):
  """Token mixers that see whole unpacked sequences refuse packing and prefix-LM masks here,
  before tracing goes deeper (BigBird's pattern, LSH's buckets, the SSMs' convolutions and
  states and the Fourier transforms span the row, not each packed example)."""
  mixers = set(cfg.encoder_token_mixers or cfg.token_mixers) if stack == 'encoder' else set(
      cfg.token_mixers)
  whole_rows = sorted(mixers - {'attention'})  # every mixer but dense attention
  if not whole_rows:
    return
  if packed:
    raise ConfigError(f'token_mixers {whole_rows} mix over whole rows (attention patterns, '
                      'convolutions, recurrent states or Fourier transforms) and do not support '
                      'packed examples: set DatasetConfig.pack = False (e.g. --gin.train/'
                      'data_config.DatasetConfig.pack=False and the same for eval/).')
  if prefix_lm:
    raise ConfigError(f'token_mixers {whole_rows} are causal and have no prefix-LM mask: train '
                      'a decoder-only model without prefix-LM (causal_attention), or use dense '
                      'attention layers.')


def local_window(cfg: TransformerConfig, mask: jax.Array, q_positions: jax.Array,
                 k_positions: jax.Array) -> jax.Array:
  """`mask` [b|1, 1, q, k] AND |q_position - k_position| < attention_window (when set)."""
  if not cfg.attention_window:
    return mask
  near = jnp.abs(q_positions[:, None, :, None] - k_positions[:, None, None, :])
  return jnp.logical_and(mask, near < cfg.attention_window)


def embed(cfg: TransformerConfig, embedder: Embed, tokens: jax.Array, deterministic: bool):
  x = embedder(tokens).astype(cfg.activation_dtype)
  return partitioning.constrain(residual_dropout(cfg, x, deterministic), _HIDDEN)


class Encoder(nn.Module):
  config: TransformerConfig
  shared_embedding: Embed

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, deterministic=True):
    cfg = self.config
    check_sequence_features(cfg, packed=segment_ids is not None or positions is not None,
                            stack='encoder')
    # Explicit (packed) positions: the kernels' relative bias has no per-example offsets yet.
    as_table = positions is None
    positions = default_positions(tokens, positions)
    x = embed(cfg, self.shared_embedding, tokens, deterministic)
    valid = tokens > 0
    mask = masks.combine_masks(
        masks.make_attention_mask(valid, valid),
        None if segment_ids is None else masks.make_segment_mask(segment_ids, segment_ids))
    mask = local_window(cfg, mask, positions, positions)
    mask = with_structure(cfg, mask, valid, segment_ids, causal=False)
    bias = position_bias(cfg, positions, bidirectional=True, as_table=as_table)
    kinds = layer_pattern(cfg, cfg.num_encoder_layers, 'encoder')
    if cfg.residual == 'reversible':
      x = reversible_stack_layers(kinds, cfg, x, (mask, bias, positions), causal=False,
                                  deterministic=deterministic)
    else:
      x = hidden(stack_layers(EncoderLayer, kinds, cfg, initial_carry(cfg, x),
                              (mask, bias, positions), deterministic=deterministic))
    x = norm(cfg, 'encoder_norm')(x)
    return partitioning.constrain(residual_dropout(cfg, x, deterministic), _HIDDEN)


def _attends(cfg: TransformerConfig, cross_attention: bool) -> bool:
  """Whether any decoder layer reads a KV cache (self- or cross-attention)."""
  return cross_attention or bool(set(cfg.token_mixers) & set(ATTENTION_MIXERS))


class Decoder(nn.Module):
  """Causal decoder; with `cross_attention` it attends to an encoder (T5), else decoder-only.

  Decoding with a KV cache (`decode`, see MultiHeadAttention): 'init' and 'prefill' take whole
  prompts like training does; 'step' takes one token per sequence, `positions` [batch, 1] its
  slot in a cache of `cache_length` slots, and attends to slots up to that position.
  """

  config: TransformerConfig
  shared_embedding: Embed
  cross_attention: bool = True

  @nn.compact
  def __call__(self,
               decoder_input_tokens,
               decoder_target_tokens=None,
               encoded=None,
               encoder_decoder_mask=None,
               segment_ids=None,
               positions=None,
               causal_attention=None,
               deterministic=True,
               decode=None,
               cache_length=None):
    cfg = self.config
    if self.cross_attention and encoded is None and decode != 'step':
      raise ValueError('An encoder-decoder Decoder needs the encoder output.')
    x = embed(cfg, self.shared_embedding, decoder_input_tokens, deterministic)
    if decode == 'step' and cache_length is None and not _attends(cfg, self.cross_attention):
      if positions is None:
        raise ValueError("decode='step' needs positions [batch, 1].")
      mask = bias = None  # recurrent layers only: no cache slots to mask
    elif decode == 'step':
      if positions is None or cache_length is None:
        raise ValueError("decode='step' needs positions [batch, 1] and cache_length.")
      slots = jnp.arange(cache_length, dtype=jnp.int32)
      mask = (slots[None, None, None, :] <= positions[:, None, :, None])
      mask = local_window(cfg, mask, positions, slots[None])
      if cfg.attention_implementation != 'xla':  # the decode kernel reads slots 0..position
        mask = AttentionMask(mask, kv_lengths=positions[:, 0] + 1)
      bias = position_bias(cfg, positions, bidirectional=False, key_positions=slots[None])
    else:
      check_sequence_features(cfg, packed=segment_ids is not None or positions is not None,
                              prefix_lm=causal_attention is not None)
      as_table = positions is None  # as in the Encoder
      positions = default_positions(decoder_input_tokens, positions)
      # Without targets every position counts as real (no padding mask).
      targets = decoder_target_tokens
      if targets is None:
        targets = jnp.ones_like(decoder_input_tokens)
      mask = masks.make_decoder_mask(targets, segment_ids, causal_attention)
      mask = local_window(cfg, mask, positions, positions)
      if causal_attention is None:  # prefix-LM masks have no kernel structure: xla only
        mask = with_structure(cfg, mask, targets > 0, segment_ids, causal=True)
      # With prefix-LM masking the bias stays causal-bucketed, as in T5X's decoder-only models.
      bias = position_bias(cfg, positions, bidirectional=False, as_table=as_table)
    args = (mask, bias, positions)
    if (self.cross_attention and encoder_decoder_mask is not None and
        cfg.attention_implementation != 'xla'):
      # Cross-attention masks are padding AND packing blocks: exact as segment ids.
      encoder_decoder_mask = AttentionMask(encoder_decoder_mask,
                                           *segment_ids_from_block_mask(encoder_decoder_mask))
    if self.cross_attention:
      args += (encoded, encoder_decoder_mask)
    kinds = layer_pattern(cfg, cfg.num_decoder_layers, 'decoder')
    if cfg.residual == 'reversible':
      x = reversible_stack_layers(kinds, cfg, x, args, causal=True, deterministic=deterministic,
                                  cross_attention=self.cross_attention, decode=decode)
    else:
      x = hidden(stack_layers(DecoderLayer, kinds, cfg, initial_carry(cfg, x), args,
                              deterministic=deterministic, cross_attention=self.cross_attention,
                              decode=decode))
    return output_logits(cfg, self.shared_embedding, x, deterministic)


def output_logits(cfg: TransformerConfig, shared_embedding: Embed, x: jax.Array,
                  deterministic: bool) -> jax.Array:
  """A decoder's head, in the calling module's scope: the final norm ('decoder_norm'), then the
  tied embedding (scaled by emb_dim**-0.5 where configured) or 'logits_dense'."""
  x = norm(cfg, 'decoder_norm')(x)
  x = partitioning.constrain(residual_dropout(cfg, x, deterministic), _HIDDEN)
  if cfg.logits_via_embedding:
    logits = shared_embedding.attend(x)
    if cfg.scale_tied_logits:
      logits = logits * jnp.asarray(cfg.emb_dim**-0.5, logits.dtype)
  else:
    logits = DenseGeneral(cfg.vocab_size, ('embed', 'vocab'), dtype=cfg.activation_dtype,
                          param_dtype=cfg.weight_dtype, name='logits_dense')(x)
  return partitioning.constrain(logits, ('batch', 'length', 'vocab'))


def token_embedder(cfg: TransformerConfig) -> Embed:
  return Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype,
               param_dtype=cfg.weight_dtype, one_hot=cfg.one_hot_embedding)
