"""T-Few's losses over answer choices, and rank classification.

Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.2. For an example with input x, choices y_1..y_C and correct choice y*, with
log p_nt = log p(y_n,t | x, y_n,<t) and loss weights w_nt (1 on a choice's tokens, 0 at padding):

  T_n   = sum_t w_nt                                              the length of choice n
  beta_n = (1 / T_n) sum_t w_nt log p_nt                           length-normalized score
  L_LN  = -log softmax_n(beta)[*] = logsumexp_n beta_n - beta_*    over the choices present
  L_UL  = -sum_{n != *} sum_t w_nt log(1 - p_nt) / sum_{n != *} T_n
  rank classification: argmax_n beta_n, or argmax_n sum_t w_nt log p_nt ('sum')

Shapes: log-probs and weights [E, C, L] (E examples of C choices), choice_is_correct [E, C] with
one 1 per real example. A choice with no weighted token is absent (padding to a fixed C, or a row
of an all-zero padding example): it takes no part in a softmax, a sum or an argmax. A padding
example (no correct choice) scores 0 in every loss.

Deviations from the authors' code (r-three/t-few), which adds 0.01 inside log(1 - p) for
stability: log(1 - p) is computed exactly from the logits as logsumexp of the other tokens'
logits minus logsumexp of all (`log_one_minus_probs`), finite for every p < 1 in float32.
L_UL is normalized per example as in the paper's equation (the code divides the batch's sum by
the batch's count of incorrect-choice tokens).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCORES = ('mean', 'sum')  # rank classification: length-normalized (T-Few) or summed log-probs


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) at every position, float32: logits [..., V], targets [...] -> [...]."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def log_one_minus_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log(1 - p(target)) = logsumexp over the other tokens - logsumexp over all, float32.

  Exact where 1 - p underflows log1p(-exp(log p)) (p within float32 rounding of 1); its gradient
  in the logits is bounded, so confident choices do not blow up the unlikelihood loss."""
  logits = logits.astype(jnp.float32)
  is_target = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.bool_)
  others = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, logits), axis=-1)
  return others - jax.nn.logsumexp(logits, axis=-1)


def choice_lengths(weights: jax.Array) -> jax.Array:
  """T_n: [E, C, L] -> [E, C]."""
  return jnp.sum(weights, axis=-1)


def _present(weights: jax.Array) -> jax.Array:
  return choice_lengths(weights) > 0


def is_example(is_correct: jax.Array) -> jax.Array:
  """[E] bool: the example is real (it has a correct choice), not padding."""
  return jnp.sum(is_correct, axis=-1) > 0


def choice_scores(log_probs: jax.Array, weights: jax.Array, score: str = 'mean') -> jax.Array:
  """Each choice's score [E, C] ('mean': beta_n; 'sum': its log-likelihood); -inf if absent."""
  if score not in SCORES:
    raise ValueError(f'Choice score {score!r}: use one of {SCORES}.')
  summed = jnp.sum(log_probs * weights, axis=-1)
  if score == 'mean':  # max(T, 1): finite everywhere, so masking leaves finite gradients
    summed = summed / jnp.maximum(choice_lengths(weights), 1.0)
  return jnp.where(_present(weights), summed, -jnp.inf)


def rank_predictions(scores: jax.Array) -> jax.Array:
  """argmax_n of scores [E, C] -> [E] (the first choice among equals, as numpy's argmax)."""
  return jnp.argmax(scores, axis=-1)


def rank_correct(scores: jax.Array, is_correct: jax.Array) -> jax.Array:
  """[E] float: 1 where a real example's prediction is its correct choice."""
  predicted = jnp.take_along_axis(is_correct, rank_predictions(scores)[:, None], axis=-1)[:, 0]
  return ((predicted > 0) & is_example(is_correct)).astype(jnp.float32)


def length_normalized_loss(log_probs: jax.Array, weights: jax.Array,
                           is_correct: jax.Array) -> jax.Array:
  """L_LN of each example [E] (0 for padding examples)."""
  lengths = choice_lengths(weights)
  beta = jnp.sum(log_probs * weights, axis=-1) / jnp.maximum(lengths, 1.0)
  present = lengths > 0
  # A padding example has no choice present: let its softmax run over all (finite) and drop it.
  present = present | ~jnp.any(present, axis=-1, keepdims=True)
  log_normalizer = jax.nn.logsumexp(jnp.where(present, beta, -jnp.inf), axis=-1)
  correct_beta = jnp.sum(jnp.where(is_correct > 0, beta, 0.0), axis=-1)
  return jnp.where(is_example(is_correct), log_normalizer - correct_beta, 0.0)


def unlikelihood_loss(log_one_minus_p: jax.Array, weights: jax.Array,
                      is_correct: jax.Array) -> jax.Array:
  """L_UL of each example [E] from log(1 - p) [E, C, L] (0 for padding examples and examples
  without an incorrect choice)."""
  incorrect = (is_correct == 0).astype(weights.dtype)[..., None] * weights
  total = -jnp.sum(log_one_minus_p * incorrect, axis=(-2, -1))
  tokens = jnp.sum(incorrect, axis=(-2, -1))
  return jnp.where(is_example(is_correct), total / jnp.maximum(tokens, 1.0), 0.0)
