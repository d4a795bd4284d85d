"""Analytical performance model of partitioned Transformer inference (pure Python, no JAX).

Pope et al. 2022, "Efficiently Scaling Transformer Inference" (the paper), and the spec
../shared/specs/inference_partitioning.md. A forward pass (a prefill of L tokens per sequence,
or one decode step) on n chips costs at least

  T = max(compute, weight memory + KV memory) + communication

compute = FLOPs / (n peak), FLOPs = 2N per token plus attention; memory = the bytes each chip
reads from HBM / HBM bandwidth; communication = the collectives `layer_collectives` lists (the
contract in `layout_spec.py`) times the layers, costed by `perf_collectives.collective_time`.
Measured latencies sit 1.25x-3x above this bound (the paper's Table 2), so a `Calibration`
(achieved FLOP and bandwidth fractions, a latency per collective) fitted to measurements turns
the bound into a prediction. Embedding and logits collectives are not modelled (not in the
contract); the embedding is taken as split over all chips.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np

from efficientlm.inference.hardware import GiB, Hardware, get_hardware
from efficientlm.inference.layout_spec import ATTENTION_LAYOUTS, FFN_LAYOUTS, Layout
from efficientlm.inference.perf_closed_forms import (  # noqa: F401  (public API)
    ffn_comm_time_1d, ffn_comm_time_2d, ffn_comm_time_weight_gathered, ffn_crossover_tokens,
    layer_traffic, max_context_length, optimal_gather_chips, optimal_x, ws_1d_2d_tie_chips)
from efficientlm.inference.perf_collectives import (  # noqa: F401  (public API)
    MODES, TimedCollective, collective_time, group_size, kv_cache_shards, layer_collectives,
    parse_mesh, sharded_kv, validate_layout)

PHASES = ('prefill', 'decode')
WEIGHT_BYTES = {'bfloat16': 2, 'bf16': 2, 'float16': 2, 'float32': 4, 'int8': 1}
OBJECTIVES = ('time', 'comm')


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Decoder-only Transformer sizes in the paper's notation (E, F, H, K, D, V)."""

  num_layers: int
  d_model: int  # E
  d_ff: int  # F
  num_heads: int  # H
  num_kv_heads: int  # K (1: multiquery)
  head_dim: int  # D
  vocab_size: int  # V
  gated: bool = True  # G = 2 input matrices (SwiGLU / GeGLU) instead of 1
  parallel_block: bool = True
  tied_embeddings: bool = True  # one V x E matrix for input and logits (PaLM)
  name: str = ''

  def __post_init__(self):
    for field in ('num_layers', 'd_model', 'd_ff', 'num_heads', 'num_kv_heads', 'head_dim',
                  'vocab_size'):
      if getattr(self, field) < 1:
        raise ValueError(f'ModelSpec {self.name}: {field} must be positive.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'ModelSpec {self.name}: num_heads {self.num_heads} is not a multiple '
                       f'of num_kv_heads {self.num_kv_heads}.')

  @property
  def params_per_layer(self) -> int:
    """E(G F + F) + 2 E H D + 2 E K D; for PaLM (G = 2, K = 1) the spec's E(3F + 2HD + 2D)."""
    e, g = self.d_model, 2 if self.gated else 1
    return (e * (g + 1) * self.d_ff + 2 * e * self.num_heads * self.head_dim
            + 2 * e * self.num_kv_heads * self.head_dim)

  @property
  def embedding_params(self) -> int:
    return self.vocab_size * self.d_model * (1 if self.tied_embeddings else 2)

  @property
  def non_embedding_params(self) -> int:
    return self.num_layers * self.params_per_layer

  @property
  def total_params(self) -> int:
    return self.non_embedding_params + self.embedding_params

  def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
    """K and V for every layer: 2 L K D bytes (section 3.3)."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value

  @classmethod
  def from_transformer_config(cls, cfg, name: str = '') -> ModelSpec:
    """The sizes of an `efficientlm.models.config.TransformerConfig` (dense, decoder-only)."""
    from efficientlm.models.config import TransformerConfig  # imports jax; keep it lazy
    if not isinstance(cfg, TransformerConfig):
      raise ValueError(f'Expected a TransformerConfig, got {type(cfg).__name__}.')
    if cfg.num_encoder_layers or cfg.moe is not None:
      raise ValueError('ModelSpec models dense decoder-only stacks; this config has '
                       f'num_encoder_layers={cfg.num_encoder_layers}, moe={cfg.moe}.')
    if len(cfg.mlp_activations) > 2:
      raise ValueError(f'mlp_activations {cfg.mlp_activations}: at most 2 input matrices.')
    return cls(num_layers=cfg.num_decoder_layers, d_model=cfg.emb_dim, d_ff=cfg.mlp_dim,
               num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads or cfg.num_heads,
               head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
               gated=len(cfg.mlp_activations) > 1, parallel_block=cfg.parallel_block,
               tied_embeddings=cfg.logits_via_embedding, name=name)


# PaLM (Chowdhery et al. 2022, Table 1; the spec's table): multiquery, SwiGLU, parallel block.
PALM_8B = ModelSpec(32, 4096, 16384, 16, 1, 256, 256128, name='palm_8b')
PALM_62B = ModelSpec(64, 8192, 32768, 32, 1, 256, 256128, name='palm_62b')
# 48 heads as trained; the paper's experiments pad to 64 (replace(num_heads=64)).
PALM_540B = ModelSpec(118, 18432, 73728, 48, 1, 256, 256128, name='palm_540b')
PALM_540B_MFU_PARAMS = 5.4e11  # the N the paper's MFU figures use


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Corrections from roofline to measured time: T = max(C/f, M/b) + comm_bw/i + hops + n lat."""

  collective_latency_s: float = 0.0  # fixed cost of launching each collective
  flops_fraction: float = 1.0  # achieved / peak FLOP/s
  bandwidth_fraction: float = 1.0  # achieved / peak HBM bandwidth
  interconnect_fraction: float = 1.0  # achieved / nominal interconnect bandwidth

  def __post_init__(self):
    if self.collective_latency_s < 0:
      raise ValueError(f'collective_latency_s {self.collective_latency_s} must be >= 0.')
    for field in ('flops_fraction', 'bandwidth_fraction', 'interconnect_fraction'):
      if not getattr(self, field) > 0:
        raise ValueError(f'Calibration.{field} {getattr(self, field)} must be positive.')


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One forward pass (prefill of `length` tokens per sequence, or one decode step)."""

  layout: Layout
  phase: str
  hardware: str
  num_chips: int
  batch: int
  length: int  # L: tokens per sequence in this pass
  context: int  # S: cached tokens read
  tokens: int  # B L
  flops: float
  compute_time: float
  weight_bytes: float  # read per chip
  weight_memory_time: float
  kv_bytes: float  # KV cache read per chip
  kv_memory_time: float
  layer_collectives: tuple[TimedCollective, ...]  # one decoder layer
  num_layers: int
  comm_time: float
  time: float
  mfu: float
  chip_seconds_per_token: float
  dollars_per_million_tokens: float | None
  weight_memory_per_chip: float  # stored weights (+ one gathered layer for weight-gathered)
  kv_cache_per_chip: float  # KV cache of B x (L + S) tokens
  hbm_bytes: float
  calibration: Calibration | None

  @property
  def memory_time(self) -> float:
    return self.weight_memory_time + self.kv_memory_time

  @property
  def collectives(self) -> tuple[TimedCollective, ...]:
    return self.layer_collectives * self.num_layers

  @property
  def num_collectives(self) -> int:
    return len(self.layer_collectives) * self.num_layers

  @property
  def comm_bandwidth_time(self) -> float:
    return self.num_layers * sum(c.bandwidth_time for c in self.layer_collectives)

  @property
  def comm_latency_time(self) -> float:
    return self.num_layers * sum(c.latency_time for c in self.layer_collectives)

  @property
  def memory_per_chip(self) -> float:
    return self.weight_memory_per_chip + self.kv_cache_per_chip

  @property
  def fits(self) -> bool:
    return self.memory_per_chip <= self.hbm_bytes


def mfu(params: float, tokens: float, seconds: float, num_chips: int, peak_flops: float) -> float:
  """Model FLOPs utilisation, 2 N tokens / (T n peak) (the paper; the spec's cost primitives)."""
  return 2 * params * tokens / (seconds * num_chips * peak_flops)


def check_fits(prediction: Prediction) -> None:
  """Raises ValueError if the weights and KV cache do not fit in one chip's HBM."""
  if prediction.fits:
    return
  p = prediction
  raise ValueError(
      f'model needs {p.memory_per_chip / GiB:.1f} GiB per chip (weights '
      f'{p.weight_memory_per_chip / GiB:.1f} GiB + KV cache {p.kv_cache_per_chip / GiB:.1f} GiB) '
      f'but {p.hardware} has {p.hbm_bytes / GiB:.1f} GiB (layout {p.layout.name}, '
      f'{p.num_chips} chips); use more chips, int8 weights, a smaller batch or context, or a '
      'batch-sharded attention layout.')


def predict(model: ModelSpec, hardware: str | Hardware,
            mesh_shape: Mapping[str, int] | Sequence[int], layout: Layout, phase: str,
            batch: int, length: int | None = None, context: int = 0,
            weight_dtype: str = 'bfloat16', act_bytes: int = 2, mode: str = 'paper',
            calibration: Calibration | None = None, mfu_params: float | None = None
            ) -> Prediction:
  """Predicts one forward pass. prefill: `length` prompt tokens per sequence after `context`
  cached ones (usually 0); decode: one token per sequence (length None or 1) over `context`."""
  hw = get_hardware(hardware)
  mesh = parse_mesh(mesh_shape)
  n = group_size(mesh, tuple(mesh))
  if phase == 'prefill':
    if length is None or length < 1:
      raise ValueError(f'prefill needs length >= 1 prompt tokens, got {length}.')
  elif phase == 'decode':
    if length not in (None, 1):
      raise ValueError(f'decode runs one token per sequence; got length={length} (pass '
                       'the cached tokens as context).')
    length = 1
  else:
    raise ValueError(f'phase {phase!r} not in {PHASES}.')
  if mode not in MODES:
    raise ValueError(f'mode {mode!r} not in {MODES}.')
  if weight_dtype not in WEIGHT_BYTES:
    raise ValueError(f'weight_dtype {weight_dtype!r} not in {sorted(WEIGHT_BYTES)}.')
  if batch < 1 or context < 0:
    raise ValueError(f'batch {batch} must be >= 1 and context {context} >= 0.')
  w = WEIGHT_BYTES[weight_dtype]
  cal = calibration or Calibration()

  per_layer = layer_collectives(model, layout, batch, length, mesh, act_bytes, w)
  timed = tuple(collective_time(c, hw, mesh, mode, cal.interconnect_fraction,
                                cal.collective_latency_s) for c in per_layer)
  comm_time = model.num_layers * sum(t.seconds for t in timed)

  # FLOPs: 2N per token (the paper, section 2) plus attention, 4 H D per (query, key) pair;
  # causal prefill sees context + (L + 1)/2 keys on average. int8 weights still compute in bf16.
  tokens = batch * length
  keys = context + (length + 1) / 2
  attention_flops = 4 * model.num_heads * model.head_dim * model.num_layers * tokens * keys
  flops = 2 * model.total_params * tokens + attention_flops
  compute_time = flops / (n * hw.peak_flops) / cal.flops_fraction

  # Weights: everything is split over all n chips except replicated k, v kernels; a weight-
  # gathered layout reads its gathered copy (|Ab| times its shard), one layer at a time.
  replicated = 0 if sharded_kv(model, layout, mesh) else (
      2 * model.d_model * model.num_kv_heads * model.head_dim)
  split = model.params_per_layer - replicated
  gathered = group_size(mesh, layout.batch_axes)
  embedding = model.embedding_params / n
  stored = (model.num_layers * (split / n + replicated) + embedding) * w
  read = (model.num_layers * (split * gathered / n + replicated) + embedding) * w
  buffer = split * gathered / n * w if gathered > 1 else 0.0
  # KV cache: split over batch (Ab, and A for batch_*) and, if sharded, heads (the contract).
  per_token = model.kv_bytes_per_token(act_bytes) / kv_cache_shards(model, layout, mesh)
  kv_read = batch * context * per_token
  bandwidth = hw.hbm_bandwidth * cal.bandwidth_fraction
  weight_time, kv_time = read / bandwidth, kv_read / bandwidth

  time = max(compute_time, weight_time + kv_time) + comm_time
  chip_seconds = n * time / tokens
  price = hw.price_per_chip_hour
  return Prediction(
      layout=layout, phase=phase, hardware=hw.name, num_chips=n, batch=batch, length=length,
      context=context, tokens=tokens, flops=flops, compute_time=compute_time,
      weight_bytes=read, weight_memory_time=weight_time, kv_bytes=kv_read,
      kv_memory_time=kv_time, layer_collectives=timed, num_layers=model.num_layers,
      comm_time=comm_time, time=time,
      mfu=mfu(mfu_params or model.total_params, tokens, time, n, hw.peak_flops),
      chip_seconds_per_token=chip_seconds,
      dollars_per_million_tokens=None if price is None else chip_seconds / 3600 * price * 1e6,
      weight_memory_per_chip=stored + buffer,
      kv_cache_per_chip=batch * (length + context) * per_token, hbm_bytes=hw.hbm_bytes,
      calibration=calibration)


def candidate_layouts(model: ModelSpec) -> list[Layout]:
  """Every valid (ffn, attention) pair with the model's own block kind."""
  block = 'parallel' if model.parallel_block else 'serial'
  layouts = []
  for ffn, attention in itertools.product(FFN_LAYOUTS, ATTENTION_LAYOUTS):
    try:
      layouts.append(Layout(ffn, attention, block))
    except ValueError:  # attention batch axes that do not split heads in this ffn layout
      continue
  return layouts


def layout_table(model: ModelSpec, hardware: str | Hardware,
                 mesh_shape: Mapping[str, int] | Sequence[int], phase: str, batch: int,
                 length: int | None = None, context: int = 0,
                 candidates: Iterable[Layout] | None = None, objective: str = 'time', **kw
                 ) -> list[tuple[Layout, Prediction | None, str]]:
  """(layout, prediction, note) per candidate, best first by `objective`; a layout whose sizes
  do not divide has no prediction and says why in the note; one that does not fit says so."""
  if objective not in OBJECTIVES:
    raise ValueError(f'objective {objective!r} not in {OBJECTIVES}.')
  mesh = parse_mesh(mesh_shape)
  rows = []
  for layout in candidates if candidates is not None else candidate_layouts(model):
    try:
      validate_layout(model, layout, batch, mesh)
    except ValueError as e:
      rows.append((layout, None, str(e)))
      continue
    p = predict(model, hardware, mesh, layout, phase, batch, length, context, **kw)
    rows.append((layout, p, '' if p.fits else 'does not fit in HBM'))
  key = (lambda p: p.time) if objective == 'time' else (lambda p: p.comm_time)
  # Predicted and fitting first, by objective; then those that do not fit; then invalid ones.
  return sorted(rows, key=lambda r: (2, 0.0) if r[1] is None else (int(not r[1].fits), key(r[1])))


def best_layout(model: ModelSpec, hardware: str | Hardware,
                mesh_shape: Mapping[str, int] | Sequence[int], phase: str, batch: int,
                length: int | None = None, context: int = 0,
                candidates: Iterable[Layout] | None = None, objective: str = 'time', **kw
                ) -> tuple[Layout, Prediction]:
  """The valid layout that fits in HBM with the least time (or communication)."""
  rows = layout_table(model, hardware, mesh_shape, phase, batch, length, context, candidates,
                      objective, **kw)
  for layout, p, _ in rows:
    if p is not None and p.fits:
      return layout, p
  predicted = [p for _, p, _ in rows if p is not None]
  if predicted:
    check_fits(min(predicted, key=lambda p: p.memory_per_chip))
  reasons = '; '.join(note for _, _, note in rows) or 'no candidates given'
  raise ValueError(f'No valid layout: {reasons}')


def fit_calibration(points: Sequence[tuple[Prediction, float]], iterations: int = 20
                    ) -> Calibration:
  """Fits a Calibration to (uncalibrated prediction, measured seconds) pairs by least squares.

  Model: measured = max(C a, M b) + n_coll lat + comm_bw c + hops, with a = 1/flops_fraction,
  b = 1/bandwidth_fraction, c = 1/interconnect_fraction, C, M, comm_bw, hops from the
  prediction. Which term of the max binds is fixed per point from the current estimate and the
  fit repeated until that stops changing. Columns are fitted in the order a, b, lat, c while they
  add rank and there are points for them; the rest (and any fitted out of range) keep their
  defaults, so 2-3 points fit the terms they can determine.
  """
  if any(p.calibration is not None for p, _ in points):
    raise ValueError('fit_calibration needs predictions made without a calibration.')
  if not points:
    raise ValueError('fit_calibration needs at least one (prediction, seconds) point.')
  compute = np.array([p.compute_time for p, _ in points])
  memory = np.array([p.memory_time for p, _ in points])
  count = np.array([float(p.num_collectives) for p, _ in points])
  comm = np.array([p.comm_bandwidth_time for p, _ in points])
  target = np.array([t for _, t in points]) - [p.comm_latency_time for p, _ in points]
  defaults = np.array([1.0, 1.0, 0.0, 1.0])
  theta = defaults.copy()
  for _ in range(iterations):
    compute_bound = compute * theta[0] >= memory * theta[1]
    columns = np.stack([np.where(compute_bound, compute, 0.0),
                        np.where(compute_bound, 0.0, memory), count, comm], axis=1)
    new = _constrained_lstsq(columns, target, defaults)
    done = np.allclose(new, theta, rtol=1e-9, atol=1e-15)
    theta = new
    if done:
      break
  return Calibration(collective_latency_s=float(theta[2]), flops_fraction=float(1 / theta[0]),
                     bandwidth_fraction=float(1 / theta[1]),
                     interconnect_fraction=float(1 / theta[3]))


def _constrained_lstsq(columns: np.ndarray, target: np.ndarray,
                       defaults: np.ndarray) -> np.ndarray:
  """Least squares over the columns that add rank; coefficients must be positive (latency >= 0),
  a column whose coefficient is not is dropped back to its default and the rest refitted."""
  scale = np.linalg.norm(columns, axis=0)
  free: list[int] = []
  for j in range(columns.shape[1]):
    trial = free + [j]
    if scale[j] == 0 or len(trial) > len(target):
      continue
    if np.linalg.matrix_rank(columns[:, trial] / scale[trial], tol=1e-9) == len(trial):
      free = trial
  while True:
    fixed = [j for j in range(columns.shape[1]) if j not in free]
    rhs = target - columns[:, fixed] @ defaults[fixed]
    theta = defaults.copy()
    if not free:
      return theta
    solution, *_ = np.linalg.lstsq(columns[:, free] / scale[free], rhs, rcond=None)
    theta[free] = solution / scale[free]
    bad = [j for j in free if theta[j] < 0 or (j != 2 and theta[j] == 0)]
    if not bad:
      return theta
    free.remove(min(bad, key=lambda j: theta[j]))
