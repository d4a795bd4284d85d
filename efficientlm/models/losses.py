"""Cross-entropy with label smoothing and z-loss (T5X conventions), in float32."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def cross_entropy_with_logits(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                              label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Per-token (total loss, z-loss part), each [...].

  Label smoothing puts `1 - label_smoothing` on the target and spreads the rest evenly over the
  other `V - 1` tokens; the entropy of that target distribution is subtracted, so a perfect
  prediction scores 0 (as T5X does). The z-loss `z_loss * logsumexp(logits)**2` keeps the
  softmax normalizer near 1 (Chowdhery et al. 2022).
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}.')
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  target_log_prob = target_logit - log_z
  if label_smoothing > 0.0:
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    # Soft target = low everywhere + (confidence - low) on the target: no one-hot in memory.
    sum_log_probs = jnp.sum(logits, axis=-1) - vocab * log_z
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    loss = -(confidence - low) * target_log_prob - low * sum_log_probs - entropy
  else:
    loss = -target_log_prob
  z = z_loss * jnp.square(log_z)
  return loss + z, z


def normalizer(num_tokens: jax.Array, loss_normalizing_factor: str | float | None) -> jax.Array:
  """The denominator of the loss: the weighted token count, a constant, or 1 (a plain sum)."""
  if loss_normalizing_factor is None:
    return jnp.asarray(1.0, jnp.float32)
  if loss_normalizing_factor == 'num_real_target_tokens':
    return jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1e-8)
  if isinstance(loss_normalizing_factor, (int, float)):
    return jnp.asarray(float(loss_normalizing_factor), jnp.float32)
  raise ValueError(f'loss_normalizing_factor {loss_normalizing_factor!r}: use '
                   "'num_real_target_tokens', a number, or None.")
