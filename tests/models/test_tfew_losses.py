"""T-Few's losses and rank classification (tfew_losses.py) vs numpy references of the paper's
equations, and their place in BaseModel's loss sums."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.errors import ConfigError
from efficientlm.models import tfew_losses
from efficientlm.models.model import CHOICE_IS_CORRECT
from tests import helpers

# 3 examples x 3 choices x 5 tokens: example 0 has all choices; example 1 has padding tokens and
# its choice 2 absent (no weighted token); example 2 is padding (no choice, nothing correct).
WEIGHTS = np.array([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                    [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]],
                    [[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]], np.float32)
IS_CORRECT = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], np.int32)


# Jitted: eagerly, every jnp op compiles on its own.
_LN = jax.jit(tfew_losses.length_normalized_loss)
_UL = jax.jit(tfew_losses.unlikelihood_loss)
_SCORES = jax.jit(tfew_losses.choice_scores, static_argnums=2)


def _log_probs(seed=0):
  return -np.random.default_rng(seed).uniform(0.05, 3.0, WEIGHTS.shape).astype(np.float32)


def _reference(log_p, weights, is_correct):
  """Per example (L_LN, L_UL, betas) in float64, choice by choice as the paper writes them."""
  log_p, weights = np.asarray(log_p, np.float64), np.asarray(weights, np.float64)
  ln, ul, betas = [], [], []
  for e in range(log_p.shape[0]):
    present = [n for n in range(log_p.shape[1]) if weights[e, n].sum() > 0]
    beta = {n: (log_p[e, n] * weights[e, n]).sum() / weights[e, n].sum() for n in present}
    betas.append([beta.get(n, -np.inf) for n in range(log_p.shape[1])])
    if not is_correct[e].any():
      ln.append(0.0), ul.append(0.0)
      continue
    star = int(np.argmax(is_correct[e]))
    ln.append(-(beta[star] - np.log(sum(np.exp(beta[n]) for n in present))))
    wrong = [n for n in present if n != star]
    total = -sum((np.log1p(-np.exp(log_p[e, n])) * weights[e, n]).sum() for n in wrong)
    tokens = sum(weights[e, n].sum() for n in wrong)
    ul.append(total / tokens if tokens else 0.0)
  return np.array(ln), np.array(ul), np.array(betas)


def test_losses_and_scores_match_the_papers_equations():
  log_p = _log_probs()
  ln, ul, betas = _reference(log_p, WEIGHTS, IS_CORRECT)
  np.testing.assert_allclose(_LN(log_p, WEIGHTS, IS_CORRECT), ln, rtol=1e-5)
  log_one_minus_p = np.log1p(-np.exp(log_p.astype(np.float64))).astype(np.float32)
  np.testing.assert_allclose(_UL(log_one_minus_p, WEIGHTS, IS_CORRECT), ul, rtol=1e-5)
  np.testing.assert_allclose(_SCORES(log_p, WEIGHTS, 'mean'), betas, rtol=1e-5)
  sums = np.where(WEIGHTS.sum(-1) > 0, (log_p * WEIGHTS).sum(-1), -np.inf)
  np.testing.assert_allclose(_SCORES(log_p, WEIGHTS, 'sum'), sums, rtol=1e-6)
  assert ln[2] == ul[2] == 0 and ln[0] > 0 and ul[1] > 0


def test_length_normalized_loss_gradient_is_softmax_minus_one_hot_over_lengths():
  log_p = _log_probs(1)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(_LN(x, WEIGHTS, IS_CORRECT))))(log_p)
  _, _, betas = _reference(log_p, WEIGHTS, IS_CORRECT)
  want = np.zeros_like(WEIGHTS)
  for e in range(2):  # the padding example has no gradient
    softmax = np.exp(betas[e] - np.log(np.sum(np.exp(betas[e]))))  # exp(-inf) = 0: absent
    coefficient = softmax - IS_CORRECT[e]
    lengths = np.maximum(WEIGHTS[e].sum(-1), 1)
    want[e] = coefficient[:, None] * WEIGHTS[e] / lengths[:, None]
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_rank_classification_where_length_normalization_changes_the_answer():
  # Choice 0: one token at log p -2 (sum -2, mean -2); choice 1: four at -0.6 (sum -2.4, mean
  # -0.6); choice 2 absent. Example 1 ties choices 0 and 1 (the first wins, as numpy's argmax).
  log_p = np.array([[[-2.0, 0, 0, 0], [-0.6] * 4, [0.0] * 4],
                    [[-1.0, -1.0, 0, 0], [-1.0, -1.0, 0, 0], [-5.0, 0, 0, 0]]], np.float32)
  weights = np.array([[[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
                      [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]], np.float32)
  is_correct = np.array([[0, 1, 0], [0, 1, 0]], np.int32)

  @jax.jit
  def classify(log_p):
    mean, total = (tfew_losses.choice_scores(log_p, weights, s) for s in ('mean', 'sum'))
    return [f(x, is_correct) if f is tfew_losses.rank_correct else f(x)
            for x in (mean, total)
            for f in (tfew_losses.rank_predictions, tfew_losses.rank_correct)]

  mean_predicted, mean_right, sum_predicted, sum_right = classify(log_p)
  np.testing.assert_array_equal(mean_predicted, [1, 0])
  np.testing.assert_array_equal(sum_predicted, [0, 0])
  np.testing.assert_array_equal(mean_right, [1, 0])
  np.testing.assert_array_equal(sum_right, [0, 0])
  with pytest.raises(ValueError, match="'median'"):
    tfew_losses.choice_scores(log_p, weights, 'median')


def test_log_one_minus_p_is_exact_where_the_naive_form_overflows():
  logits = np.array([[30.0, 0.0, 0.0, 0.0], [0.5, 1.0, -2.0, 0.0]], np.float32)
  targets = np.array([0, 1])
  z = logits.astype(np.float64)
  others = [np.log(np.exp(np.delete(z[i], targets[i])).sum()) for i in range(2)]
  want = np.array(others) - np.log(np.exp(z).sum(-1))
  got, naive = jax.jit(lambda x, t: (tfew_losses.log_one_minus_probs(x, t), jnp.log1p(
      -jnp.exp(tfew_losses.target_log_probs(x, t)))))(logits, targets)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.isinf(naive[0]) and np.isfinite(got[0])  # p = 1 - 3e-13 rounds to 1 in float32


# --- BaseModel: the losses in its loss sums ---------------------------------------------------

E, C, PROMPT, CHOICE, VOCAB = 3, 3, 4, 3, 64


def _choice_batch(seed=0):
  """Decoder-only rows (prompt then choice, loss on the choice) as data/choices.py makes them:
  example 1 has one choice absent, example 2 is padding (all zero)."""
  rng = np.random.default_rng(seed)
  length = PROMPT + CHOICE
  targets = helpers.tokens(rng, (E, C, length), VOCAB)
  targets[:, :, :PROMPT] = targets[:, :1, :PROMPT]  # one prompt per example
  weights = np.zeros((E, C, length), np.float32)
  weights[:, :, PROMPT:] = 1
  targets[0, 2, -1] = 0  # a shorter choice
  targets[1, 1, PROMPT:] = 0  # an absent choice
  targets[2] = 0
  weights[targets == 0] = 0
  inputs = np.concatenate([np.zeros((E, C, 1), np.int32), targets[..., :-1]], axis=-1)
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': weights,
          CHOICE_IS_CORRECT: np.array([[0, 0, 1], [1, 0, 0], [0, 0, 0]], np.int32)}


@pytest.fixture(scope='module')
def setup():
  model = helpers.decoder_model(vocab_size=VOCAB, num_decoder_layers=1)
  batch = _choice_batch()
  params = jax.jit(lambda: helpers.init_params(model, {k: v[0] for k, v in batch.items()
                                                       if k != CHOICE_IS_CORRECT}))()
  return model, params, batch


def _with(model, **fields):
  return dataclasses.replace(model, **fields)


def test_choice_batch_loss_sums_match_numpy(setup):
  model, params, batch = setup
  model = _with(model, unlikelihood_loss_weight=0.5, length_normalized_loss_weight=2.0)
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != CHOICE_IS_CORRECT}
  sums, logits = jax.jit(lambda p: (model.loss_sums(p, batch), model.logits(p, flat)))(params)
  logits = np.asarray(logits, np.float64).reshape(E, C, PROMPT + CHOICE, -1)
  log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets, weights = batch['decoder_target_tokens'], batch['decoder_loss_weights']
  log_p = np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
  correct = batch[CHOICE_IS_CORRECT]
  lm_weights = weights * correct[..., None]
  ln, ul, betas = _reference(log_p, weights, correct)
  tokens = lm_weights.sum()
  np.testing.assert_allclose(sums['num_tokens'], tokens)
  np.testing.assert_allclose(sums['cross_entropy'], -(log_p * lm_weights).sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['choices/examples'], 2)
  right = [int(np.argmax(betas[e]) == np.argmax(correct[e])) for e in range(2)]
  np.testing.assert_allclose(sums['choices/correct'], sum(right))
  np.testing.assert_allclose(sums['choices/length_normalized_loss'], ln.sum(), rtol=1e-5)
  np.testing.assert_allclose(sums['choices/unlikelihood_loss'], ul.sum(), rtol=1e-5)
  lm = sums['loss'] - (tokens / 2) * (2.0 * ln.sum() + 0.5 * ul.sum())
  np.testing.assert_allclose(lm, -(log_p * lm_weights).sum() + sums['z_loss'], rtol=1e-5)
  loss, metrics = model.normalize(sums)
  # L = L_LM + 0.5 L_UL + 2 L_LN, each per-example loss averaged over the 2 real examples.
  want = (-(log_p * lm_weights).sum() + sums['z_loss']) / tokens + (
      0.5 * ul[:2].mean() + 2.0 * ln[:2].mean())
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['rank_accuracy'], sum(right) / 2)
  np.testing.assert_allclose(metrics['length_normalized_loss'], ln[:2].mean(), rtol=1e-5)


def test_options_off_leave_lm_batches_bit_for_bit_and_score_only_correct_choices(setup):
  model, params, batch = setup
  tfew = _with(model, unlikelihood_loss_weight=1.0, length_normalized_loss_weight=1.0,
               rank_classification_score='sum')
  lm_batch = helpers.lm_batch(3, 4, 8, VOCAB)
  rows = {k: v[batch[CHOICE_IS_CORRECT] > 0] for k, v in batch.items() if k != CHOICE_IS_CORRECT}
  plain, with_tfew, off, alone = jax.jit(lambda p: (
      model.loss_sums(p, lm_batch), tfew.loss_sums(p, lm_batch), model.loss_sums(p, batch),
      model.loss_sums(p, rows)))(params)
  assert set(plain) == set(with_tfew) == {'loss', 'z_loss', 'cross_entropy', 'correct',
                                          'num_tokens'}
  for key in plain:
    np.testing.assert_array_equal(plain[key], with_tfew[key])
  # With the options at 0, a batch with choices is the LM loss of its correct choices alone.
  for key in alone:
    np.testing.assert_allclose(off[key], alone[key], rtol=1e-6)


def test_bad_options_are_config_errors(setup):
  model, _, _ = setup
  with pytest.raises(ConfigError, match='unlikelihood_loss_weight = -1'):
    _with(model, unlikelihood_loss_weight=-1.0)
  with pytest.raises(ConfigError, match="rank_classification_score = 'max'"):
    _with(model, rank_classification_score='max')
