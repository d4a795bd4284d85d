"""One decoder layer under a `Layout` on an ('x', 'y', 'z') mesh: sizes, checks and specs.

`LayerPlan` is what the shard_map bodies (layout_ffn, layout_attention, layouts) and the weight
placement share: the axis groups of layout_spec (Ab batch, Ain E inside the matmuls, Aout F and
heads, Ah = Aout + Ain heads in attention, A the attention batch axes), how each weight, the KV
cache and the residual stream are partitioned, and the divisibility checks, which raise a
ValueError naming the layout, the dimension, its size and the mesh axes.

Storage order. Weight-gathered layouts store a W_in-like matrix with its F (or heads) columns
split over Aout + Ab, Ab minor, so that the all-gather over Ab yields one contiguous F_Aout
chunk (the contract's `E F_xyz`, the same bytes). Query heads are held in the order of
`head_order` = (Ah without A) + A: the attention all-to-all over A then hands each chip a
contiguous range of heads, so grouped KV heads stay a slice. Where that order differs from the
(Aout, Ain) order of the reduce-scatter (2d with batch_z or batch_yz), the query and out kernels
are stored with their head chunks permuted (`head_permutation`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from efficientlm.inference import quantization
from efficientlm.inference.layout_spec import MESH_AXES, Layout
from efficientlm.models.config import TransformerConfig

Axes = tuple[str, ...]
NORMS = ('pre_self_attention_layer_norm', 'pre_mlp_layer_norm')
ATTENTION_KERNELS = ('query', 'key', 'value', 'out')


def mesh_sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
  if tuple(mesh.axis_names) != MESH_AXES:
    raise ValueError(f'Inference layouts need a mesh with axes {MESH_AXES} (in that order), got '
                     f'{tuple(mesh.axis_names)}; build it with '
                     f'partitioning.create_mesh((X, Y, Z), {MESH_AXES}).')
  return dict(mesh.shape)


def spec_entry(axes: Axes) -> str | Axes | None:
  """A PartitionSpec entry: None, one axis name, or a tuple (major first)."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else tuple(axes)


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  config: TransformerConfig
  layout: Layout
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, config: TransformerConfig, layout: Layout,
             mesh: jax.sharding.Mesh) -> LayerPlan:
    mesh_sizes(mesh)
    plan = cls(config, layout, mesh)
    plan.check_model()
    return plan

  @property
  def sizes(self) -> tuple[tuple[str, int], ...]:
    return tuple(dict(self.mesh.shape).items())

  # ---- axis groups -----------------------------------------------------------------------

  def size(self, axes: Axes) -> int:
    sizes = dict(self.sizes)
    return math.prod(sizes[a] for a in axes)

  @property
  def ab(self) -> Axes:
    return self.layout.batch_axes

  @property
  def ain(self) -> Axes:
    return self.layout.weight_in_axes

  @property
  def aout(self) -> Axes:
    return self.layout.weight_out_axes

  @property
  def ah(self) -> Axes:
    return self.layout.head_axes

  @property
  def attn_batch(self) -> Axes:
    return self.layout.attention_batch_axes

  @property
  def head_order(self) -> Axes:
    """Axes whose linear index numbers a chip's head chunk; the all-to-all axes are minor."""
    return tuple(a for a in self.ah if a not in self.attn_batch) + self.attn_batch

  # ---- model sizes -----------------------------------------------------------------------

  @property
  def kv_heads(self) -> int:
    return self.config.num_kv_heads or self.config.num_heads

  @property
  def sharded_kv(self) -> bool:
    return self.layout.attention == 'heads' and self.kv_heads % self.size(self.ah) == 0

  @property
  def wi_names(self) -> tuple[str, ...]:
    acts = self.config.mlp_activations
    return ('wi',) if len(acts) == 1 else tuple(f'wi_{i}' for i in range(len(acts)))

  @property
  def local_heads(self) -> int:
    """Query heads per chip after the qkv reduce-scatter (H / |Ah|)."""
    return self.config.num_heads // self.size(self.ah)

  @property
  def attention_heads(self) -> int:
    """Query heads per chip inside attention (after the all-to-all): H |A| / |Ah|."""
    return self.local_heads * self.size(self.attn_batch)

  @property
  def block(self) -> str:
    return self.layout.block

  # ---- checks ----------------------------------------------------------------------------

  def _fail(self, what: str, size: int, axes: Axes, hint: str = ''):
    mesh = dict(self.sizes)
    raise ValueError(
        f'Layout {self.layout.name} on mesh {mesh}: {what} = {size} is not divisible by '
        f'{self.size(axes)}, the size of mesh axes {axes}.{" " + hint if hint else ""}')

  def _need(self, what: str, size: int, axes: Axes, hint: str = ''):
    if size % self.size(axes):
      self._fail(what, size, axes, hint)

  def check_model(self):
    cfg = self.config
    if cfg.moe is not None:
      raise ValueError(f'Layout {self.layout.name}: Mixture-of-Experts layers are not supported '
                       'by the inference layouts (dense feed-forward only); set moe=None.')
    if cfg.num_encoder_layers:
      raise ValueError(f'Layout {self.layout.name}: the inference layouts implement decoder-only '
                       f'layers; this config has {cfg.num_encoder_layers} encoder layers '
                       '(encoder-decoder).')
    if self.block == 'parallel' and not cfg.parallel_block:
      raise ValueError(f'Layout {self.layout.name} is a parallel block but the model is serial '
                       '(TransformerConfig.parallel_block=False); use block="serial".')
    if self.block == 'serial' and cfg.parallel_block:
      raise ValueError(f'Layout {self.layout.name} is a serial block but the model has '
                       'parallel_block=True; use block="parallel".')
    e, f, d = cfg.emb_dim, cfg.mlp_dim, cfg.head_dim
    self._need('d_model (E, residual stream)', e, self.ain + self.aout)
    self._need('d_ff (F)', f, self.aout + self.ab + self.ain)
    self._need('num_heads (H)', cfg.num_heads, self.ah)
    self._need('num_heads * head_dim (query/out kernel columns)', cfg.num_heads * d,
               self.aout + self.ab)
    if self.sharded_kv:
      self._need('num_kv_heads * head_dim (sharded key/value kernel columns)',
                 self.kv_heads * d, self.aout + self.ab,
                 'Weight-gathered layouts store sharded K/V kernels split like W_in.')

  def check_batch(self, batch: int):
    self._need('batch (B)', batch, self.ab + self.attn_batch,
               'Pad the batch or pick a layout with fewer batch axes.')

  # ---- partition specs (per layer; the decoder prepends the layer axis) --------------------

  @property
  def residual_spec(self) -> P:
    return P(spec_entry(self.ab), None, spec_entry(self.ain + self.aout))

  @property
  def rows_spec(self) -> P:
    """[batch] vectors (lengths, positions) as the attention sees them."""
    return P(spec_entry(self.ab + self.attn_batch))

  @property
  def cache_spec(self) -> P:
    """KV cache [B, S, K, D]."""
    if self.sharded_kv:
      return P(spec_entry(self.ab), None, spec_entry(self.ah), None)
    return P(spec_entry(self.ab + self.attn_batch), None, None, None)

  def weight_spec(self, name: str) -> tuple[P, P]:
    """(kernel spec, int8 scale spec) of one per-layer weight."""
    split_cols = P(spec_entry(self.ain), spec_entry(self.aout + self.ab))
    split_rows = P(spec_entry(self.aout + self.ab), spec_entry(self.ain))
    if name in NORMS:
      return P(spec_entry(self.ain)), P()
    if name in ('out', 'wo'):
      return split_rows, P(None, spec_entry(self.ain))
    if name in ('key', 'value') and not self.sharded_kv:
      return P(spec_entry(self.ain), None), P(None, None)
    if name in ('query', 'key', 'value') or name in self.wi_names:
      # Scales stay replicated over Ab: a gathered chip needs the F_Aout chunk, no collective.
      return split_cols, P(None, spec_entry(self.aout))
    raise ValueError(f'Unknown layer weight {name!r}.')

  def weight_specs(self, weights: dict) -> dict:
    def one(name, w):
      kernel, scale = self.weight_spec(name)
      if quantization.is_quantized(w):
        return quantization.QuantizedWeight(values=kernel, scale=scale)
      return kernel
    return {name: one(name, w) for name, w in weights.items()}

  # ---- head order ------------------------------------------------------------------------

  def head_permutation(self) -> np.ndarray | None:
    """perm[c] = the head chunk stored at chunk c of the (Aout, Ain) order; None if identity."""
    order = self.head_order
    if order == self.ah:
      return None
    sizes = dict(self.sizes)
    perm = np.zeros(self.size(self.ah), np.int32)
    for coords in itertools.product(*(range(sizes[a]) for a in self.ah)):
      where = dict(zip(self.ah, coords))
      perm[_linear(self.ah, where, sizes)] = _linear(order, where, sizes)
    return perm


def _linear(axes: Axes, coords: dict[str, int], sizes: dict[str, int]) -> int:
  index = 0
  for a in axes:
    index = index * sizes[a] + coords[a]
  return index
