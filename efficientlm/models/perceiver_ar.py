"""Perceiver AR (Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling
with Perceiver AR", ICML 2022): a decoder-only LM whose first layer reads the whole context of L
tokens into N latents, after which the deep stack runs over the N latents only.

Equations (pre-norm, as in our decoder layers; x_j the embedding of input j, 0 <= j < L; the
latents sit at the last N positions p = L - N, ..., L - 1):

  first layer, a causally masked cross-attention from the latents to every input:
    h_j  = RMSNorm(x_j)                                  (one norm for queries and keys/values)
    a_p  = sum_{j <= p, j real} softmax_j(q(h_p) . k(h_j) + b(p, j)) v(h_j)
    z_p  = x_p + a_p;   z_p = z_p + MLP(RMSNorm(z_p))
  then num_decoder_layers - 1 ordinary causal self-attention layers over the latents only
  (transformer.DecoderLayer; latent p reads latents p' <= p), each latent at its absolute
  position p for rotary embeddings (the T5 relative bias depends on p - p' only);
  finally logits_p = W RMSNorm(z_p), trained on the next tokens of the N latents only.

With N = L the first layer is exactly a causal self-attention layer and the model is the dense
decoder-only Transformer with the same parameters (tested). Parameter tree: token_embedder and
decoder/{cross_attend_layer, latent_layers/layers_i, relpos_bias, decoder_norm, logits_dense};
the first layer's modules carry a decoder layer's names (pre_self_attention_layer_norm,
self_attention, pre_mlp_layer_norm, mlp), so `params_from_decoder_only` maps a dense decoder
checkpoint onto it (its layer 0 becomes the cross-attend layer, layer i latent layer i - 1).

Decoding (the 'cache' collection, kv_cache / decoding.generate unchanged): the first layer keeps
its keys/values for every slot (self_attention/cached_key, cached_value, so kv_cache.cache_length
finds them) and its outputs z_p per slot (cross_attend_layer/cached_output). A step at position
p costs one cross-attention of the new token over the cached slots <= p, then the latent stack
over the window of the N most recent positions p - N + 1 .. p re-gathered from cached_output
(positions before the first token are masked out), never a pass over the context. Prefill of
right-padded prompts computes the first layer for the last N positions of each row only, and
returns logits at each row's last real position (zeros elsewhere: the other rows of the window
are not what the whole-sequence model gives there, and decoding reads only the last one).
Prefill and steps give exactly the whole-sequence model's logits at position p when p is the
last input (tested).

Deviations from the paper and the authors' code (google-research/perceiver-ar):
- Padding: rows are right-padded, and the latents are always the last N *slots* of the array,
  not the last N real tokens of each row (the authors place them per row, 'final_block'). A row
  shorter than L therefore trains on fewer real targets (loss weights are zero on padding):
  pack or fill rows to L to train on N targets each.
- One pre-norm shared by the queries and keys/values of the first layer (the authors normalize
  them separately) and no learned initial query: the latents start from the embeddings of their
  own positions, as in the paper's text; this is what makes N = L a dense decoder.
- No latent dropout, no training on a random subset of inputs, one latent per position.
- The cross-attend layer is not rematerialized by remat_policy (only the latent stack is).
- Whole rows only: packed examples and prefix-LM masks are refused (ConfigError), and so are
  batches with answer choices (T-Few, rank classification): a right-padded choice need not lie in
  the last N slots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.errors import ConfigError
from efficientlm.kernels.flash_attention import RelativeBias
from efficientlm.layers import masks
from efficientlm.layers.attention import AttentionMask, padding_segment_ids
from efficientlm.layers.dense import Embed
from efficientlm.layers.position import RelativePositionBias
from efficientlm.models.config import TransformerConfig
from efficientlm.models.model import CHOICE_IS_CORRECT, DecoderOnlyModel
from efficientlm.models.stacks import embed, output_logits, token_embedder, with_structure
from efficientlm.models.transformer import (DecoderLayer, attention, feed_forward, hidden,
                                            initial_carry, layer_pattern, norm, residual_dropout,
                                            stack_layers)

_HIDDEN = ('batch', 'length', 'embed')


@dataclasses.dataclass(frozen=True)
class PerceiverArConfig:
  """num_latents: N, the positions that the latent stack runs over and the loss trains on (the
  last N of each row); sequences must have at least N tokens."""

  num_latents: int = 1024

  def __post_init__(self):
    if isinstance(self.num_latents, bool) or not isinstance(self.num_latents, int):
      raise ValueError(f'PerceiverArConfig.num_latents must be an int, got {self.num_latents!r}.')
    if self.num_latents < 1:
      raise ValueError(f'PerceiverArConfig.num_latents must be >= 1, got {self.num_latents}: '
                       'set e.g. perceiver_ar.PerceiverArConfig.num_latents = 1024.')


def check_config(cfg: TransformerConfig) -> None:
  """What the Perceiver AR stack cannot honour, with the fix (ValueError)."""
  checks = [
      (cfg.num_decoder_layers >= 1, f'num_decoder_layers must be >= 1 (the cross-attend layer), '
       f'got {cfg.num_decoder_layers}'),
      (cfg.token_mixers == ('attention',), f"token_mixers must be ('attention',) (the first "
       f'layer is a cross-attention, the latent stack dense attention), got {cfg.token_mixers}'),
      (cfg.moe is None, 'moe: Mixture-of-Experts layers are not wired into Perceiver AR: set '
       'moe = None'),
      (cfg.residual == 'standard', f"residual must be 'standard', got {cfg.residual!r}"),
      (cfg.evolving_attention is None, 'evolving_attention needs one logit shape in every layer; '
       'the first layer is [N, L], the others [N, N]: set evolving_attention = None'),
      (not cfg.parallel_block, 'parallel_block is not implemented for the cross-attend layer: set '
       'parallel_block = False'),
      (cfg.attention_window == 0, 'attention_window is not applied by Perceiver AR: set '
       'attention_window = 0'),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f'PerceiverAr: TransformerConfig.{message}.')


def params_from_decoder_only(params: Mapping[str, Any]) -> dict[str, Any]:
  """A DecoderOnly parameter tree (unscanned layers_i, or scanned `layers` with a leading axis)
  as the PerceiverAr tree of the same config: layer 0 -> cross_attend_layer, layer i ->
  latent_layers layer i - 1."""
  decoder = dict(params['decoder'])
  out = {k: v for k, v in decoder.items() if not k.startswith('layers')}
  if 'layers' in decoder:  # scanned: split the stacked axis
    out['cross_attend_layer'] = jax.tree.map(lambda a: a[0], decoder['layers'])
    if jax.tree.leaves(decoder['layers'])[0].shape[0] > 1:
      out['latent_layers'] = {'layers': jax.tree.map(lambda a: a[1:], decoder['layers'])}
  else:
    count = sum(1 for k in decoder if k.startswith('layers_'))
    out['cross_attend_layer'] = decoder['layers_0']
    if count > 1:
      out['latent_layers'] = {f'layers_{i - 1}': decoder[f'layers_{i}'] for i in range(1, count)}
  return dict(params, decoder=out)


class CrossAttendLayer(nn.Module):
  """The first layer: the latents' (queries') pre-normed cross-attention to all inputs, with a
  residual, then the MLP. Named like a decoder layer, so a dense layer's parameters load.

  Decoding (`decode`): the attention caches keys/values per slot (self_attention/cached_key,
  cached_value); this layer caches its outputs per slot (`cached_output` [b, slots, embed]).
  'init'/'prefill' return the outputs at the queries (the latent window) and write them at
  their slots; 'step' writes the one new output at its slot and returns the window of the N
  most recent slots (`window_slots` [b, N]), whose negative slots are invalid.
  """

  config: TransformerConfig
  decode: str | None = None
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_q, x_kv, mask, bias, q_positions, kv_positions, window_slots=None):
    cfg, det = self.config, self.deterministic
    pre_norm = norm(cfg, 'pre_self_attention_layer_norm')
    h_q = pre_norm(x_q)
    h_kv = h_q if x_kv is x_q else pre_norm(x_kv)
    y = attention(cfg, 'self_attention', True, self.decode, causal=True)(
        h_q, h_kv, mask, bias, q_positions, kv_positions, det)
    x = x_q + residual_dropout(cfg, y, det)
    h = feed_forward(cfg, False, causal=True)(norm(cfg, 'pre_mlp_layer_norm')(x), det)
    x = x + residual_dropout(cfg, h, det)
    if self.decode is None:
      return x
    return self._cache_outputs(x, x_kv.shape[1], q_positions, window_slots)

  def _cache_outputs(self, x, slots, q_positions, window_slots):
    batch, _, width = x.shape
    if self.decode == 'init':
      self.variable('cache', 'cached_output', jnp.zeros, (batch, slots, width), x.dtype)
      return x
    if not self.has_variable('cache', 'cached_output'):
      raise ValueError(f"{self.name}: decode={self.decode!r} needs a cache; create it with "
                       "decode='init' (efficientlm.inference.kv_cache.init_cache) first.")
    cached = self.variable('cache', 'cached_output')
    rows = jnp.arange(batch)[:, None]
    # prefill: the window's slots (clipped duplicates of slot 0 carry slot 0's own output).
    cached.value = cached.value.at[rows, q_positions].set(x.astype(cached.value.dtype))
    if self.decode == 'prefill':
      return x
    return cached.value[rows, jnp.maximum(window_slots, 0)].astype(x.dtype)


def _cache_with_layer_axis(cls):
  """With scan_layers, decoding code expects every cache leaf to have a leading layer axis
  (its batch axis 1, see decoding's beam search); the unscanned first layer stores its cache
  with a layer axis of 1 then."""
  return nn.map_variables(cls, 'cache', trans_in_fn=lambda t: jax.tree.map(lambda a: a[0], t),
                          trans_out_fn=lambda t: jax.tree.map(lambda a: a[None], t),
                          mutable=True)


class LatentStack(nn.Module):
  """num_decoder_layers - 1 causal self-attention DecoderLayers over the latents (layers_i, or
  scanned `layers`)."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, z, mask, bias, positions):
    cfg = self.config
    kinds = layer_pattern(cfg, cfg.num_decoder_layers - 1, 'decoder')
    return hidden(stack_layers(DecoderLayer, kinds, cfg, initial_carry(cfg, z),
                               (mask, bias, positions), deterministic=self.deterministic,
                               cross_attention=False, decode=None))


class PerceiverArDecoder(nn.Module):
  config: TransformerConfig
  perceiver: PerceiverArConfig
  shared_embedding: Embed

  @nn.compact
  def __call__(self, tokens, targets=None, positions=None, deterministic=True, decode=None,
               cache_length=None):
    cfg, n = self.config, self.perceiver.num_latents
    length = tokens.shape[1]
    if decode is None and self.is_initializing() and length < n:
      # Parameter shapes do not depend on the length: a short dummy (inference, upcycling)
      # initializes on a row padded to N.
      tokens = jnp.pad(tokens, ((0, 0), (0, n - length)))
      targets = None if targets is None else jnp.pad(targets, ((0, 0), (0, n - length)))
    x = embed(cfg, self.shared_embedding, tokens, deterministic)
    relpos = None
    if cfg.position_embedding == 'relative':
      relpos = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance,
                                    dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
                                    name='relpos_bias')
    layer_cls = _cache_with_layer_axis(CrossAttendLayer) if (
        decode is not None and cfg.scan_layers) else CrossAttendLayer
    first = layer_cls(cfg, decode, deterministic, name='cross_attend_layer')
    if decode is None:
      z, z_positions, z_valid = self._whole_sequence(first, relpos, x, tokens, targets)
    elif decode == 'step':
      z, z_positions, z_valid = self._step(first, relpos, x, positions, cache_length)
    elif decode in ('init', 'prefill'):
      z, z_positions, z_valid = self._prefill(first, relpos, x, targets)
    else:
      raise ValueError(f"PerceiverAr: decode = {decode!r}; choose from None, 'init', 'prefill', "
                       "'step'.")
    z = partitioning.constrain(z, _HIDDEN)
    if cfg.num_decoder_layers > 1:
      # The window is contiguous: the relative bias depends on i - j only, as over 0..N-1.
      index = jnp.arange(n, dtype=jnp.int32)[None]
      mask = masks.combine_masks(masks.make_causal_mask(index, index),
                                 masks.make_attention_mask(z_valid, z_valid))
      mask = with_structure(cfg, mask, z_valid, None, causal=True)
      bias = _bias(cfg, relpos, index, index, table=cfg.structured_masks)
      z = LatentStack(cfg, deterministic, name='latent_layers')(z, mask, bias, z_positions)
    if decode is not None:
      z = z[:, -1:]  # decoding reads the newest position only
    logits = output_logits(cfg, self.shared_embedding, z, deterministic)
    if decode in ('init', 'prefill'):
      lengths = jnp.sum(_valid(tokens, targets), axis=1)
      logits = jnp.zeros(tokens.shape + logits.shape[-1:], logits.dtype).at[
          jnp.arange(tokens.shape[0]), lengths - 1].set(logits[:, 0])
    return partitioning.constrain(logits, ('batch', 'length', 'vocab'))

  def _whole_sequence(self, first, relpos, x, tokens, targets):
    """Training and scoring: latents at the last N slots, keys/values all L."""
    cfg, n = self.config, self.perceiver.num_latents
    length = tokens.shape[1]
    if n > length:
      raise ValueError(f'PerceiverArConfig.num_latents = {n} exceeds the sequence length {length}: '
                       f'set num_latents <= {length} (e.g. --gin.perceiver_ar.PerceiverArConfig.'
                       f'num_latents={length}) or feed sequences of at least {n} tokens.')
    valid = _valid(tokens, targets)
    kv_positions = jnp.arange(length, dtype=jnp.int32)[None]
    q_positions = kv_positions[:, length - n:]
    dense = masks.combine_masks(masks.make_causal_mask(q_positions, kv_positions),
                                masks.make_attention_mask(valid[:, length - n:], valid))
    mask = dense
    if cfg.structured_masks:  # the kernels' causal structure is bottom-right aligned: exact
      ids = padding_segment_ids(valid)
      mask = AttentionMask(dense, ids[:, length - n:], ids, causal=True)
    bias = _bias(cfg, relpos, q_positions, kv_positions, table=cfg.structured_masks)
    z = first(x[:, length - n:], x, mask, bias, q_positions, kv_positions)
    return z, q_positions, valid[:, length - n:]

  def _prefill(self, first, relpos, x, targets):
    """Right-padded prompts: the first layer for each row's last N positions, the keys/values
    of all positions cached. (A dense mask: the windows start at different positions.)"""
    n = self.perceiver.num_latents
    valid = _valid(x[..., 0], targets)
    lengths = jnp.sum(valid, axis=1).astype(jnp.int32)
    window = lengths[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None]
    q_positions = jnp.maximum(window, 0)
    kv_positions = jnp.arange(x.shape[1], dtype=jnp.int32)[None]
    mask = masks.combine_masks(masks.make_causal_mask(q_positions, kv_positions),
                               masks.make_attention_mask(jnp.ones(window.shape, bool), valid))
    bias = _bias(self.config, relpos, q_positions, kv_positions)
    x_q = jnp.take_along_axis(x, q_positions[..., None], axis=1)
    z = first(x_q, x, mask, bias, q_positions, kv_positions)
    return z, window, window >= 0

  def _step(self, first, relpos, x, positions, cache_length):
    """One token per row at `positions` [b, 1]: its cross-attention over cached slots <= it."""
    cfg, n = self.config, self.perceiver.num_latents
    if positions is None or cache_length is None:
      raise ValueError("decode='step' needs positions [batch, 1] and cache_length.")
    slots = jnp.arange(cache_length, dtype=jnp.int32)
    mask = slots[None, None, None, :] <= positions[:, None, :, None]
    if cfg.attention_implementation != 'xla':  # the decode kernel reads slots 0..position
      mask = AttentionMask(mask, kv_lengths=positions[:, 0] + 1)
    bias = _bias(cfg, relpos, positions, slots[None])
    window = positions - n + 1 + jnp.arange(n, dtype=jnp.int32)[None]
    z = first(x, x, mask, bias, positions, positions, window_slots=window)
    return z, window, window >= 0


