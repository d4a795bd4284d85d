"""Model wrappers: the one interface (init, loss, logits, scores) the trainer and inference use.

A batch is a dict of int arrays in T5X/seqio feature names:
  encoder-decoder: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
    decoder_loss_weights, and for packed data encoder/decoder_segment_ids and _positions;
  decoder-only: decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, and optional
    decoder_segment_ids, decoder_positions, decoder_causal_attention (prefix LM).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.models import losses

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BaseModel:
  module: nn.Module
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  loss_normalizing_factor: str | float | None = 'num_real_target_tokens'

  # Batch features the module takes, the required ones first.
  REQUIRED: ClassVar[tuple[str, ...]] = ()
  OPTIONAL: ClassVar[tuple[str, ...]] = ()

  def _inputs(self, batch: Batch) -> dict[str, jax.Array]:
    missing = [k for k in self.REQUIRED if k not in batch]
    if missing:
      raise ValueError(f'{type(self).__name__}: batch lacks features {missing}; it has '
                       f'{sorted(batch)}.')
    return {k: batch[k] for k in self.REQUIRED + self.OPTIONAL if k in batch}

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: Batch):
    """Boxed variables (LogicallyPartitioned leaves); see Partitioner.sharded_init."""
    return self.module.init({'params': rng}, **self._inputs(batch))

  def logits(self, params, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Logits; dropout is on exactly when a dropout RNG is given (training)."""
    rngs = None if dropout_rng is None else {'dropout': dropout_rng}
    return self.module.apply({'params': params}, **self._inputs(batch),
                             enable_dropout=dropout_rng is not None, rngs=rngs)

  @staticmethod
  def _weights(batch: Batch) -> jax.Array:
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] > 0
    return weights.astype(jnp.float32)

  def loss_fn(self, params, batch: Batch,
              dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross-entropy (with z-loss, label smoothing) and its metrics (sums and means)."""
    logits = self.logits(params, batch, dropout_rng)
    targets, weights = batch['decoder_target_tokens'], self._weights(batch)
    per_token, z = losses.cross_entropy_with_logits(logits, targets, self.z_loss,
                                                    self.label_smoothing)
    denominator = losses.normalizer(weights, self.loss_normalizing_factor)
    loss = jnp.sum(per_token * weights) / denominator
    num_tokens = jnp.sum(weights)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        'loss': loss,
        'z_loss': jnp.sum(z * weights) / denominator,
        'cross_entropy': jnp.sum((per_token - z) * weights) / denominator,
        'accuracy': jnp.sum(correct * weights) / jnp.maximum(num_tokens, 1e-8),
        'num_tokens': num_tokens,
    }
    return loss, metrics

  def token_scores(self, params, batch: Batch) -> jax.Array:
    """log p(target token) at every position, zero where the loss weight is zero."""
    logits = self.logits(params, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    scores = jnp.take_along_axis(log_probs, batch['decoder_target_tokens'][..., None], -1)[..., 0]
    return scores * self._weights(batch)

  def score_batch(self, params, batch: Batch) -> jax.Array:
    """Log-likelihood of each sequence's targets, [batch]."""
    return jnp.sum(self.token_scores(params, batch), axis=-1)


def _zeros(batch_size: int, length: int) -> jax.Array:
  return jnp.zeros((batch_size, length), jnp.int32)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(BaseModel):
  REQUIRED = ('encoder_input_tokens', 'decoder_input_tokens')
  OPTIONAL = ('decoder_target_tokens', 'encoder_segment_ids', 'decoder_segment_ids',
              'encoder_positions', 'decoder_positions')

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    """lengths: {'inputs': encoder length, 'targets': decoder length}."""
    return {'encoder_input_tokens': _zeros(batch_size, lengths['inputs']),
            'decoder_input_tokens': _zeros(batch_size, lengths['targets']),
            'decoder_target_tokens': _zeros(batch_size, lengths['targets'])}


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(BaseModel):
  REQUIRED = ('decoder_input_tokens',)
  OPTIONAL = ('decoder_target_tokens', 'decoder_segment_ids', 'decoder_positions',
              'decoder_causal_attention')

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    """lengths: {'targets': sequence length}."""
    return {'decoder_input_tokens': _zeros(batch_size, lengths['targets']),
            'decoder_target_tokens': _zeros(batch_size, lengths['targets'])}
