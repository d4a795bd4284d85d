"""Pre-norm Transformer layers and the stack that repeats them (unrolled or nn.scan, remat).

A layer is described by its `LayerKind`: which token mixer it uses (TransformerConfig.
token_mixers) and whether its feed-forward is a Mixture of Experts (MoeConfig's layout). The
stack repeats the shortest period of that pattern under nn.scan.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.layers.attention import MultiHeadAttention
from efficientlm.layers.block_recurrent import RECURRENT, BlockRecurrent
from efficientlm.layers.fourier_mixing import FourierConfig, FourierMixer
from efficientlm.layers.gss import Gss
from efficientlm.layers.h3 import H3
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.moe.layer import MOE_COLLECTION, MoeLayer
from efficientlm.layers.norms import RMSNorm
from efficientlm.layers.sparse_ffn import SparseMlpBlock
from efficientlm.layers.ssm import S4dMixer
from efficientlm.models.config import TransformerConfig

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def norm(cfg: TransformerConfig, name: str) -> RMSNorm:
  return RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.activation_dtype,
                 param_dtype=cfg.weight_dtype, name=name)


def attention(cfg: TransformerConfig, name: str, self_attention: bool,
              decode: str | None = None, causal: bool = False, mixer: str = 'attention',
              layer_index: int = 0) -> MultiHeadAttention:
  """`decode`: None for whole sequences, else the KV-cache mode (see MultiHeadAttention).
  Self-attention evolves its logits when the config says so (`causal`: the decoder's); `mixer`
  'bigbird' makes it block-sparse (with layer `layer_index`'s random blocks), 'lsh' Reformer's.
  Self-attention takes the Scaling Transformer's sparse Q/K/V projections when configured."""
  return MultiHeadAttention(
      sparse_qkv=cfg.sparse_qkv if self_attention else None,
      evolving=cfg.evolving_attention if self_attention else None, causal=causal,
      bigbird=cfg.bigbird if mixer == 'bigbird' else None,
      lsh=cfg.lsh if mixer == 'lsh' else None, layer_index=layer_index,
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      dropout_rate=cfg.dropout_rate, scale_logits=cfg.scale_attention_logits,
      # Rotary embeddings encode positions within a sequence: not for cross-attention.
      rotary=self_attention and cfg.position_embedding == 'rotary',
      rotary_max_wavelength=cfg.rotary_max_wavelength,
      float32_logits=cfg.float32_attention_logits, decode=decode,
      attention_implementation=cfg.attention_implementation, ia3=cfg.ia3,
      cross_attention=not self_attention, dtype=cfg.activation_dtype,
      param_dtype=cfg.weight_dtype, name=name)


def feed_forward(cfg: TransformerConfig, sparse: bool, causal: bool,
                 decode: str | None = None) -> nn.Module:
  """The layer's `mlp`: a dense MLP, or a Mixture-of-Experts layer where the layout says so.
  With cfg.sparse_ffn the dense MLP is the Scaling Transformer's sparse one, which computes only
  its selected units at decode='step'."""
  if sparse:
    return MoeLayer(cfg.moe, cfg.moe.expert_mlp_dim or cfg.mlp_dim, cfg.mlp_activations,
                    causal=causal, dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
                    ia3=cfg.ia3, name='mlp')
  if cfg.sparse_ffn is not None:
    return SparseMlpBlock(cfg.mlp_dim, cfg.sparse_ffn, cfg.mlp_activations,
                          intermediate_dropout_rate=cfg.dropout_rate, decode=decode == 'step',
                          dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, name='mlp')
  return MlpBlock(cfg.mlp_dim, cfg.mlp_activations, intermediate_dropout_rate=cfg.dropout_rate,
                  ia3=cfg.ia3, dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, name='mlp')


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """What distinguishes one layer of a stack from another (hashable: scan periods compare it)."""

  sparse: bool = False  # a Mixture-of-Experts feed-forward
  mixer: str = 'attention'  # TransformerConfig.token_mixers


def sparse_pattern(cfg: TransformerConfig, num_layers: int, stack: str) -> tuple[bool, ...]:
  if cfg.moe is None:
    return (False,) * num_layers
  return cfg.moe.sparse_layers(num_layers, stack)


def layer_pattern(cfg: TransformerConfig, num_layers: int, stack: str) -> tuple[LayerKind, ...]:
  """Each layer's kind: the MoE layout and the token-mixer pattern combined."""
  return tuple(LayerKind(sparse, mixer) for sparse, mixer in
               zip(sparse_pattern(cfg, num_layers, stack),
                                             cfg.mixer_pattern(num_layers, stack)))


class FourierTokenMixer(nn.Module):
  """FNet's mixer called like self-attention: padding (from the mask) is zeroed first."""

  config: FourierConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, q_positions=None,
               kv_positions=None, deterministic=True):
    del inputs_kv, bias, q_positions, kv_positions, deterministic
    ids = getattr(mask, 'q_segment_ids', None)
    valid = None if ids is None else ids > 0
    return FourierMixer(self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='fourier')(inputs_q, valid)


def token_mixer(cfg: TransformerConfig, mixer: str, name: str, causal: bool,
                decode: str | None = None, layer_index: int = 0) -> nn.Module:
  """The self-attention sub-layer's module for `mixer` (a TransformerConfig.TOKEN_MIXERS name),
  under the T5X name of the attention it replaces, called like MultiHeadAttention.

  Attention-like mixers keep the attention's parameters (query, key, value, out), so a dense
  checkpoint loads into BigBird layers unchanged; LSH layers have no 'key' (queries are keys)."""
  if mixer in ('attention', 'bigbird', 'lsh'):
    return attention(cfg, name, True, decode, causal, mixer, layer_index)
  kwargs = dict(dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, name=name)
  if mixer == 'h3':
    return H3(cfg.h3, cfg.num_heads * cfg.head_dim, decode, **kwargs)
  if mixer == 'gss':
    return Gss(cfg.gss, decode, **kwargs)
  if mixer == 's4d':
    return S4dMixer(cfg.s4d, cfg.num_heads * cfg.head_dim, decode, **kwargs)
  if mixer == 'fnet':
    return FourierTokenMixer(cfg.fourier, **kwargs)
  if mixer in ('block_recurrent', 'block_window'):
    block = dataclasses.replace(cfg.block_recurrent, recurrent=mixer == 'block_recurrent')
    return BlockRecurrent(block, cfg.num_heads, cfg.head_dim, decode, **kwargs)
  raise ValueError(f'Unknown token mixer {mixer!r}.')  # TransformerConfig has checked it


def residual_dropout(cfg: TransformerConfig, x: jax.Array, deterministic: bool) -> jax.Array:
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


# --- what the stack carries from layer to layer ------------------------------------------------
# The hidden state x, and with evolving attention also (the previous layer's logits [b, heads, q,
# k] float32, has_previous): zeros and 0 before the first layer, so that scanned layers, which
# are one traced function, see the same structure in every iteration.


def initial_carry(cfg: TransformerConfig, x: jax.Array):
  if cfg.evolving_attention is None:
    return x
  logits = jnp.zeros((x.shape[0], cfg.num_heads, x.shape[1], x.shape[1]), jnp.float32)
  return x, (logits, jnp.zeros((), jnp.float32))


def hidden(carry) -> jax.Array:
  return carry[0] if isinstance(carry, tuple) else carry


def _self_attend(module, carry, *args):
  """(output, new carry's logit state or None) of a self-attention `module` on the carry."""
  if isinstance(carry, tuple):
    return module(*args, evolving_state=carry[1])
  return module(*args), None


def _carry(x, state):
  return x if state is None else (x, state)


class EncoderLayer(nn.Module):
  """Bidirectional self-attention and MLP, each pre-normed with a residual."""

  config: TransformerConfig
  deterministic: bool = True
  sparse: bool = False
  mixer: str = 'attention'
  layer_index: int = 0  # in its stack (under scan: within the scanned block)

  @nn.compact
  def __call__(self, carry, mask, bias, positions):
    cfg, det = self.config, self.deterministic
    x = hidden(carry)
    h = norm(cfg, 'pre_attention_layer_norm')(x)
    mixer = token_mixer(cfg, self.mixer, 'attention', False, layer_index=self.layer_index)
    h, state = _self_attend(mixer, carry, h, h, mask, bias, positions, positions, det)
    x = x + residual_dropout(cfg, h, det)
    h = norm(cfg, 'pre_mlp_layer_norm')(x)
    h = feed_forward(cfg, self.sparse, causal=False)(h, det)
    return _carry(x + residual_dropout(cfg, h, det), state), None


class DecoderLayer(nn.Module):
  """Causal self-attention, optional cross-attention to the encoder, and MLP.

  `decode` (None, 'init', 'prefill', 'step') is the KV-cache mode of both attentions.
  """

  config: TransformerConfig
  deterministic: bool = True
  sparse: bool = False
  mixer: str = 'attention'
  layer_index: int = 0  # in its stack (under scan: within the scanned block)
  cross_attention: bool = True
  decode: str | None = None

  @nn.compact
  def __call__(self, carry, mask, bias, positions, encoded=None, encoder_decoder_mask=None):
    cfg, det = self.config, self.deterministic
    x = hidden(carry)
    h = norm(cfg, 'pre_self_attention_layer_norm')(x)
    mixer = token_mixer(cfg, self.mixer, 'self_attention', True, self.decode, self.layer_index)
    y, state = _self_attend(mixer, carry, h, h, mask, bias, positions, positions, det)
    if cfg.parallel_block:  # the config allows it only without cross-attention
      y = y + feed_forward(cfg, self.sparse, causal=True, decode=self.decode)(h, det)
      return _carry(x + residual_dropout(cfg, y, det), state), None
    x = x + residual_dropout(cfg, y, det)
    if self.cross_attention:
      h = norm(cfg, 'pre_cross_attention_layer_norm')(x)
      h = attention(cfg, 'encoder_decoder_attention', False, self.decode)(
          h, encoded, encoder_decoder_mask, deterministic=det)
      x = x + residual_dropout(cfg, h, det)
    h = norm(cfg, 'pre_mlp_layer_norm')(x)
    h = feed_forward(cfg, self.sparse, causal=True, decode=self.decode)(h, det)
    return _carry(x + residual_dropout(cfg, h, det), state), None


class LayerBlock(nn.Module):
  """`len(pattern)` consecutive layers (named layers_0, layers_1, ...): the unit that nn.scan
  repeats when the layers' kinds alternate."""

  layer_cls: type
  config: TransformerConfig
  pattern: tuple[LayerKind, ...]
  layer_kwargs: tuple[tuple[str, Any], ...] = ()

  @nn.compact
  def __call__(self, x, *args):
    for j, kind in enumerate(self.pattern):
      x, _ = self.layer_cls(config=self.config, name=f'layers_{j}', layer_index=j,
                            **_kind_kwargs(kind), **dict(self.layer_kwargs))(x, *args)
    return x, None


def _kind_kwargs(kind: LayerKind) -> dict[str, Any]:
  return dataclasses.asdict(kind)


def pattern_period(pattern: tuple) -> int:
  """The shortest period p (dividing the length) with pattern[i] == pattern[i % p]."""
  n = len(pattern)
  for p in range(1, n + 1):
    if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
      return p
  return n


def stack_layers(layer_cls, kinds: tuple[LayerKind, ...], cfg: TransformerConfig, x: jax.Array,
                 broadcast_args: tuple, **layer_kwargs) -> jax.Array:
  """Applies len(kinds) layers of `layer_cls` to `x` (layer i of kind kinds[i]), inside the
  calling module's scope.

  Unscanned, the layers are named layers_0 ... layers_{n-1} (T5X checkpoint names). With
  `cfg.scan_layers` they are one nn.scan named `layers` whose parameters carry a leading axis
  (logical name 'layers'), so compile time does not grow with depth. If the kinds (dense and
  sparse feed-forward, token mixers) alternate with period p > 1, the scan repeats blocks of p
  layers (layers/layers_0 ... layers/layers_{p-1}) n / p times. Each layer gets its
  `layer_index` (BigBird draws its random blocks from it); scanned layers are one traced
  function, so under scan the index is the position within the scanned block.
  """
  num_layers = len(kinds)
  cls = layer_cls
  if cfg.remat_policy != 'none':
    # prevent_cse is unnecessary inside scan and costs performance there.
    cls = nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if not cfg.scan_layers:
    for i in range(num_layers):
      x, _ = cls(config=cfg, name=f'layers_{i}', layer_index=i, **_kind_kwargs(kinds[i]),
                 **layer_kwargs)(x, *broadcast_args)
    return x
  # An irregular pattern is one block scanned once: correct, without the compile-time gain.
  period = pattern_period(kinds)
  if period == 1:
    unit, unit_kwargs = cls, dict(layer_kwargs, **_kind_kwargs(kinds[0]))
  else:
    unit = LayerBlock
    unit_kwargs = dict(layer_cls=cls, pattern=kinds[:period],
                       layer_kwargs=tuple(sorted(layer_kwargs.items())))
  scanned = nn.scan(unit, variable_axes={'params': 0, MOE_COLLECTION: 0, 'cache': 0,
                                         RECURRENT: 0},
                    split_rngs={'params': True, 'dropout': True, 'jitter': True, 'lsh': True},
                    in_axes=(nn.broadcast,) * len(broadcast_args), length=num_layers // period,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  x, _ = scanned(config=cfg, name='layers', **unit_kwargs)(x, *broadcast_args)
  return x