def _valid(tokens, targets):
  """Real positions (targets > 0); without targets every position is real."""
  return jnp.ones(tokens.shape, bool) if targets is None else targets > 0


def _bias(cfg: TransformerConfig, relpos, q_positions, k_positions, table: bool = False):
  """The shared T5 relative bias (None with rotary): dense [b|1, heads, q, k], or for the
  kernels its table (queries bottom-right aligned to the keys, as both our uses are)."""
  if relpos is None:
    return None
  bias = relpos(q_positions, k_positions, False)
  if not table:
    return bias
  rel_table = nn.unbox(relpos.get_variable('params', 'rel_embedding'))
  return RelativeBias(rel_table.astype(cfg.activation_dtype), cfg.relative_attention_num_buckets,
                      cfg.relative_attention_max_distance, False)


class PerceiverAr(nn.Module):
  """Perceiver AR, called like DecoderOnly; returns logits [batch, N, vocab] for the last N
  positions (decode='step': [batch, 1, vocab]; 'init'/'prefill': [batch, P, vocab], real only at
  each row's last real position)."""

  config: TransformerConfig
  perceiver: PerceiverArConfig = PerceiverArConfig()

  def setup(self):
    check_config(self.config)
    self.token_embedder = token_embedder(self.config)
    self.decoder = PerceiverArDecoder(self.config, self.perceiver, self.token_embedder)

  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, decoder_causal_attention=None, enable_dropout=False,
               decode=None, cache_length=None):
    if decoder_segment_ids is not None or (decoder_positions is not None and decode != 'step'):
      raise ConfigError('Perceiver AR places its latents at the last N slots of whole rows and '
                        'does not support packed examples: set DatasetConfig.pack = False (e.g. '
                        '--gin.train/data_config.DatasetConfig.pack=False and the same for eval/).')
    if decoder_causal_attention is not None:
      raise ConfigError('Perceiver AR is causal and has no prefix-LM mask: train it as a plain '
                        'decoder-only LM (DecoderOnlyModel.prefix_lm = False).')
    return self.decoder(decoder_input_tokens, decoder_target_tokens, decoder_positions,
                        deterministic=not enable_dropout, decode=decode,
                        cache_length=cache_length)


