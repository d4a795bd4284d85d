"""Figure 1 of Pope et al. 2022 for a sweep: latency vs MFU and latency vs cost, Pareto fronts.

One PNG per (kind, model, hardware, mesh, phase, length, context, weight dtype) group; one point
per (layout, batch), coloured by layout and labelled with the batch size. Latency is the time of
one forward pass: per generated token for decode, per prompt for prefill.
"""

from __future__ import annotations

import pathlib
import re
from typing import Sequence

PLOT_GROUP = ('kind', 'model', 'hardware', 'mesh', 'phase', 'length', 'context', 'weight_dtype')


def pareto(points: Sequence[tuple[float, float]], maximize_x: bool) -> list[tuple[float, float]]:
  """The (x, latency) points no other point beats in both (lower latency; higher or lower x)."""
  front, best = [], None
  for x, y in sorted(points, key=lambda p: (p[1], -p[0] if maximize_x else p[0])):
    if best is None or (x > best if maximize_x else x < best):
      front.append((x, y))
      best = x
  return front


def plot_groups(rows: Sequence[dict], directory: pathlib.Path) -> list[pathlib.Path]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    if row['status'] == 'ok':
      groups.setdefault(tuple(row[c] for c in PLOT_GROUP), []).append(row)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for key, members in groups.items():
    kind = key[0]
    time, mfu, cost = (('time', 'mfu', 'chip_seconds_per_token') if kind == 'predicted' else
                       ('measured_time', 'measured_mfu', 'measured_chip_seconds_per_token'))
    panels = [(c, label, maximize) for c, label, maximize in
              ((mfu, 'MFU', True), (cost, 'cost (chip-seconds per token)', False))
              if all(r[c] is not None for r in members)]
    if not panels:
      continue
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (column, label, maximize) in zip(axes[0], panels):
      for i, layout in enumerate(sorted({r['layout'] for r in members})):
        mine = [r for r in members if r['layout'] == layout]
        ax.scatter([r[column] for r in mine], [r[time] for r in mine], label=layout, s=18,
                   color=plt.cm.tab20(i % 20))  # tab10 would repeat colours past 10 layouts
        for r in mine:
          ax.annotate(str(r['batch']), (r[column], r[time]), fontsize=6, alpha=0.7)
      front = pareto([(r[column], r[time]) for r in members], maximize)
      ax.plot([x for x, _ in front], [y for _, y in front], 'k--', lw=1, label='Pareto front')
      ax.set_xlabel(label)
      ax.set_ylabel('latency per ' + ('generated token' if key[4] == 'decode' else 'prefill')
                    + ' (s)')
      ax.set_yscale('log')
      if not maximize:
        ax.set_xscale('log')
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(' '.join(f'{c}={v}' for c, v in zip(PLOT_GROUP, key) if v != ''), fontsize=8)
    fig.tight_layout()
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', '_'.join(map(str, key))) + '.png'
    paths.append(directory / name)
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
  return paths
