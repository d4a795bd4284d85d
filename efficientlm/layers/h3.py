"""H3: the Hungry Hungry Hippos token mixer (Fu et al. 2023, "Hungry Hungry Hippos: Towards
Language Modeling with State Space Models", Algorithm 1), causal, with recurrent decoding.

For inputs u [L, d]:
  Q = u W_Q, K = u W_K, V = u W_V                                  [L, D], D = heads x d_h
  K' = SSM_shift(K)          a learned causal convolution of S taps + D_shift K (ssm.shift_conv)
  per head h (d_h channels): KV_t = K'_t (V_t)^T                    [d_h, d_h] per position
  Y = SSM_diag(KV)           one diagonal SSM per head, shared by its d_h^2 entries (ssm.py),
                             + D_h KV
  O_t = Q_t^T Y_t            [d_h] per head; heads concatenated, times W_O.

The shift SSM lets a token compare with its recent predecessors (K' remembers them) and the
multiplicative interactions with Q and V let the diagonal SSM store and recall tokens: the
paper's explanation of why H3 solves induction heads and associative recall where a plain SSM
does not (its synthetic languages).

Training runs SSM_diag as an FFT convolution over the row or in state-passing blocks
(SsmConfig.convolution); decoding runs both SSMs as recurrences: O(1) work and state per token
(the last S projected keys, and [heads x d_h^2, N/2] complex states), no KV cache.

Deviations from the paper's code (HazyResearch/H3): projections without biases and with the
attention's parameter names and shapes (query, key, value, out: D = num_heads x head_dim of
the model), as T5 layers have none; shift taps initialized N(0, 1/S) rather than N(0, 1), so
the shifted keys start at unit scale; the diagonal SSM always S4D-Lin with ZOH.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import ssm
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.ssm import SsmConfig


@dataclasses.dataclass(frozen=True)
class H3Config:
  """An H3 layer (configs/models/h3/)."""

  ssm: SsmConfig = SsmConfig()
  head_dim: int = 1  # d_h of Algorithm 1 (1 in the paper's language models)
  shift_size: int = 64  # S: taps of the shift SSM (its state size in the paper's code)

  def __post_init__(self):
    if self.head_dim < 1 or self.shift_size < 1:
      raise ValueError(f'H3Config: head_dim and shift_size must be >= 1, got {self.head_dim}, '
                       f'{self.shift_size}.')


class H3(nn.Module):
  """Called like MultiHeadAttention (self-attention arguments; bias and positions unused).

  `decode`: None (whole sequences), 'init' (create the recurrent state), 'prefill' (whole
  right-padded prompts; the state after each prompt's last real token, lengths from `mask`) or
  'step' (one token per row, continuing its state)."""

  config: H3Config
  inner_dim: int  # D: the width of Q, K, V
  decode: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, q_positions=None,
               kv_positions=None, deterministic=True):
    del inputs_kv, bias, q_positions, kv_positions, deterministic  # self-mixing, no dropout
    cfg, width = self.config, self.inner_dim
    if width % cfg.head_dim:
      raise ValueError(f'H3: the inner width {width} (num_heads x head_dim) is not a multiple '
                       f'of H3Config.head_dim {cfg.head_dim}.')
    heads, dh = width // cfg.head_dim, cfg.head_dim

    def project(name, x):
      y = DenseGeneral(width, ('embed', 'joined_kv'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)(x)
      return partitioning.constrain(y, ('batch', 'length', 'heads')).astype(jnp.float32)

    q, k, v = (project(name, inputs_q) for name in ('query', 'key', 'value'))
    taps = self.param('shift_taps', nn.with_logical_partitioning(
        nn.initializers.normal(cfg.shift_size**-0.5), ('joined_kv', 'ssm_taps')),
                      (width, cfg.shift_size), self.param_dtype).astype(jnp.float32)
    shift_d = self.param('shift_d', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('joined_kv',)), (width,),
                         self.param_dtype).astype(jnp.float32)
    diagonal = ssm.DiagonalSsm(cfg.ssm, heads, repeat=dh * dh, param_dtype=self.param_dtype,
                               name='ssm')
    batch, length = q.shape[:2]

    def outer(k_shifted, v):  # [..., D] x [..., D] -> [..., heads * dh * dh]
      lead = k_shifted.shape[:-1]
      kv = (k_shifted.reshape(lead + (heads, dh, 1)) * v.reshape(lead + (heads, 1, dh)))
      return kv.reshape(lead + (heads * dh * dh,))

    def read(q, y):  # O = Q^T Y per head
      lead = q.shape[:-1]
      out = jnp.einsum('...hi,...hij->...hj', q.reshape(lead + (heads, dh)),
                       y.reshape(lead + (heads, dh, dh)))
      return out.reshape(lead + (width,))

    if self.decode == 'step':
      if length != 1:
        raise ValueError(f"H3: decode='step' takes one token per row, got {length}.")
      shift_state = ssm.cache_variable(self, 'shift_state', (batch, width, cfg.shift_size),
                                       'step')
      recent = jnp.concatenate([k[:, 0, :, None], shift_state.value[..., :-1]], axis=-1)
      k_shifted = (jnp.einsum('bcj,cj->bc', recent, taps) + shift_d * k[:, 0])[:, None]
      shift_state.value = recent
    else:
      k_shifted = ssm.shift_conv(k, taps) + shift_d * k
      if self.decode is not None:
        self._keep_shift_state(k, mask, batch)
    y = ssm.apply_recurrent(self, diagonal, outer(k_shifted, v), mask, self.decode)
    out = DenseGeneral(inputs_q.shape[-1], ('joined_kv', 'embed'), dtype=self.dtype,
                       param_dtype=self.param_dtype, name='out')(read(q, y).astype(self.dtype))
    return partitioning.constrain(out, ('batch', 'length', 'embed'))

  def _keep_shift_state(self, k, mask, batch):
    """decode 'init': zeros; 'prefill': each prompt's last S projected keys, newest first."""
    cfg = self.config
    shift_state = ssm.cache_variable(self, 'shift_state', (batch, self.inner_dim,
                                                           cfg.shift_size), self.decode)
    if self.decode != 'prefill':
      return
    # Aligned to the end, front-padded to S.
    aligned = ssm.right_align(k, ssm.prompt_lengths(mask))[:, -cfg.shift_size:]
    aligned = jnp.pad(aligned, ((0, 0), (cfg.shift_size - aligned.shape[1], 0), (0, 0)))
    shift_state.value = jnp.flip(aligned, axis=1).transpose(0, 2, 1)


def parameter_count(config: H3Config, emb_dim: int, inner_dim: int) -> int:
  """Weights of one H3 layer: 4 projections, shift taps and skip, and the diagonal SSMs."""
  heads = inner_dim // config.head_dim
  per_ssm = 2 + config.ssm.modes * 4  # log_dt, d; log_neg_a_real, a_imag, c (2 parts)
  return 4 * emb_dim * inner_dim + inner_dim * (config.shift_size + 1) + heads * per_ssm

