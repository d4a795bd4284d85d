"""Merge the (IA)3 vectors of a run into its base: a plain checkpoint, written to a new directory.

  python scripts/merge_ia3.py --gin_file=models/t5_1_1/base.gin \
      --ia3_checkpoint=/runs/t5_base_ia3 --output=/runs/t5_base_ia3_merged [--base=/moved/base]

The vectors scale the key and value kernels' columns and the rows of every `wo`
(efficientlm/layers/ia3.py); the result is a parameters-only run checkpoint
(OUTPUT/checkpoints/<step>) of the model gin's network without (IA)3, which decodes at the plain
model's cost: --run_mode=infer / eval with CHECKPOINT_PATH=OUTPUT, or RESTORE_PATH=OUTPUT to
fine-tune further. The base is the one the run recorded unless --base says otherwise; the base and
the (IA)3 run are only read, and OUTPUT must be new (or empty) and outside both.
"""

import argparse
import sys

from efficientlm import gin_config
from efficientlm.checkpoints import ia3_checkpoint
from efficientlm.errors import RunError


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--ia3_checkpoint', required=True,
                      help='the (IA)3 run: its MODEL_DIR, checkpoints/ or one step directory')
  parser.add_argument('--output', required=True, help='a new directory for the merged run')
  parser.add_argument('--base', default=None,
                      help='the base checkpoint, if not where the run recorded it (same shapes)')
  parser.add_argument('--gin_file', action='append', required=True,
                      help='the model gin of the (IA)3 run (e.g. models/t5_1_1/base.gin)')
  parser.add_argument('--gin_bindings', action='append', default=[])
  args = parser.parse_args(argv)
  gin_config.parse(args.gin_file, args.gin_bindings)
  return ia3_checkpoint.write_merged(args.ia3_checkpoint, args.output, gin_config.macro('MODEL'),
                                     base_path=args.base)


if __name__ == '__main__':
  try:
    main()
  except (RunError, FileExistsError) as e:  # a mistake to fix, said in one line
    print(f'merge_ia3: {e}', file=sys.stderr)
    sys.exit(1)
