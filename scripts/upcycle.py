"""Sparse upcycling, then (with --train) training continues from the upcycled checkpoint:
`python -m efficientlm.main --run_mode=upcycle` followed by `--run_mode=train`, same flags.

  python scripts/upcycle.py --train --gin_file=models/switch/upcycle_t5_1_1_base.gin \
      --gin_file=runs/upcycle.gin --gin_file=meshes/expert_parallel.gin \
      --gin.DENSE_CHECKPOINT="'gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000'" \
      --gin.MODEL_DIR="'gs://my-bucket/upcycled_base'" --gin.TRAIN_STEPS=1100000
"""

import sys

from efficientlm import main

if __name__ == '__main__':
  sys.exit(main.run_then('upcycle', '--train', 'train'))
