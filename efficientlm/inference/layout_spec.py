"""The partitioned inference layouts as data, and the collectives each one performs.

This module is the contract between the implementation (`layouts.py`, shard_map on an
('x', 'y', 'z') mesh) and the analytical model (`perf_model.py`, pure Python): both follow the
table below, and a test compares the collectives in the compiled HLO with the model's list. The
layouts are those of Pope et al. 2022 ("Efficiently Scaling Transformer Inference", sections 3.2
and 3.3); the notation is theirs: B batch, L tokens per forward pass, E d_model, F d_ff, H query
heads, K KV heads, D head dim, X/Y/Z mesh sizes, n = XYZ, `BLE_xyz` = E split over x*y*z.

Feed-forward layouts (`Layout.ffn`), by their axis groups: Ab splits the batch, Ain splits E
inside the weight-stationary matmuls, Aout splits F (and the attention heads):

  ffn      Ab       Ain   Aout     residual stream    weights stored           gathered over
  1d       -        -     x,y,z    B L E_xyz          W_in E F_xyz             -
  2d       -        x     y,z      B L E_xyz          W_in E_x F_yz            -
  wg_x     x        -     y,z      B_x L E_yz         W_in E F_(y,z,x)         x
  wg_xy    x,y      -     z        B_xy L E_z         W_in E F_(z,x,y)         x,y
  wg_xyz   x,y,z    -     -        B_xyz L E          W_in E F_xyz             x,y,z

(Weight-gathered layouts split F over Aout, then Ab, so that gathering over Ab leaves each chip a
contiguous F_Aout chunk; the bytes are those of E F_xyz.)

W_out is stored transposed the same way (F_xyz E, or F_yz E_x for 2d). The query kernel
[E, H*D] and the out kernel [H*D, E] are stored like W_in and W_out with heads in F's place; K
and V kernels too when the attention layout is `heads` and K is divisible by |Aout|*|Ain|
("sharded KV"); otherwise they are replicated ("replicated KV": multi-query, and every
batch-sharded attention layout). The residual's E axes are Ae = Ain + Aout.

One decoder layer, per chip (b = B/|Ab|, d = activation bytes, w = weight bytes, G = number of
W_in matrices: 2 for gated MLPs, 1 otherwise). Collectives whose axis group is empty are absent.

Feed-forward block (serial):
  1. weight-gathered layouts: one all-gather per weight matrix over Ab (W_in_0..G-1, W_out),
     bytes = the gathered matrix, E*F*|Ab|/n * w.
  2. all-gather the raw residual over Aout               -> b L E_Ain      bytes b*L*E/|Ain|*d
  3. RMSNorm; its sum of squares is all-reduced over Ain  (f32)           bytes b*L*4
  4. h @ W_in_i, partial over Ain; ONE reduce-scatter over Ain of the G outputs together
                                                          -> F_(Aout,Ain) bytes b*L*G*F/|Aout|*d
  5. activation and gating; all-gather over Ain           -> F_Aout       bytes b*L*F/|Aout|*d
  6. @ W_out, partial over Aout; reduce-scatter over Aout -> residual     bytes b*L*E/|Ain|*d

Attention block (serial). Query heads play F's role: after step 4 they are split over
Ah = Aout + Ain, which must divide H.
  1. weight-gathered layouts: all-gather Q, O (and sharded K, V) over Ab, like W_in/W_out.
  2., 3. as in the feed-forward block.
  4. q (and sharded k, v) = h @ kernel, partial over Ain; ONE reduce-scatter over Ain of them
     together, bytes b*L*(H + 2K')*D/|Aout|*d with K' = K for sharded KV, else 0.
     Replicated KV: k, v = h @ kernel on E_Ain, partial over Ain: ONE all-reduce over Ain of
     both, bytes b*L*2*K*D*d.
  5. attention layout (`Layout.attention`):
     heads      the KV cache is [b, S, K_Ah, D] (sharded KV) or [b, S, K, D] replicated over Ah.
                No collective.
     batch_A    (A = z, yz or xyz, a subset of Ah; KV is replicated) q goes
                through an all-to-all over A, splitting the batch and gathering heads:
                [b, L, H/|Ah|, D] -> [b/|A|, L, H*|A|/|Ah|, D], bytes b*L*H/|Ah|*D*d. Each chip
                keeps k, v of its own batch rows; the cache is [b/|A|, S, K, D]. The attention
                output goes back through the reverse all-to-all, same bytes.
  6. all-gather the output over Ain along heads          -> H_Aout        bytes b*L*H/|Aout|*D*d
  7. @ O, partial over Aout; reduce-scatter over Aout     -> residual     bytes b*L*E/|Ain|*d

Parallel block (`Layout.block == 'parallel'`): steps 1-3 once (one gather, one norm); step 4 is
ONE reduce-scatter of the W_in outputs and q (and sharded k, v) together, bytes
b*L*(G*F + (H + 2K')*D)/|Aout|*d (PaLM's fused "2F + HD"); the replicated-KV all-reduce stays
separate; step 6/5 is ONE all-gather of the feed-forward hidden and the attention output,
bytes b*L*(F + H*D)/|Aout|*d; and ONE final reduce-scatter of the summed partial outputs.

Byte conventions (`Collective.bytes`, per chip): all-gather: its output; reduce-scatter: its
input; all-reduce: its operand; all-to-all: its operand. Axis groups are written in mesh order.
"""

