"""Convert checkpoints between T5X, Hugging Face and efficientlm.

  # T5X (legacy or Orbax; local or gs://) -> an efficientlm run to finetune from (RESTORE_PATH)
  python scripts/convert_checkpoint.py --from t5x --to efficientlm \
      --input gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000 --output /ckpt/base
  # our run (dense or Switch MoE T5) -> a Hugging Face directory for transformers
  python scripts/convert_checkpoint.py --from efficientlm --to hf --input runs/t5 --output hf/t5 \
      --gin_file=models/t5_1_1/base.gin

Without --gin_file the model config comes from the HF config.json or the checkpoint's shapes.
"""

import argparse

from efficientlm import gin_config
from efficientlm.checkpoints import convert, formats


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--from', dest='fmt', default='auto', choices=('auto',) + formats.FORMATS)
  parser.add_argument('--to', required=True, choices=convert.TARGETS)
  parser.add_argument('--input', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--gin_file', action='append', default=[],
                      help='model gin (e.g. models/t5_1_1/base.gin) when the config cannot be '
                           'read off the checkpoint')
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--not_strict', action='store_true',
                      help='allow checkpoint arrays the model does not use')
  args = parser.parse_args(argv)
  model = None
  if args.gin_file:
    gin_config.parse(args.gin_file, args.gin_bindings)
    model = gin_config.macro('MODEL')
  return convert.convert(args.input, args.output, args.to, args.fmt, model,
                         strict=not args.not_strict)


if __name__ == '__main__':
  main()