_LATENT_FEATURES = ('decoder_target_tokens', 'decoder_loss_weights')


class _LatentTargets(Mapping):
  """A batch as the loss sees it: targets and loss weights of the last N positions only; the
  module still reads the whole batch (`full`)."""

  def __init__(self, full: Mapping[str, jax.Array], num_latents: int):
    self.full, self.num_latents = full, num_latents

  def __getitem__(self, key: str) -> jax.Array:
    value = self.full[key]
    return value[:, -self.num_latents:] if key in _LATENT_FEATURES else value

  def __iter__(self) -> Iterator[str]:
    return iter(self.full)

  def __len__(self) -> int:
    return len(self.full)


def _latent_targets(batch: Mapping[str, jax.Array], num_latents: int) -> _LatentTargets:
  if CHOICE_IS_CORRECT in batch:
    # A choice sits after its prompt in a right-padded row, so the last N slots need not hold
    # it: the loss and scores would count other positions than the choice's.
    raise ConfigError(
        'Perceiver AR trains and scores only the last N slots of each row (num_latents = '
        f'{num_latents}), which in a batch with answer choices (a task like '
        'stdlib_code_next_line: T-Few\'s losses, rank classification, runs/tfew.gin) need not '
        'hold the choice: use a decoder-only (e.g. models/decoder/tiny.gin) or encoder-decoder '
        'model for such a task, or train Perceiver AR on a language-modeling task.')
  return _LatentTargets(batch, num_latents)


