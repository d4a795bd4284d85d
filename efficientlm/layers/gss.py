"""GSS: the Gated State Space token mixer (Mehta et al. 2023, "Long Range Language Modeling via
Gated State Spaces", Fig. 1), causal, with recurrent decoding.

For inputs x [L, E] (already normed by the layer):
  v = gelu(x W_v)                  [L, F]   F = expansion x E (the gated width)
  u = gelu(x W_u)                  [L, H]   H = the reduced SSM width (E / 4 in the paper)
  y = DSS(u)                       [L, H]   a diagonal SSM per channel (ssm.py)
  o = ((y W_c) * v) W_o            [L, E]

The SSM runs on H < E channels and the multiplicative gate supplies the nonlinearity, which is
why GSS trains faster than DSS at the same quality (the paper's claim). GSS-Hybrid interleaves attention
layers for short-range dependencies: here a token_mixers pattern such as
('gss', 'gss', 'gss', 'attention') with TransformerConfig.attention_window for local attention.

Deviations: the paper's GSS layer replaces the whole Transformer block; here it is the token
mixer of a layer that keeps its feed-forward block (set a small mlp_dim to approach the paper's
parameter split). The SSM is S4D-Lin with ZOH (DSS-exp differs only in C's normalization) and
keeps its D skip term. Projections have no biases (T5 convention).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import ssm
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.ssm import SsmConfig


@dataclasses.dataclass(frozen=True)
class GssConfig:
  """A GSS layer (configs/models/gss/)."""

  ssm: SsmConfig = SsmConfig()
  expansion: int = 4  # F = expansion x emb_dim
  ssm_reduction: int = 4  # H = emb_dim // ssm_reduction

  def __post_init__(self):
    if self.expansion < 1 or self.ssm_reduction < 1:
      raise ValueError(f'GssConfig: expansion and ssm_reduction must be >= 1, got '
                       f'{self.expansion}, {self.ssm_reduction}.')

  def widths(self, emb_dim: int) -> tuple[int, int]:
    """(F, H) for a model of width emb_dim."""
    if emb_dim % self.ssm_reduction:
      raise ValueError(f'GssConfig: emb_dim {emb_dim} is not a multiple of ssm_reduction '
                       f'{self.ssm_reduction}.')
    return self.expansion * emb_dim, emb_dim // self.ssm_reduction


class Gss(nn.Module):
  """Called like MultiHeadAttention (self-attention arguments; bias and positions unused);
  `decode` as layers.h3.H3 (one recurrent state [b, H, N/2] complex)."""

  config: GssConfig
  decode: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, q_positions=None,
               kv_positions=None, deterministic=True):
    del inputs_kv, bias, q_positions, kv_positions, deterministic  # self-mixing, no dropout
    cfg, emb = self.config, inputs_q.shape[-1]
    gated, reduced = cfg.widths(emb)

    def dense(name, features, axes, x):
      return DenseGeneral(features, axes, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)(x)

    v = jax.nn.gelu(dense('gate', gated, ('embed', 'mlp'), inputs_q))
    v = partitioning.constrain(v, ('batch', 'length', 'mlp'))
    u = jax.nn.gelu(dense('ssm_in', reduced, ('embed', 'ssm_channels'), inputs_q))
    diagonal = ssm.DiagonalSsm(cfg.ssm, reduced, param_dtype=self.param_dtype, name='ssm')
    y = ssm.apply_recurrent(self, diagonal, u, mask, self.decode)
    uc = dense('ssm_out', gated, ('ssm_channels', 'mlp'), y.astype(self.dtype))
    out = dense('out', emb, ('mlp', 'embed'), uc * v)
    return partitioning.constrain(out, ('batch', 'length', 'embed'))


def parameter_count(config: GssConfig, emb_dim: int) -> int:
  """Weights of one GSS layer: four projections and H diagonal SSMs."""
  gated, reduced = config.widths(emb_dim)
  return (2 * emb_dim * gated + emb_dim * reduced + reduced * gated
          + reduced * (2 + config.ssm.modes * 4))
