"""Timing one partitioned decoder layer on the local devices, for `sweep.py`.

A measured forward pass is one layer (`PartitionedDecoder.layer_fn`: compiled once, random
inputs, warmed up, the median of `repeats` runs) times the number of layers. The embedding and
logits are left out: they are not part of the layouts, and the layers dominate at scale.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import numpy as np

from efficientlm import partitioning
from efficientlm.inference.layout_spec import MESH_AXES, Layout
from efficientlm.inference.partitioned_decoder import PartitionedDecoder
from efficientlm.models.config import TransformerConfig

# Device kind substrings -> the nominal hardware whose spec the measurement is compared with.
DEVICE_HARDWARE = (('H200', 'h200'), ('H100', 'h100'), ('v5p', 'tpu_v5p'),
                   ('v5 lite', 'tpu_v5e'), ('v5e', 'tpu_v5e'), ('v4', 'tpu_v4'))
# Weight dtypes the measured model stores its weights in (int8: quantize_tree's layout).
PARAM_DTYPES = {'bfloat16': 'bfloat16', 'bf16': 'bfloat16', 'float16': 'float16',
                'float32': 'float32', 'int8': None}


def auto_hardware() -> str | None:
  """The known hardware spec matching the local device, or None (CPU, unknown GPUs)."""
  kind = jax.local_devices()[0].device_kind
  return next((name for key, name in DEVICE_HARDWARE if key.lower() in kind.lower()), None)


def check_mesh(shape: Sequence[int]) -> None:
  """Raises ValueError unless a mesh of `shape` can be measured here."""
  n, local = math.prod(shape), len(jax.local_devices())
  if n != 1 and n != local:
    raise ValueError(
        f'Cannot measure on mesh {tuple(shape)}: it has {n} chips but there are {local} local '
        f'devices ({jax.local_devices()[0].device_kind}). Measured meshes need 1 or {local} chips; '
        'set measure=False for analytical rows only.')


def build_mesh(shape: Sequence[int]) -> jax.sharding.Mesh:
  check_mesh(shape)
  devices = jax.local_devices()[:math.prod(shape)]
  return partitioning.create_mesh(tuple(shape), MESH_AXES, devices)


def measured_config(config: TransformerConfig, weight_dtype: str) -> TransformerConfig:
  """The config whose weights are stored in `weight_dtype` (int8 keeps it and quantizes)."""
  if weight_dtype not in PARAM_DTYPES:
    raise ValueError(f'weight_dtype {weight_dtype!r} not in {sorted(PARAM_DTYPES)}.')
  dtype = PARAM_DTYPES[weight_dtype]
  return config if dtype is None else dataclasses.replace(config, param_dtype=dtype)


def time_layers(decoder: PartitionedDecoder, phase: str, batch: int, length: int, context: int,
                quantized: bool, repeats: int, warmup: int = 2) -> float:
  """Seconds for one forward pass of all layers: the median of one layer, times the layers."""
  # Prefill fills a cache as long as the prompt; decode reads `context` cached tokens.
  cache_length = length if phase == 'prefill' else max(context, 1)
  layer = decoder.layer_fn(phase, batch, length, cache_length, quantized)
  compiled = layer.compile()
  args = layer.example_args()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * decoder.config.num_decoder_layers


def make_decoder(config: TransformerConfig, layout: Layout, mesh) -> PartitionedDecoder:
  return PartitionedDecoder(config, layout, mesh)
