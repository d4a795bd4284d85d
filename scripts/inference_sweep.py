"""Layout sweeps for partitioned inference: `efficientlm.main --run_mode=sweep`.

  python scripts/inference_sweep.py --gin_file=sweeps/tiny_cpu8.gin --gin.MODEL_DIR="'/tmp/sweep'"

The gin files in configs/sweeps/ say what each sweep runs and writes.
"""

from __future__ import annotations

import sys

from efficientlm import main

if __name__ == '__main__':
  sys.exit(main.run(['--run_mode=sweep'] + sys.argv[1:]))
