"""Cloud TPU accelerator types: chips, hosts, JAX devices and the default runtime version.

The number in an accelerator type counts TensorCores for v4 and v5p (two per chip; JAX sees one
device per chip, "megacore") and chips for v5e (`v5litepod-N`) and v6e, which have one
TensorCore per chip. Multi-host slices have 4 chips per host; single-host slices have up to 8
(v5e, v6e) or 4 (v4, v5p) chips. Sources: cloud.google.com/tpu/docs/v4, /v5p ("2x2x1: 8 cores,
4 chips, 1 machine ... 4x4x4: 128 cores, 64 chips, 16 machines"), /v5e ("Each v5e chip contains
one TensorCore"; 2x4: 8 chips, 1 host; 4x4: 16 chips, 4 hosts), /v6e, and /runtimes for the
software versions.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Generation:
  """What an accelerator-type prefix means."""

  prefix: str  # as in the accelerator type, e.g. 'v5litepod'
  cores_per_chip: int  # TensorCores per chip; the type's number counts cores when 2
  runtime_version: str  # default TPU VM software version
  max_single_host_chips: int
  sizes: tuple[int, ...] | None  # the valid numbers, when they are a short list
  max_size: int  # the largest number in a single slice


GENERATIONS: dict[str, Generation] = {
    # v4: v4-8 (one host, 4 chips) up to v4-4096 in steps of 8 cores (4 chips, one host).
    'v4': Generation('v4', 2, 'tpu-ubuntu2204-base', 4, None, 4096),
    # v5p: v5p-8 up to v5p-12288 (6144 chips, the largest single slice), steps of 8 cores.
    'v5p': Generation('v5p', 2, 'v2-alpha-tpuv5', 4, None, 12288),
    # v5e: the 2D slice shapes 1x1, 2x2, 2x4 (single host), 4x4, 4x8, 8x8, 8x16, 16x16.
    'v5litepod': Generation('v5litepod', 1, 'v2-alpha-tpuv5-lite', 8,
                            (1, 4, 8, 16, 32, 64, 128, 256), 256),
    'v6e': Generation('v6e', 1, 'v2-alpha-tpuv6e', 8, (1, 4, 8, 16, 32, 64, 128, 256), 256),
}

CHIPS_PER_HOST = 4  # every multi-host slice


@dataclasses.dataclass(frozen=True)
class SliceType:
  """One slice of an accelerator type."""

  accelerator_type: str
  generation: Generation
  chips: int
  hosts: int
  devices: int  # JAX devices in the slice: one per chip on every generation here

  @property
  def runtime_version(self) -> str:
    return self.generation.runtime_version

  @property
  def devices_per_host(self) -> int:
    return self.devices // self.hosts


_PATTERN = re.compile(r'^(v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$')


def parse_accelerator_type(accelerator_type: str) -> SliceType:
  """The slice of e.g. 'v4-32'; a clear error for unknown or impossible types."""
  known = ', '.join(f'{g}-N' for g in GENERATIONS)
  match = _PATTERN.match(accelerator_type.strip())
  if not match:
    raise ValueError(f'Unknown accelerator type {accelerator_type!r}; expected one of {known} '
                     '(e.g. v4-32, v5p-128, v5litepod-64, v6e-8). v5e is spelled v5litepod-N.')
  generation, size = GENERATIONS[match.group(1)], int(match.group(2))
  if generation.sizes is not None:
    if size not in generation.sizes:
      raise ValueError(f'{accelerator_type}: {generation.prefix} slices have '
                       f'{", ".join(map(str, generation.sizes))} chips.')
  elif size % 8 or size > generation.max_size:
    raise ValueError(f'{accelerator_type}: {generation.prefix}-N counts TensorCores (2 per chip, '
                     f'4 chips per host), so N is a multiple of 8 up to {generation.max_size}.')
  chips = size // generation.cores_per_chip
  hosts = 1 if chips <= generation.max_single_host_chips else chips // CHIPS_PER_HOST
  return SliceType(accelerator_type, generation, chips, hosts, devices=chips)
