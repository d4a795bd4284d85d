"""Rank classification over answer choices: the eval's accuracy (BaseModel.loss_sums through
evaluation.evaluate_params), the per-example predictions (training/rank_classification.py) and a
numpy argmax of the model's own log-probabilities agree."""

import json

import jax
import numpy as np

from efficientlm.models.model import CHOICE_IS_CORRECT
from efficientlm.training import evaluation, rank_classification
from efficientlm.training.steps import make_eval_step
from tests import helpers
from tests.training import tiny_run

E, C, PROMPT, CHOICE, VOCAB = 4, 3, 3, 4, 64


def _batch(seed, padding_examples=0):
  """E examples of C decoder-only rows (prompt, then a choice of 1 to 4 tokens), the last
  `padding_examples` all zero, as evaluation pads its last batch."""
  rng = np.random.default_rng(seed)
  targets = helpers.tokens(rng, (E, C, PROMPT + CHOICE), VOCAB)
  targets[:, :, :PROMPT] = targets[:, :1, :PROMPT]
  lengths = rng.integers(1, CHOICE + 1, size=(E, C))
  targets[np.arange(PROMPT + CHOICE) >= PROMPT + lengths[..., None]] = 0
  is_correct = np.eye(C, dtype=np.int32)[rng.integers(0, C, size=E)]
  if padding_examples:
    targets[-padding_examples:], is_correct[-padding_examples:] = 0, 0
  weights = ((targets > 0) & (np.arange(PROMPT + CHOICE) >= PROMPT)).astype(np.float32)
  inputs = np.concatenate([np.zeros((E, C, 1), np.int32), targets[..., :-1]], axis=-1)
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': weights, CHOICE_IS_CORRECT: is_correct}


class _Batches:
  """An eval iterator (evaluation pipelines expose element_spec)."""

  def __init__(self, batches):
    self.batches = batches
    self.element_spec = {k: (v.shape, v.dtype) for k, v in batches[0].items()}

  def __iter__(self):
    return iter(self.batches)


def test_eval_accuracy_predictions_and_numpy_agree(tmp_path):
  model = helpers.decoder_model(vocab_size=VOCAB, num_decoder_layers=1)
  batches = [_batch(0), _batch(1, padding_examples=1)]
  params = jax.jit(lambda: helpers.init_params(model, {
      k: v[0] for k, v in batches[0].items() if k != CHOICE_IS_CORRECT}))()
  partitioner = tiny_run.partitioner()
  with partitioner.context():
    eval_step = jax.jit(make_eval_step(model))
    score_fn = jax.jit(rank_classification.make_score_fn(model))
  results = evaluation.evaluate_params(params, eval_step, partitioner,
                                       {'task': _Batches(batches)})
  ranked = rank_classification.classify(score_fn, params, partitioner, _Batches(batches))
  # Independently: per-token log-probs in float64 from the logits, mean over the choice.
  want = []
  for batch in batches:
    flat = {k: v.reshape((E * C,) + v.shape[2:]) for k, v in batch.items()
            if k != CHOICE_IS_CORRECT}
    logits = np.asarray(jax.jit(model.logits)(params, flat), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    log_p = np.take_along_axis(log_p, flat['decoder_target_tokens'][..., None], -1)[..., 0]
    weights = flat['decoder_loss_weights']
    beta = ((log_p * weights).sum(-1) / np.maximum(weights.sum(-1), 1)).reshape(E, C)
    for e in range(E):
      if batch[CHOICE_IS_CORRECT][e].any():
        want.append((int(np.argmax(beta[e])), int(np.argmax(batch[CHOICE_IS_CORRECT][e]))))
  assert ranked['num_examples'] == results['task/num_examples'] == len(want) == 2 * E - 1
  assert [(p['prediction'], p['label']) for p in ranked['predictions']] == want
  accuracy = np.mean([p == label for p, label in want])
  np.testing.assert_allclose([ranked['accuracy'], results['task/rank_accuracy']], accuracy)
  path = rank_classification.write_predictions(str(tmp_path), 'task', ranked)
  assert [json.loads(line) for line in open(path)] == ranked['predictions']
