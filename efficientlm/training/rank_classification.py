"""Rank classification over answer choices (T-Few, Liu et al. 2022, sec. 3.2; T5X's
rank_classification): the model scores each choice of an example by its log-likelihood given
the prompt, per token (BaseModel.rank_classification_score = 'mean', T-Few's) or summed ('sum'),
and predicts the highest-scoring choice (the first among equals).

Batches come from a task with answer choices (efficientlm/data/choices.py): [E, C, ...]
features and choice_is_correct [E, C]. The trainer's periodic evaluation and the eval run mode
report accuracy through BaseModel.loss_sums (`<task>/rank_accuracy`); this module gives the
per-example predictions, which the eval run mode writes (a second pass over the eval split).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from efficientlm import partitioning, storage
from efficientlm.models import tfew_losses
from efficientlm.models.model import CHOICE_IS_CORRECT, BaseModel


def has_choices(iterator) -> bool:
  """Whether an iterator's batches hold answer choices (from its element_spec)."""
  return CHOICE_IS_CORRECT in getattr(iterator, 'element_spec', {})


def make_score_fn(model: BaseModel):
  """(params, batch) -> each choice's score [E, C] (-inf for an absent choice); jit it."""

  def score(params, batch):
    log_probs = model.token_scores(params, batch)  # [E, C, L], 0 where the weight is 0
    weights = batch['decoder_loss_weights'].astype(log_probs.dtype)
    return tfew_losses.choice_scores(log_probs, weights, model.rank_classification_score)

  return score


def _gathered(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:  # every process's rows, in global order
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def classify(score_fn, params, partitioner: partitioning.Partitioner, iterator,
             max_batches: int | None = None) -> dict[str, Any]:
  """Accuracy and per-example predictions over `iterator`'s batches (one eval epoch, in order):
  {'accuracy', 'num_examples', 'predictions': [{'example', 'label', 'prediction', 'scores'}]},
  `example` counting the real examples in order (all-zero padding examples are skipped)."""
  predictions = []
  for i, local in enumerate(iterator):
    if max_batches is not None and i >= max_batches:
      break
    batch = partitioner.shard_batch(local)
    with partitioner.context():
      scores = _gathered(score_fn(params, batch))
    is_correct = _gathered(batch[CHOICE_IS_CORRECT])
    for row_scores, row_correct in zip(scores, is_correct):
      if not row_correct.any():
        continue
      predictions.append({'example': len(predictions), 'label': int(np.argmax(row_correct)),
                          'prediction': int(np.argmax(row_scores)),
                          'scores': [float(s) if np.isfinite(s) else None for s in row_scores]})
  right = sum(p['label'] == p['prediction'] for p in predictions)
  return {'accuracy': right / max(len(predictions), 1), 'num_examples': len(predictions),
          'predictions': predictions}


def write_predictions(model_dir: str, task: str, result: Mapping[str, Any]) -> str:
  """Writes MODEL_DIR/rank_classification/<task>.jsonl (one prediction a line; process 0)."""
  path = storage.as_path(model_dir) / 'rank_classification' / f'{task}.jsonl'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(json.dumps(p) + '\n' for p in result['predictions']))
  return str(path)