from __future__ import annotations

import dataclasses

MESH_AXES = ('x', 'y', 'z')
FFN_LAYOUTS = ('1d', '2d', 'wg_x', 'wg_xy', 'wg_xyz')
ATTENTION_LAYOUTS = ('heads', 'batch_z', 'batch_yz', 'batch_xyz')
BLOCKS = ('serial', 'parallel')
COLLECTIVE_KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all')

# ffn layout -> (Ab, Ain, Aout), as in the table above.
AXIS_GROUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    '1d': ((), (), ('x', 'y', 'z')),
    '2d': ((), ('x',), ('y', 'z')),
    'wg_x': (('x',), (), ('y', 'z')),
    'wg_xy': (('x', 'y'), (), ('z',)),
    'wg_xyz': (('x', 'y', 'z'), (), ()),
}
ATTENTION_BATCH_AXES: dict[str, tuple[str, ...]] = {
    'heads': (), 'batch_z': ('z',), 'batch_yz': ('y', 'z'), 'batch_xyz': ('x', 'y', 'z')}


@dataclasses.dataclass(frozen=True)
class Layout:
  """One point of the layout space: feed-forward layout, attention layout, block kind."""

  ffn: str = '2d'
  attention: str = 'heads'
  block: str = 'serial'

  def __post_init__(self):
    for field, allowed in (('ffn', FFN_LAYOUTS), ('attention', ATTENTION_LAYOUTS),
                           ('block', BLOCKS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f'Layout.{field} = {getattr(self, field)!r}; choose from {allowed}.')
    batch_axes, weight_in, weight_out = AXIS_GROUPS[self.ffn]
    heads = weight_out + weight_in
    extra = [a for a in ATTENTION_BATCH_AXES[self.attention] if a not in heads]
    if extra:
      raise ValueError(
          f'Layout(ffn={self.ffn!r}, attention={self.attention!r}): attention batch axes '
          f'{extra} do not split heads in this layout (heads are split over {heads or "nothing"}'
          f'); use a batch_* layout over a subset of {heads} or attention="heads".')

  @property
  def batch_axes(self) -> tuple[str, ...]:
    return AXIS_GROUPS[self.ffn][0]

  @property
  def weight_in_axes(self) -> tuple[str, ...]:
    return AXIS_GROUPS[self.ffn][1]

  @property
  def weight_out_axes(self) -> tuple[str, ...]:
    return AXIS_GROUPS[self.ffn][2]

  @property
  def head_axes(self) -> tuple[str, ...]:
    """Axes the query heads are split over inside the attention block (Aout, then Ain)."""
    return self.weight_out_axes + self.weight_in_axes

  @property
  def attention_batch_axes(self) -> tuple[str, ...]:
    return ATTENTION_BATCH_AXES[self.attention]

  @property
  def name(self) -> str:
    return f'{self.ffn}/{self.attention}/{self.block}'


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a layer: kind, the mesh axes its groups span, bytes per chip."""

  kind: str
  axes: tuple[str, ...]
  bytes: int

  def __post_init__(self):
    if self.kind not in COLLECTIVE_KINDS:
      raise ValueError(f'Collective.kind {self.kind!r} not in {COLLECTIVE_KINDS}.')
    object.__setattr__(self, 'axes', tuple(a for a in MESH_AXES if a in self.axes))
