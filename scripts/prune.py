"""One-shot pruning (SparseGPT or magnitude), then (with --eval) evaluation of the pruned model:
`python -m efficientlm.main --run_mode=prune` followed by `--run_mode=eval`, same flags.

  python scripts/prune.py --eval --gin_file=models/decoder/tiny.gin --gin_file=runs/prune.gin \
      --gin.SOURCE_CHECKPOINT="'runs/lm'" --gin.MODEL_DIR="'runs/lm_2of4'" \
      --gin.SPARSITY="'2:4'" --gin.MIXTURE_OR_TASK_NAME="'stdlib_code_lm'"
"""

import sys

from efficientlm import main

if __name__ == '__main__':
  sys.exit(main.run_then('prune', '--eval', 'eval'))
