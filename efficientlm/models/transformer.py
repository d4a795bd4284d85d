"""Pre-norm Transformer layers and the stack that repeats them (unrolled or nn.scan, remat)."""

from __future__ import annotations

import flax.linen as nn
import jax

from efficientlm.layers.attention import MultiHeadAttention
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.norms import RMSNorm
from efficientlm.models.config import TransformerConfig

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def norm(cfg: TransformerConfig, name: str) -> RMSNorm:
  return RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.activation_dtype,
                 param_dtype=cfg.weight_dtype, name=name)


def attention(cfg: TransformerConfig, name: str, self_attention: bool) -> MultiHeadAttention:
  return MultiHeadAttention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
      dropout_rate=cfg.dropout_rate, scale_logits=cfg.scale_attention_logits,
      # Rotary embeddings encode positions within a sequence: not for cross-attention.
      rotary=self_attention and cfg.position_embedding == 'rotary',
      rotary_max_wavelength=cfg.rotary_max_wavelength,
      float32_logits=cfg.float32_attention_logits, dtype=cfg.activation_dtype,
      param_dtype=cfg.weight_dtype, name=name)


def residual_dropout(cfg: TransformerConfig, x: jax.Array, deterministic: bool) -> jax.Array:
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Bidirectional self-attention and MLP, each pre-normed with a residual."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask, bias, positions):
    cfg, det = self.config, self.deterministic
    h = norm(cfg, 'pre_attention_layer_norm')(x)
    h = attention(cfg, 'attention', True)(h, h, mask, bias, positions, positions, det)
    x = x + residual_dropout(cfg, h, det)
    h = norm(cfg, 'pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, intermediate_dropout_rate=cfg.dropout_rate,
                 dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, name='mlp')(h, det)
    return x + residual_dropout(cfg, h, det), None


class DecoderLayer(nn.Module):
  """Causal self-attention, optional cross-attention to the encoder, and MLP."""

  config: TransformerConfig
  deterministic: bool = True
  cross_attention: bool = True

  @nn.compact
  def __call__(self, x, mask, bias, positions, encoded=None, encoder_decoder_mask=None):
    cfg, det = self.config, self.deterministic
    h = norm(cfg, 'pre_self_attention_layer_norm')(x)
    h = attention(cfg, 'self_attention', True)(h, h, mask, bias, positions, positions, det)
    x = x + residual_dropout(cfg, h, det)
    if self.cross_attention:
      h = norm(cfg, 'pre_cross_attention_layer_norm')(x)
      h = attention(cfg, 'encoder_decoder_attention', False)(
          h, encoded, encoder_decoder_mask, deterministic=det)
      x = x + residual_dropout(cfg, h, det)
    h = norm(cfg, 'pre_mlp_layer_norm')(x)
    h = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, intermediate_dropout_rate=cfg.dropout_rate,
                 dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, name='mlp')(h, det)
    return x + residual_dropout(cfg, h, det), None


def stack_layers(layer_cls, num_layers: int, cfg: TransformerConfig, x: jax.Array,
                 broadcast_args: tuple, **layer_kwargs) -> jax.Array:
  """Applies `num_layers` copies of `layer_cls` to `x`, inside the calling module's scope.

  Unscanned, the layers are named layers_0 ... layers_{n-1} (T5X checkpoint names). With
  `cfg.scan_layers` they are one nn.scan named `layers` whose parameters carry a leading axis of
  length n (logical name 'layers'), so compile time does not grow with depth.
  """
  cls = layer_cls
  if cfg.remat_policy != 'none':
    # prevent_cse is unnecessary inside scan and costs performance there.
    cls = nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(cls, variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast,) * len(broadcast_args), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = scanned(config=cfg, name='layers', **layer_kwargs)(x, *broadcast_args)
    return x
  for i in range(num_layers):
    x, _ = cls(config=cfg, name=f'layers_{i}', **layer_kwargs)(x, *broadcast_args)
  return x
