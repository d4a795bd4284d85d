"""Prompts for the `infer` run mode: from a seqio task's split or from a file of prompts.

A task with an 'inputs' feature gives its inputs as prompts (encoder inputs, or a decoder-only
model's prefix); a task with only 'targets' (language modelling) gives the first
`prompt_length` tokens of each target, and the rest as the reference continuation.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from efficientlm.data import tensorflow_cpu  # noqa: F401  (first: TF quietly, with GPUs hidden)
import seqio

from efficientlm.data import tasks  # noqa: F401  (registers the built-in tasks)
from efficientlm.data.config import DatasetConfig
from efficientlm.errors import ConfigError


def task_vocabulary(mixture_or_task_name: str) -> seqio.Vocabulary:
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  return provider.output_features['targets'].vocabulary


def _strip(ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids, np.int32)
  return ids[ids > 0]


def task_prompts(cfg: DatasetConfig, prompt_length: int | None = None) -> Iterator[dict[str, Any]]:
  """{'prompt': int32 ids, 'inputs': text, 'targets': reference text} for each example of
  cfg.split, in order, with the features truncated to cfg.task_feature_lengths."""
  provider = seqio.get_mixture_or_task(cfg.mixture_or_task_name)
  vocabulary = task_vocabulary(cfg.mixture_or_task_name)
  # try_in_mem_cache=False: seqio caches splits of < 10k examples in memory, and a run that
  # stops at MAX_EXAMPLES leaves that cache half-read: TensorFlow then warns that "the calling
  # iterator did not fully read the dataset being cached". One pass needs no cache.
  ds = provider.get_dataset(dict(cfg.task_feature_lengths), split=cfg.split, shuffle=False,
                            num_epochs=1, seed=cfg.seed, use_cached=cfg.use_cached,
                            try_in_mem_cache=False)
  for example in ds.as_numpy_iterator():
    targets = _strip(example['targets'])
    if 'inputs' in example:
      prompt, reference = _strip(example['inputs']), targets
    else:
      if prompt_length is None:
        raise ValueError(f'Task {cfg.mixture_or_task_name} has no "inputs" feature; give '
                         'infer.prompt_length, the number of target tokens to prompt with.')
      prompt, reference = targets[:prompt_length], targets[prompt_length:]
    yield {'prompt': prompt, 'inputs': vocabulary.decode(prompt.tolist()),
           'targets': vocabulary.decode(reference.tolist())}


def file_prompts(path: str, vocabulary: seqio.Vocabulary,
                 max_length: int) -> Iterator[dict[str, Any]]:
  """One prompt per line: plain text, or JSON objects with a "prompt" or "inputs" field
  (.jsonl). Prompts longer than `max_length` tokens keep their last `max_length` tokens."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f'Prompt file {path} does not exist.')
  lines = [(number, line) for number, line in enumerate(file.read_text().splitlines(), 1)
           if line.strip()]
  if not lines:  # else the run would succeed with no predictions
    raise ConfigError(f'Prompt file {path} has no prompts: it is empty or all its lines are blank. '
                     'Write one prompt per line, or set --gin.PROMPT_FILE=None to prompt with the '
                     "task's examples.")
  jsonl = file.suffix == '.jsonl'
  for number, line in lines:
    text = line
    if jsonl:
      record = json.loads(line)
      text = record.get('prompt', record.get('inputs'))
      if text is None:
        raise ValueError(f'{path}:{number}: a JSONL prompt needs a "prompt" or "inputs" field.')
    ids = np.asarray(vocabulary.encode(text), np.int32)[-max_length:]
    yield {'prompt': ids, 'inputs': text, 'targets': None}


def detokenize(vocabulary: seqio.Vocabulary, ids) -> str:
  """Text of generated ids, up to (not including) EOS."""
  ids = [int(i) for i in ids]
  if vocabulary.eos_id in ids:
    ids = ids[:ids.index(vocabulary.eos_id)]
  return vocabulary.decode([i for i in ids if i > 0])
