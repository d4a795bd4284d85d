"""Canonical (unscanned, T5X) names for the layers a parameter holds, so checkpoints and models
match whichever of them scans its layers.

A scanned model stores `encoder/layers/mlp/wi_0/kernel` [L, ...] (or, when dense and MoE layers
alternate with period p, `encoder/layers/layers_j/...` [L/p, ...]; see models/layer_stacking.py).
Its canonical names are `encoder/layers_i/mlp/wi_0/kernel`, one per layer, in stacking order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_SUBLAYER = re.compile(r'^layers_(\d+)$')


def _split(name: str) -> tuple[list[str], int] | None:
  parts = name.split('/')
  return (parts, parts.index('layers')) if 'layers' in parts else None


def canonical_names(shapes: Mapping[str, Sequence[int]]) -> dict[str, list[str]]:
  """{stored name: [canonical name of each stacked layer]} (a one-element list if unstacked)."""
  periods: dict[str, set[int | None]] = {}
  for name in shapes:
    split = _split(name)
    if split:
      parts, i = split
      sub = _SUBLAYER.match(parts[i + 1]) if i + 1 < len(parts) else None
      periods.setdefault('/'.join(parts[:i + 1]), set()).add(int(sub.group(1)) if sub else None)
  out = {}
  for name, shape in shapes.items():
    split = _split(name)
    if not split:
      out[name] = [name]
      continue
    parts, i = split
    subs = periods['/'.join(parts[:i + 1])]
    if None in subs:
      period, j, rest = 1, 0, parts[i + 1:]
    else:
      period, j, rest = len(subs), int(_SUBLAYER.match(parts[i + 1]).group(1)), parts[i + 2:]
    if not shape:
      raise ValueError(f'Stacked parameter {name!r} has no leading layer axis.')
    out[name] = ['/'.join(parts[:i] + [f'layers_{b * period + j}'] + rest)
                 for b in range(shape[0])]
  return out


def canonical_index(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[str, int | None]]:
  """{canonical name: (stored name, index along its layer axis or None if unstacked)}."""
  index = {}
  for stored, names in canonical_names(shapes).items():
    stacked = names != [stored]
    for b, name in enumerate(names):
      index[name] = (stored, b if stacked else None)
  return index
