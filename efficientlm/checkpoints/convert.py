"""Checkpoint conversion: read any supported format (formats.py), write an efficientlm run
checkpoint (parameters only, so training or finetuning starts from it) or a Hugging Face
directory. Command line: scripts/convert_checkpoint.py.

The model config comes from, in order: the Hugging Face config.json (HF input), the model gin the
caller parsed, or the checkpoint's shapes (infer_config.py, T5 encoder-decoders).
"""

from __future__ import annotations

import json
import pathlib

import jax

from efficientlm import partitioning
from efficientlm.checkpoints.formats import detect_format, open_checkpoint
from efficientlm.checkpoints.infer_config import infer_t5_config
from efficientlm.checkpoints.restore import RestoreOptions, restore
from efficientlm.checkpoints.source import from_tree
from efficientlm.checkpoints.upcycle import abstract_params
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.model import BaseModel, DecoderOnlyModel, EncoderDecoderModel
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training.metrics import log

TARGETS = ('efficientlm', 'hf')


def model_for(cfg: TransformerConfig) -> BaseModel:
  if cfg.num_encoder_layers:
    return EncoderDecoderModel(EncoderDecoder(cfg))
  return DecoderOnlyModel(DecoderOnly(cfg))


def convert(input_path: str, output_path: str, to: str, fmt: str = 'auto',
            model: BaseModel | None = None, strict: bool = True) -> pathlib.Path:
  """Converts; returns the written directory. `model`: None to take the config from an HF input
  or from the checkpoint's shapes."""
  if to not in TARGETS:
    raise ValueError(f'Unknown target format {to!r}; expected one of {TARGETS}.')
  fmt = detect_format(input_path) if fmt == 'auto' else fmt
  if model is None and fmt == 'hf':  # config and tensors from one read of the directory
    from efficientlm.checkpoints import hf_t5  # pylint: disable=g-import-not-at-top
    cfg, params = hf_t5.load_hf(input_path)
    model, source = model_for(cfg), from_tree(input_path, 'hf', params)
  else:
    source = open_checkpoint(input_path, fmt)
  if model is None:
    cfg = infer_t5_config(source)
    log(f'model config inferred from the checkpoint shapes: {cfg}')
    model = model_for(cfg)
  output = pathlib.Path(output_path)
  if output.exists() and any(output.iterdir()):
    raise FileExistsError(f'{output} exists and is not empty; choose a new output directory.')
  partitioner = partitioning.Partitioner((-1,), ('data',), 'data_parallel')
  abstract, _ = abstract_params(model, partitioner)
  params, report = restore(source, abstract, RestoreOptions(strict=strict))
  log(f'read {source.describe()}: {report.summary()}')
  if to == 'hf':
    from efficientlm.checkpoints.hf_export import save_hf  # pylint: disable=g-import-not-at-top
    save_hf(output, model.module.config, jax.device_get(params))
  else:
    step = source.step or 0
    checkpointer = ckpt_lib.Checkpointer(output / 'checkpoints', keep=None, async_save=False)
    checkpointer.save(step, params, meta={'converted_from': str(input_path), 'format': fmt})
    checkpointer.close()
    (output / 'model_config.json').write_text(
        json.dumps(_as_json(model.module.config), indent=2) + '\n')
  log(f'wrote {to} checkpoint {output}')
  return output


def _as_json(cfg: TransformerConfig) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
