"""Run mode `infer`: a checkpoint and prompts in, predictions (JSONL) out.

  python -m efficientlm.main --run_mode=infer --gin_file=models/decoder/tiny.gin \
      --gin_file=runs/infer.gin --gin.CHECKPOINT_PATH="'/runs/tiny'" \
      --gin.MODEL_DIR="'/runs/tiny_infer'" [--gin.PROMPT_FILE="'prompts.txt'"]

Writes MODEL_DIR/predictions.jsonl, one line per prompt ({"inputs", "prediction", "targets",
"score", "tokens"}), flushed per batch. A rerun after a crash or preemption keeps the lines
already written and continues after them.

`inference_layout` (gin INFERENCE_LAYOUT) None decodes with the Flax model on the run's
partitioner mesh; a layout name, {'prefill': name, 'decode': name} or 'auto' decodes decoder-only
models through the partitioned layouts of Pope et al. 2022 on an ('x', 'y', 'z') mesh of the same
devices (INFERENCE_MESH; layout_generate.py) and writes MODEL_DIR/infer_layout.json (the chosen
layouts, their predicted times and the measured decode step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import time
from typing import Any, Mapping

import jax
import numpy as np

from efficientlm import partitioning
from efficientlm.checkpoints.load import load_params
from efficientlm.inference import layout_generate, quantization
from efficientlm.inference.decoding import DecodeOptions, generate
from efficientlm.models.model import BaseModel

PREDICTIONS = 'predictions.jsonl'


def _batches(prompts, batch_size: int, skip: int):
  batch = []
  for i, example in enumerate(prompts):
    if i < skip:
      continue
    batch.append(example)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def _pad(batch: list[dict[str, Any]], batch_size: int, length: int) -> np.ndarray:
  """Right-padded [batch_size, length] prompts; missing rows (the last batch) are copies of row
  0 so their shapes and compile stay the same; their outputs are dropped."""
  out = np.zeros((batch_size, length), np.int32)
  for i in range(batch_size):
    ids = batch[i if i < len(batch) else 0]['prompt'][:length]
    out[i, :len(ids)] = ids
  return out


def infer(*, model: BaseModel, partitioner: partitioning.Partitioner, checkpoint_path: str,
          model_dir: str, decode_options: DecodeOptions = DecodeOptions(), batch_size: int = 8,
          dataset=None, prompt_file: str | None = None, vocabulary=None,
          prompt_length: int | None = None, max_prompt_length: int = 512,
          max_examples: int | None = None, int8_weights: bool = False, seed: int = 0,
          inference_layout: str | Mapping[str, str] | None = None,
          inference_mesh: tuple[int, int, int] | None = None, inference_hardware: str = 'auto',
          layout_timing_repeats: int = 5) -> str:
  """Decodes the prompts of `prompt_file` (tokenized with `vocabulary`) if given, else of
  `dataset` (a DatasetConfig; its task's vocabulary), and writes MODEL_DIR/predictions.jsonl.
  `int8_weights` quantizes the matmul weights (quantization.py) first. `inference_layout` and
  the rest: see the module doc and layout_generate.py (`layout_timing_repeats` decode steps are
  timed for infer_layout.json; 0: none). Returns the output path."""
  from efficientlm.data import prompts as prompt_lib  # TensorFlow only when inferring
  if prompt_file is None and dataset is None:
    raise ValueError('infer: give a prompt_file or a dataset.')
  if inference_layout is None:
    partitioner.local_batch_size(batch_size)  # names the mesh if the batch does not split
  else:
    layout_generate.check_model(model)  # before the prompts and the checkpoint are read
  if prompt_file is not None:
    if vocabulary is None:
      raise ValueError('infer: a prompt_file needs a vocabulary.')
    examples = list(prompt_lib.file_prompts(prompt_file, vocabulary, max_prompt_length))
    length = max([len(e['prompt']) for e in examples], default=1)
  else:
    vocabulary = prompt_lib.task_vocabulary(dataset.mixture_or_task_name)
    examples = prompt_lib.task_prompts(dataset, prompt_length)
    length = prompt_length or dataset.task_feature_lengths.get('inputs', max_prompt_length)
  if max_examples is not None:
    examples = (e for i, e in zip(range(max_examples), examples))

  layouts = None if inference_layout is None else layout_generate.LayoutGenerator(
      model, inference_layout, options=decode_options, batch=batch_size, prompt_length=length,
      mesh_shape=inference_mesh, hardware=inference_hardware, int8=int8_weights)

  encoder_length = max(length, 1)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in model.dummy_batch(
      1, {'inputs': encoder_length, 'targets': 1}).items()}
  abstract, _ = partitioner.abstract_params(model.param_initializer(spec), jax.random.key(0))
  step, params, _ = load_params(str(checkpoint_path), abstract)
  if int8_weights:
    params = jax.jit(quantization.quantize_tree)(params)
  logging.info('infer: checkpoint %s (step %s), %d weight bytes', checkpoint_path, step,
               quantization.weight_bytes(params))

  if layouts is None:
    decode = lambda prompts, rng: generate(model, params, prompts, decode_options, rng)
    context = partitioner.context()
  else:
    layouts.place(params)
    del params  # the layouts hold their own copies
    layouts.record(model_dir, layout_timing_repeats)
    decode, context = layouts.generate, contextlib.nullcontext()

  out_path = pathlib.Path(model_dir) / PREDICTIONS
  done = len(out_path.read_text().splitlines()) if out_path.exists() else 0
  if done:
    logging.info('infer: %s has %d predictions; continuing after them.', out_path, done)
  rng, written, start = jax.random.key(seed), done, time.time()
  with out_path.open('a') as f, context:
    for batch in _batches(examples, batch_size, done):
      prompts = _pad(batch, batch_size, length)
      out = jax.device_get(decode(prompts, jax.random.fold_in(rng, written)))
      for i, example in enumerate(batch):
        tokens = out.tokens[i, :out.lengths[i]].tolist()
        f.write(json.dumps({'inputs': example['inputs'], 'targets': example['targets'],
                            'prediction': prompt_lib.detokenize(vocabulary, tokens),
                            'score': float(out.scores[i]), 'tokens': tokens}) + '\n')
      f.flush()
      written += len(batch)
      print(f'infer: {written} predictions, {(written - done) / (time.time() - start):.2f}/s',
            flush=True)
  return str(out_path)
