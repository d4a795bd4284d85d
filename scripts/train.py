"""Launcher for `python -m efficientlm.main` (same flags), e.g.

  python scripts/train.py --gin_file=runs/recall_tiny.gin --gin.MODEL_DIR="'runs/recall_tiny'"
"""

import sys

from efficientlm import main

if __name__ == '__main__':
  sys.exit(main.run())
