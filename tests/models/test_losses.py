"""Cross-entropy, label smoothing, z-loss and the Model wrapper's loss/scores vs numpy."""

import math

import jax
import numpy as np
import pytest

from efficientlm.models import losses
from tests import helpers


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_plain_cross_entropy_and_z_loss():
  logits = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
  targets = np.array([[1, 2, 6], [0, 3, 3]])
  loss, z = losses.cross_entropy_with_logits(logits, targets, z_loss=1e-2)
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(z, 1e-2 * log_z**2, rtol=1e-5)
  np.testing.assert_allclose(loss, nll + 1e-2 * log_z**2, rtol=1e-5)


def test_label_smoothing_against_explicit_soft_targets():
  vocab, ls = 5, 0.1
  logits = np.random.default_rng(1).normal(size=(4, vocab)).astype(np.float32)
  targets = np.array([0, 4, 2, 2])
  soft = np.full((4, vocab), ls / (vocab - 1))
  soft[np.arange(4), targets] = 1 - ls
  entropy = -np.sum(soft[0] * np.log(soft[0]))
  want = -np.sum(soft * _log_softmax(logits), -1) - entropy
  loss, _ = losses.cross_entropy_with_logits(logits, targets, label_smoothing=ls)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Its minimum, zero, is reached by predicting the soft targets themselves.
  best, _ = losses.cross_entropy_with_logits(np.log(soft).astype(np.float32), targets,
                                             label_smoothing=ls)
  np.testing.assert_allclose(best, 0.0, atol=1e-5)


def test_bad_label_smoothing_and_normalizer():
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.cross_entropy_with_logits(np.zeros((1, 3)), np.zeros((1,), int), label_smoothing=1.0)
  with pytest.raises(ValueError, match='loss_normalizing_factor'):
    losses.normalizer(np.float32(3), 'tokens')


def test_model_loss_metrics_and_scores():
  model = helpers.decoder_model()
  model = type(model)(model.module, z_loss=1e-3)
  batch = helpers.lm_batch(2, 2, 8, 64)
  batch['decoder_loss_weights'][1, :2] = 0  # weights, not just padding, select tokens
  params = helpers.init_params(model, batch)
  # The four entry points in one jitted program: op by op, compiling each op costs more.
  outputs = jax.jit(lambda p: (model.logits(p, batch), model.loss_fn(p, batch),
                               model.token_scores(p, batch), model.score(p, batch)))(params)
  logits = np.asarray(outputs[0], np.float64)
  log_probs = _log_softmax(logits)
  targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  log_z = np.log(np.exp(logits).sum(-1))
  n = weights.sum()
  loss, metrics = outputs[1]
  np.testing.assert_allclose(loss, np.sum((nll + 1e-3 * log_z**2) * weights) / n, rtol=1e-5)
  np.testing.assert_allclose(metrics['cross_entropy'], np.sum(nll * weights) / n, rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], np.sum(1e-3 * log_z**2 * weights) / n, rtol=1e-5)
  np.testing.assert_allclose(
      metrics['accuracy'], np.sum((logits.argmax(-1) == targets) * weights) / n, rtol=1e-6)
  assert metrics['num_tokens'] == n
  np.testing.assert_allclose(outputs[2], -nll * weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs[3], np.sum(-nll * weights, -1), rtol=1e-5)
  # Initial loss of a fresh model is near log(vocab): logits start small.
  assert abs(float(metrics['cross_entropy']) - math.log(64)) < 1.0


def test_missing_feature_is_named():
  model = helpers.t5_model()
  with pytest.raises(ValueError, match='encoder_input_tokens'):
    model.init(jax.random.key(0), helpers.lm_batch(0, 1, 4, 64))
