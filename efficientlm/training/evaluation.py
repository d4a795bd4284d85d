"""Evaluation over seqio eval splits: loss, token accuracy and perplexity per task (and, for tasks
with answer choices, rank-classification accuracy), and the `eval` run mode (a checkpoint in,
metrics out)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from efficientlm import partitioning, storage
from efficientlm.checkpoints.load import load_params
from efficientlm.models.model import BaseModel
from efficientlm.training import metrics as metrics_lib
from efficientlm.training import rank_classification
from efficientlm.training.data_source import global_batch_spec, make_eval_iterators
from efficientlm.training.steps import make_eval_step


def evaluate_params(params, eval_step, partitioner: partitioning.Partitioner,
                    iterators: Mapping[str, Any], max_batches: int | None = None
                    ) -> dict[str, float]:
  """Loss, token accuracy (over loss-weighted positions) and perplexity per task (`task/metric`);
  for a task with answer choices, of the correct choices' tokens, plus `task/rank_accuracy` over
  its `task/num_examples` examples (BaseModel.loss_sums)."""
  results = {}
  for task, iterator in iterators.items():
    totals: dict[str, float] = {}
    for i, local in enumerate(iterator):
      if max_batches is not None and i >= max_batches:
        break
      with partitioner.context():
        sums = jax.device_get(eval_step(params, partitioner.shard_batch(local)))
      for key, value in sums.items():
        totals[key] = totals.get(key, 0.0) + float(value)
    tokens = max(totals.get('num_tokens', 0.0), 1e-8)
    loss = totals.get('cross_entropy', 0.0) / tokens
    results.update({f'{task}/loss': loss, f'{task}/accuracy': totals.get('correct', 0.0) / tokens,
                    f'{task}/perplexity': float(np.exp(min(loss, 50.0))),
                    f'{task}/num_tokens': totals.get('num_tokens', 0.0)})
    if 'choices/examples' in totals:
      examples = totals['choices/examples']
      results.update({f'{task}/rank_accuracy': totals['choices/correct'] / max(examples, 1e-8),
                      f'{task}/num_examples': examples})
  return results


def evaluate(*, model: BaseModel, partitioner: partitioning.Partitioner, checkpoint_path: str,
             eval_dataset, model_dir: str | None = None,
             max_eval_batches: int | None = None) -> dict[str, float]:
  """Run mode `eval`: restores parameters from `checkpoint_path` (an efficientlm run or step
  directory, a T5X checkpoint or a Hugging Face directory; see efficientlm.checkpoints),
  evaluates, prints and writes `eval_results.json` to `model_dir` (if given), and for tasks with
  answer choices each example's prediction to `model_dir`/rank_classification/<task>.jsonl."""
  iterators = make_eval_iterators(eval_dataset, model.feature_converter)
  spec = global_batch_spec(next(iter(iterators.values())))
  abstract, shardings = partitioner.abstract_params(model.param_initializer(spec),
                                                    jax.random.key(0))
  step, params, _ = load_params(str(checkpoint_path), abstract)
  step = step or 0
  with partitioner.context():
    eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings, None))
  results = evaluate_params(params, eval_step, partitioner, iterators, max_eval_batches)
  choice_tasks = [t for t, it in iterators.items() if rank_classification.has_choices(it)]
  if model_dir is not None and choice_tasks:  # per-example predictions: a second pass
    with partitioner.context():
      score_fn = jax.jit(rank_classification.make_score_fn(model), in_shardings=(shardings, None))
    fresh = make_eval_iterators(eval_dataset, model.feature_converter)
    for task in choice_tasks:
      ranked = rank_classification.classify(score_fn, params, partitioner, fresh[task],
                                            max_eval_batches)
      path = rank_classification.write_predictions(model_dir, task, ranked)
      metrics_lib.log(f'{task}: {ranked["num_examples"]} rank-classification predictions '
                      f'written to {path}')
  metrics_lib.MetricWriter(None).write(step, results, metrics_lib.eval_lines(step, results))
  if model_dir is not None and jax.process_index() == 0:
    path = storage.as_path(model_dir) / 'eval_results.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'checkpoint': str(checkpoint_path), 'step': step,
                                'metrics': results}, indent=2) + '\n')
  return results
