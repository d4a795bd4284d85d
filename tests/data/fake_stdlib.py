"""A small fake standard library for the stdlib tasks' tests: Python-like files of distinct lines."""

from __future__ import annotations

import pathlib


def write(root: pathlib.Path, num_files: int = 12, lines_per_file: int = 14) -> pathlib.Path:
  """Writes mod_<i>.py under `root` (and a test file the tasks skip); returns `root`."""
  for i in range(num_files):
    body = [f'def function_{i}(argument):']
    body += [f'    value_{j} = argument * {i + j} + {j}' for j in range(lines_per_file - 2)]
    body += ['    return value_0', '']
    path = root / f'mod_{i}.py'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(body))
  (root / 'test').mkdir(exist_ok=True)
  (root / 'test' / 'test_skipped.py').write_text('x = 1\n' * 20)
  return root
