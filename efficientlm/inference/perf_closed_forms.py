"""The paper's closed forms: communication per layout, optimal splits, crossovers, max context.

Pope et al. 2022 ("Efficiently Scaling Transformer Inference"), section 3.2 (feed-forward
layouts, paper mode: T = bytes / W per chip) and section 3.3 / Table 1 (KV cache sizes). Pure
Python; `model` is a `perf_model.ModelSpec` (only its fields are read).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from efficientlm.inference.hardware import Hardware, get_hardware
from efficientlm.inference.layout_spec import AXIS_GROUPS, MESH_AXES
from efficientlm.inference.perf_collectives import group_size, parse_mesh

CONTEXT_ATTENTION = ('multihead', 'multiquery_heads', 'multiquery_batch')


def ffn_comm_time_1d(tokens: float, d_model: int, bandwidth: float,
                     act_bytes: int = 2) -> float:
  """1D weight-stationary MLP: all-gather + reduce-scatter of B L E, 2BLE / W (section 3.2.1)."""
  return 2 * tokens * d_model * act_bytes / bandwidth


def ffn_comm_time_2d(tokens: float, d_model: int, d_ff: int, x: int, yz: int, bandwidth: float,
                     act_bytes: int = 2) -> float:
  """2D weight-stationary MLP: 2BL(E/X + F/(YZ)) / W (section 3.2.2)."""
  return 2 * tokens * (d_model / x + d_ff / yz) * act_bytes / bandwidth


def ffn_comm_time_weight_gathered(tokens: float, d_model: int, d_ff: int, gather_chips: int,
                                  num_chips: int, bandwidth: float, act_bytes: int = 2,
                                  weight_bytes: int = 2) -> float:
  """Weight-gathered over N chips: (2EF N/n [weights] + 2BLE/N [activations]) / W (3.2.3)."""
  weights = 2 * d_model * d_ff * gather_chips / num_chips * weight_bytes
  return (weights + 2 * tokens * d_model / gather_chips * act_bytes) / bandwidth


def optimal_x(num_chips: int, d_model: int, d_ff: int) -> float:
  """2D weight-stationary: the X minimising E/X + F X/n is sqrt(nE/F) (section 3.2.2)."""
  return math.sqrt(num_chips * d_model / d_ff)


def optimal_gather_chips(tokens: float, num_chips: int, d_ff: int) -> float:
  """Weight-gathered: the N minimising EF N/n + BLE/N is sqrt(BL n/F) (section 3.2.3)."""
  return math.sqrt(tokens * num_chips / d_ff)


def ws_1d_2d_tie_chips(d_model: int, d_ff: int) -> float:
  """Chips where optimal 2D (4BL sqrt(EF/n)/W) equals 1D (2BLE/W): n = 4F/E (section 3.2.2)."""
  return 4 * d_ff / d_model


def layer_traffic(model, ffn: str, mesh_shape: Mapping[str, int] | Sequence[int],
                  act_bytes: int = 2, weight_bytes: int = 2) -> tuple[float, float]:
  """Paper-mode traffic of one decoder layer with head-sharded attention, in closed form.

  Returns (fixed, per_token): the layer's communication takes (fixed + B L per_token) / W, where
  all-reduce bytes count twice. This is the paper's section 3.2 formulas with the plain MLP's
  widths replaced by the whole layer's, read off the contract in `layout_spec.py`: the F-side
  collectives move (G+1)F + (2H + 2K')D per row (fused or not, the total is the same), the
  E-side pair moves 2E/|Ain| per row once per block (twice for a serial layer), the weight-
  gathered layouts gather every sharded matrix of the layer, (G+1)EF + 2EHD + 2EK'D.
  """
  mesh = parse_mesh(mesh_shape)
  ab, ain, aout = AXIS_GROUPS[ffn]
  n_b, n_in, n_out = (group_size(mesh, a) for a in (ab, ain, aout))
  n = group_size(mesh, MESH_AXES)
  e, f, h, k, d = (model.d_model, model.d_ff, model.num_heads, model.num_kv_heads,
                   model.head_dim)
  g = 2 if model.gated else 1
  k_fused = k if k % (n_in * n_out) == 0 else 0  # sharded KV (contract)
  blocks = 1 if model.parallel_block else 2
  fixed = 0.0
  if n_b > 1:
    fixed = n_b / n * ((g + 1) * e * f + 2 * e * h * d + 2 * e * k_fused * d) * weight_bytes
  per_row = 0.0
  if n_out > 1:
    per_row += blocks * 2 * e / n_in * act_bytes
  if n_in > 1:
    per_row += blocks * 2 * 4  # RMSNorm sum of squares, f32, all-reduced
    per_row += ((g + 1) * f + (2 * h + 2 * k_fused) * d) / n_out * act_bytes
    if not k_fused:
      per_row += 2 * 2 * k * d * act_bytes  # replicated k, v all-reduced
  return fixed, per_row / n_b


def ffn_crossover_tokens(model, mesh_shape: Mapping[str, int] | Sequence[int],
                         act_bytes: int = 2, weight_bytes: int = 2) -> dict[str, float]:
  """Tokens per batch (B L) where prefill's best layout switches 2D -> X -> XY -> XYZ.

  Solves T_2D = T_WG(X), T_WG(X) = T_WG(XY), T_WG(XY) = T_WG(XYZ) for B L with `layer_traffic`
  (paper mode, head-sharded attention). For a plain MLP alone these are the paper's forms:
  B L = E w/a, F X (XY)/n w/a, and F XY (1 - XY/n) w/a (w, a: weight and activation bytes;
  the last because XYZ moves no activations, where the paper's 2BLE/N would keep 2BLE/n).
  math.inf where the later layout never wins.
  """
  names = ('2d', 'wg_x', 'wg_xy', 'wg_xyz')
  lines = {name: layer_traffic(model, name, mesh_shape, act_bytes, weight_bytes)
           for name in names}
  crossovers = {}
  for before, after in zip(names, names[1:]):
    (f0, c0), (f1, c1) = lines[before], lines[after]
    crossovers[f'{before}->{after}'] = (f1 - f0) / (c0 - c1) if c0 > c1 else math.inf
  return crossovers


def max_context_length(model, hardware: str | Hardware, num_chips: int, batch: int,
                       attention: str, kv_fraction: float = 0.3, kv_bytes: int = 2) -> int:
  """Longest context whose KV cache fits in `kv_fraction` of HBM (Table 1, section 3.3).

  'multihead' keeps H KV heads (the model's H and D) split min(n, H) ways; 'multiquery_heads'
  keeps K heads split min(n, K) ways (K = 1: every chip holds the whole cache);
  'multiquery_batch' splits the batch min(n, B) ways.
  """
  hw = get_hardware(hardware)
  if attention == 'multihead':
    heads, shards = model.num_heads, min(num_chips, model.num_heads)
  elif attention == 'multiquery_heads':
    heads, shards = model.num_kv_heads, min(num_chips, model.num_kv_heads)
  elif attention == 'multiquery_batch':
    heads, shards = model.num_kv_heads, min(num_chips, batch)
  else:
    raise ValueError(f'attention {attention!r} not in {CONTEXT_ATTENTION}.')
  per_token = 2 * model.num_layers * heads * model.head_dim * kv_bytes
  return int(kv_fraction * hw.hbm_bytes * shards // (batch * per_token))
