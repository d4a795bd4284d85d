"""Convert parameters between unscanned (layers_0 ... layers_{n-1}) and scanned (layers, with a
leading stacked axis) trees, so a T5X-named checkpoint loads into a scanned model and back.

When dense and sparse (MoE) layers alternate with period p, the scan repeats blocks of p layers:
unscanned layer i is block i // p, sub-layer layers_{i % p} of the scanned `layers` subtree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

_LAYER = re.compile(r'layers_(\d+)$')


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_layers(tree: Mapping[str, Any], period: int = 1) -> dict[str, Any]:
  """Replaces every group of sibling `layers_i` subtrees with one `layers` subtree."""
  out, layers = {}, {}
  for key, value in tree.items():
    match = _LAYER.match(key)
    if match:
      layers[int(match.group(1))] = value
    elif isinstance(value, Mapping):
      out[key] = stack_layers(value, period)
    else:
      out[key] = value
  if layers:
    n = len(layers)
    if sorted(layers) != list(range(n)):
      raise ValueError(f'Layer indices {sorted(layers)} are not 0..{n - 1}.')
    if 'layers' in out:
      raise ValueError('Tree has both layers_i and a stacked layers subtree.')
    if n % period:
      raise ValueError(f'{n} layers do not split into blocks of {period}.')
    if period == 1:
      out['layers'] = _stack([layers[i] for i in range(n)])
    else:
      out['layers'] = {f'layers_{j}': _stack([layers[b * period + j] for b in range(n // period)])
                       for j in range(period)}
  return out


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of stack_layers (blocks included): splits `layers` along its leading axis."""
  out = {}
  for key, value in tree.items():
    if key != 'layers':
      out[key] = unstack_layers(value) if isinstance(value, Mapping) else value
      continue
    blocks = {int(_LAYER.match(k).group(1)): v for k, v in value.items() if _LAYER.match(k)}
    if not blocks or len(blocks) != len(value):  # one layer per step, not blocks
      blocks = {0: value}
    period = len(blocks)
    sizes = {x.shape[0] for x in jax.tree.leaves(value)}
    if len(sizes) != 1:
      raise ValueError(f'Stacked layers have inconsistent leading sizes {sorted(sizes)}.')
    for b in range(sizes.pop()):
      for j in range(period):
        out[f'layers_{b * period + j}'] = jax.tree.map(lambda x, b=b: x[b], blocks[j])
  return out
