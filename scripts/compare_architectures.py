"""Launcher for `python -m benchmarks.compare_architectures` (same flags; see its docstring):
every architecture of benchmarks/architectures.py trained on the same budget on synthetic_recall,
synthetic_induction and stdlib_code_lm, into one table. Rerun the same command to resume.

  python scripts/compare_architectures.py --output_dir runs/compare
"""

import pathlib
import sys

# The repository root: `benchmarks` is not an installed package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import compare_architectures  # noqa: E402  pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  sys.exit(compare_architectures.main())
