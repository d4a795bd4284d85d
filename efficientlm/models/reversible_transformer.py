"""Transformer stacks with reversible residuals (TransformerConfig.residual = 'reversible').

RevNet's coupling (Gomez et al. 2017, Sec. 3) as the Reformer uses it (Kitaev et al. 2020,
Sec. 3), layer i acting on two streams:

  y1 = x1 + F_i(x2),   F_i(x) = Mixer_i(norm(x))               (the layer's token mixer)
  y2 = x2 + G_i(y1),   G_i(x) = MLP_i(norm(x))                  (its dense feed-forward)

applied by models/reversible.ReversibleStack, whose custom VJP recomputes each layer's inputs
from its outputs, so activation memory does not grow with depth. The stack's input enters both
streams, (x1, x2) = (x, x), and leaves as (y1 + y2) / 2 (ReversibleConfig output 'mean'), so the
final norm and the logits keep their d_model width.

Parameters: F_i and G_i are built from the same modules, under the same names, as the standard
layer i: layers_i/{pre_self_attention_layer_norm, self_attention, pre_mlp_layer_norm, mlp} in
a decoder, layers_i/{pre_attention_layer_norm, attention, ...} in an encoder. A standard
checkpoint's tree is a reversible model's tree (the function differs: it is not a conversion
that keeps outputs).

Deviations and choices:
- An encoder-decoder's decoder puts its cross-attention into F, as a sub-block on the mixer's
  output: F_i(x) = a + c, a = Mixer_i(norm(x)), c = CrossAttention_i(norm(x + a), encoded).
  F may be any function of x2 (and of the encoder output, which gets its gradient through the
  custom VJP), so the layer stays exactly invertible; the names are the standard layer's
  (pre_cross_attention_layer_norm, encoder_decoder_attention).
- Residual dropout is applied to each branch output (inside F and G), as in the standard layer;
  the reversible core regenerates the same masks in its backward pass. Feed-forward chunks fold
  the chunk index into G's key, so chunked and unchunked masks differ (equal in distribution).
- The two streams are kept in float32 whatever the activation dtype (the branches compute in
  it): the backward pass reconstructs x = y - F(.), which rounds at the scale of |y|.
- Not supported (TransformerConfig raises): MoE feed-forward layers (sown auxiliary losses),
  evolving attention, parallel_block, scan_layers, remat.

Decoding (`decode` 'init' / 'prefill' / 'step', the KV cache in the 'cache' collection): no
gradient is taken, so ReversibleStack (decode=True) runs the same F_i and G_i as a plain forward
pass, y1 = x1 + F_i(x2), y2 = x2 + G_i(y1), with the mode passed to the token mixer (and the
cross-attention) as in a standard DecoderLayer, the streams in float32 from (x, x) and combined
as in training. Parameters are the training tree, so a trained checkpoint decodes, and layer
i's cache sits where a standard layer's does (layers_i/self_attention/cached_key ...), so
inference/kv_cache.py reads it unchanged. Feed-forward chunking only saves training memory
(values equal unchunked), so decoding applies G unchunked, whatever the step's length.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.models.config import TransformerConfig
from efficientlm.models.reversible import ReversibleConfig, ReversibleStack
from efficientlm.models.transformer import (LayerKind, attention, feed_forward, norm,
                                            residual_dropout, token_mixer)


class MixerBranch(nn.Module):
  """F of a reversible layer: pre-norm + the layer's token mixer (+ cross-attention)."""

  config: TransformerConfig
  causal: bool  # the decoder's self-attention (its T5X names are self_attention ...)
  mixer: str = 'attention'
  layer_index: int = 0
  cross_attention: bool = False
  deterministic: bool = True
  decode: str | None = None  # the KV-cache mode (decoding only; see the module docstring)

  @nn.compact
  def __call__(self, x, mask, bias, positions, encoded=None, encoder_decoder_mask=None):
    cfg, det = self.config, self.deterministic
    name = 'self_attention' if self.causal else 'attention'
    h = norm(cfg, f'pre_{name}_layer_norm')(x)
    h = token_mixer(cfg, self.mixer, name, self.causal, self.decode, self.layer_index)(
        h, h, mask, bias, positions, positions, det)
    y = residual_dropout(cfg, h, det).astype(x.dtype)
    if not self.cross_attention:
      return y
    h = norm(cfg, 'pre_cross_attention_layer_norm')(x + y)
    h = attention(cfg, 'encoder_decoder_attention', False, self.decode)(
        h, encoded, encoder_decoder_mask, deterministic=det)
    return y + residual_dropout(cfg, h, det).astype(x.dtype)


class FeedForwardBranch(nn.Module):
  """G of a reversible layer: pre-norm + the dense MLP (position-wise: may run in chunks)."""

  config: TransformerConfig
  causal: bool
  deterministic: bool = True
  decode: str | None = None  # 'step': a sparse FFN computes only its selected units

  @nn.compact
  def __call__(self, x):
    cfg, det = self.config, self.deterministic
    h = norm(cfg, 'pre_mlp_layer_norm')(x)
    h = feed_forward(cfg, False, self.causal, self.decode)(h, det)
    # In the streams' dtype (float32): the custom VJP pulls float32 cotangents back through it.
    return residual_dropout(cfg, h, det).astype(x.dtype)


def stack_config(cfg: TransformerConfig, num_layers: int) -> ReversibleConfig:
  """The reversible core's config for a stack of `num_layers` layers."""
  return ReversibleConfig(num_layers, ff_chunks=cfg.reversible_ff_chunks, output='mean')


def reversible_stack_layers(kinds: tuple[LayerKind, ...], cfg: TransformerConfig, x: jax.Array,
                            args: tuple, causal: bool, deterministic: bool,
                            cross_attention: bool = False,
                            decode: str | None = None) -> jax.Array:
  """len(kinds) reversible layers over x, their parameters layers_0 ... layers_{n-1} directly in
  the calling module's scope (as stack_layers' unscanned layers). `args`: (mask, bias,
  positions), then (encoded, encoder_decoder_mask) with `cross_attention`. `decode`: the
  KV-cache mode (None: whole sequences through the custom-gradient core)."""
  def make_f(i: int) -> MixerBranch:
    return MixerBranch(cfg, causal, kinds[i].mixer, i, cross_attention, deterministic, decode)

  def make_g(i: int) -> FeedForwardBranch:
    del i  # every layer's G is the same module; its parameters are layers_i's
    return FeedForwardBranch(cfg, causal, deterministic, decode)

  stack = ReversibleStack(stack_config(cfg, len(kinds)), make_f, make_g, deterministic,
                          decode=decode is not None, name='reversible')
  # Share the caller's scope: layers_i sit where the standard stack puts them, not under
  # 'reversible/', so the two trees are the same.
  nn.share_scope(stack.parent, stack)
  return stack(x.astype(jnp.float32), *args).astype(cfg.activation_dtype)
