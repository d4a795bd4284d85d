"""Accelerator specs as data, for the analytical inference model (`perf_model.py`).

Sources (public spec sheets; per chip):
- TPU v4: Pope et al. 2022, section 4 (275 TFLOP/s bf16, 32 GiB HBM at 1.2 TB/s; 270 GB/s
  interconnect = 6 links x 45 GB/s). int8 runs at the bf16 rate on v4 (Cloud TPU docs).
- TPU v5e, v5p: Cloud TPU system-architecture pages (v5e: 197 TFLOP/s bf16, 394 TOP/s int8,
  16 GiB at 819 GB/s, 2D torus; v5p: 459 TFLOP/s bf16, 918 TOP/s int8, 95 GiB at 2,765 GB/s,
  3D torus). Link rates, one way: 45 GB/s (v4, v5e), 90 GB/s (v5p), from the "How to Scale
  Your Model" book's TPU table; a torus axis has two links per chip, hence 2x per axis.
- H100 SXM, H200 SXM: NVIDIA data sheets (dense, no sparsity: 989 TFLOP/s bf16, 1,979 TOP/s
  int8; 80 GB at 3.35 TB/s and 141 GB at 4.8 TB/s). NVLink 4 moves 900 GB/s per GPU counting
  both directions, so 450 GB/s each way plays the role of the interconnect; NVLink goes through
  switches, so a group's bandwidth does not grow with the mesh axes it spans.
- Prices: Cloud TPU on-demand list prices per chip-hour (us-central regions). GPUs have no single
  list price (it varies by cloud and contract), so None.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Hardware:
  """One accelerator chip and its interconnect, as the roofline model sees it.

  `interconnect_bandwidth` is the per-chip bandwidth W of the paper's cost model ("paper mode":
  an all-gather whose per-chip output is D bytes takes D / W). `axis_bandwidth` is the book's
  "torus mode": a collective gets this much per mesh axis of size > 1 that its group spans (a
  ring on each axis), plus `hop_latency` per hop. `topology` 'switch' (NVLink) means a group gets
  `axis_bandwidth` whatever axes it spans. `int8_flops` is for reference: the paper's int8 is
  weight-only (matmuls still run in bf16), so the model computes at `peak_flops`.
  """

  name: str
  peak_flops: float  # bf16 FLOP/s
  int8_flops: float  # int8 OP/s
  hbm_bytes: float
  hbm_bandwidth: float  # B/s
  interconnect_bandwidth: float  # B/s per chip, paper mode
  axis_bandwidth: float  # B/s per mesh axis spanned, torus mode
  hop_latency: float = 1e-6  # s per hop (the book: about 1 us on TPU ICI)
  price_per_chip_hour: float | None = None  # USD
  topology: str = 'torus'  # 'torus' or 'switch'

  def __post_init__(self):
    if self.topology not in ('torus', 'switch'):
      raise ValueError(f'Hardware {self.name}: topology {self.topology!r} is not torus/switch.')
    for field in ('peak_flops', 'int8_flops', 'hbm_bytes', 'hbm_bandwidth',
                  'interconnect_bandwidth', 'axis_bandwidth'):
      if getattr(self, field) <= 0:
        raise ValueError(f'Hardware {self.name}: {field} must be positive.')


HARDWARE: dict[str, Hardware] = {
    'tpu_v4': Hardware('tpu_v4', peak_flops=275e12, int8_flops=275e12, hbm_bytes=32 * GiB,
                       hbm_bandwidth=1.2e12, interconnect_bandwidth=6 * 45e9,
                       axis_bandwidth=2 * 45e9, hop_latency=1e-6, price_per_chip_hour=3.22),
    'tpu_v5e': Hardware('tpu_v5e', peak_flops=197e12, int8_flops=394e12, hbm_bytes=16 * GiB,
                        hbm_bandwidth=819e9, interconnect_bandwidth=4 * 45e9,
                        axis_bandwidth=2 * 45e9, hop_latency=1e-6, price_per_chip_hour=1.20),
    'tpu_v5p': Hardware('tpu_v5p', peak_flops=459e12, int8_flops=918e12, hbm_bytes=95 * GiB,
                        hbm_bandwidth=2765e9, interconnect_bandwidth=6 * 90e9,
                        axis_bandwidth=2 * 90e9, hop_latency=1e-6, price_per_chip_hour=4.20),
    'h100': Hardware('h100', peak_flops=989e12, int8_flops=1979e12, hbm_bytes=80e9,
                     hbm_bandwidth=3.35e12, interconnect_bandwidth=450e9, axis_bandwidth=450e9,
                     hop_latency=1e-6, topology='switch'),
    'h200': Hardware('h200', peak_flops=989e12, int8_flops=1979e12, hbm_bytes=141e9,
                     hbm_bandwidth=4.8e12, interconnect_bandwidth=450e9, axis_bandwidth=450e9,
                     hop_latency=1e-6, topology='switch'),
}


def get_hardware(name: str | Hardware) -> Hardware:
  """The spec of a known chip by name (a Hardware passes through)."""
  if isinstance(name, Hardware):
    return name
  try:
    return HARDWARE[name]
  except KeyError:
    raise ValueError(
        f'Unknown hardware {name!r}; known: {", ".join(sorted(HARDWARE))} '
        '(or pass a Hardware).') from None
