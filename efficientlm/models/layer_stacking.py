"""Convert parameters between unscanned (layers_0 ... layers_{n-1}) and scanned (layers, with
a leading stacked axis) trees, so a T5X-named checkpoint loads into a scanned model and back."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

_LAYER = re.compile(r'layers_(\d+)$')


def stack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Replaces every group of sibling `layers_i` subtrees with one `layers` subtree."""
  out, layers = {}, {}
  for key, value in tree.items():
    match = _LAYER.match(key)
    if match:
      layers[int(match.group(1))] = value
    elif isinstance(value, Mapping):
      out[key] = stack_layers(value)
    else:
      out[key] = value
  if layers:
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f'Layer indices {sorted(layers)} are not 0..{len(layers) - 1}.')
    if 'layers' in out:
      raise ValueError('Tree has both layers_i and a stacked layers subtree.')
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])
  return out


def unstack_layers(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of stack_layers: splits each `layers` subtree along its leading axis."""
  out = {}
  for key, value in tree.items():
    if key == 'layers':
      n = {x.shape[0] for x in jax.tree.leaves(value)}
      if len(n) != 1:
        raise ValueError(f'Stacked layers have inconsistent leading sizes {sorted(n)}.')
      for i in range(n.pop()):
        out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], value)
    elif isinstance(value, Mapping):
      out[key] = unstack_layers(value)
    else:
      out[key] = value
  return out