@dataclasses.dataclass(frozen=True)
class PerceiverArModel(DecoderOnlyModel):
  """A DecoderOnlyModel whose loss and scores count only the latent positions (the last N
  targets of each row): the module's logits cover only those."""

  def __post_init__(self):
    if not isinstance(self.module, PerceiverAr):
      raise ValueError(f'PerceiverArModel needs a PerceiverAr module, got '
                       f'{type(self.module).__name__}: bind perceiver_ar.PerceiverArModel.module '
                       '= @perceiver_ar.PerceiverAr().')
    if self.prefix_lm:
      raise ValueError('PerceiverArModel is a causal LM: set prefix_lm = False.')

  @property
  def num_latents(self) -> int:
    return self.module.perceiver.num_latents

  def _inputs(self, batch):
    return super()._inputs(batch.full if isinstance(batch, _LatentTargets) else batch)

  def loss_sums(self, params, batch, rng=None):
    return super().loss_sums(params, _latent_targets(batch, self.num_latents), rng)

  def token_scores(self, params, batch):
    """log p(target) at the latent positions [batch, L] (zero before them and on padding)."""
    scores = super().token_scores(params, _latent_targets(batch, self.num_latents))
    before = batch['decoder_input_tokens'].shape[1] - scores.shape[1]
    return jnp.pad(scores, ((0, 0), (before, 0)))
