"""Accelerator types against the Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e)."""

from __future__ import annotations

import pytest

from efficientlm.launch import tpu_slices


# (type, chips, hosts, JAX devices, default runtime version). v4/v5p count TensorCores (2 per
# chip, one JAX device per chip); v5e/v6e count chips; multi-host slices have 4 chips per host.
@pytest.mark.parametrize('accelerator_type,chips,hosts,devices,runtime', [
    ('v4-8', 4, 1, 4, 'tpu-ubuntu2204-base'),
    ('v4-16', 8, 2, 8, 'tpu-ubuntu2204-base'),
    ('v4-32', 16, 4, 16, 'tpu-ubuntu2204-base'),
    ('v4-4096', 2048, 512, 2048, 'tpu-ubuntu2204-base'),
    ('v5p-8', 4, 1, 4, 'v2-alpha-tpuv5'),
    ('v5p-128', 64, 16, 64, 'v2-alpha-tpuv5'),  # 4x4x4: 128 cores, 64 chips, 16 machines
    ('v5p-12288', 6144, 1536, 6144, 'v2-alpha-tpuv5'),
    ('v5litepod-1', 1, 1, 1, 'v2-alpha-tpuv5-lite'),
    ('v5litepod-8', 8, 1, 8, 'v2-alpha-tpuv5-lite'),  # 2x4, one host
    ('v5litepod-16', 16, 4, 16, 'v2-alpha-tpuv5-lite'),  # 4x4, 4 hosts
    ('v5litepod-64', 64, 16, 64, 'v2-alpha-tpuv5-lite'),
    ('v5litepod-256', 256, 64, 256, 'v2-alpha-tpuv5-lite'),
    ('v6e-8', 8, 1, 8, 'v2-alpha-tpuv6e'),
    ('v6e-256', 256, 64, 256, 'v2-alpha-tpuv6e'),
])
def test_topology(accelerator_type, chips, hosts, devices, runtime):
  s = tpu_slices.parse_accelerator_type(accelerator_type)
  assert (s.chips, s.hosts, s.devices, s.runtime_version) == (chips, hosts, devices, runtime)
  assert s.devices_per_host == (devices if hosts == 1 else 4)


@pytest.mark.parametrize('accelerator_type,message', [
    ('v5e-16', 'Unknown accelerator type'),  # spelled v5litepod-16
    ('v3-8', 'Unknown accelerator type'),
    ('v4_32', 'Unknown accelerator type'),
    ('v4-', 'Unknown accelerator type'),
    ('v4-0', 'Unknown accelerator type'),
    ('v4-12', 'multiple of 8'),
    ('v5p-20000', 'multiple of 8 up to 12288'),
    ('v5litepod-2', 'slices have 1, 4, 8'),
    ('v6e-512', 'slices have 1, 4, 8'),
])
def test_bad_accelerator_types_are_rejected(accelerator_type, message):
  with pytest.raises(ValueError, match=message):
    tpu_slices.parse_accelerator_type(accelerator_type)
