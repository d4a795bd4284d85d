"""Model wrappers: the one interface (init, loss, logits, scores) the trainer and inference use.

A batch is a dict of int arrays in T5X/seqio feature names:
  encoder-decoder: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
    decoder_loss_weights, and for packed data encoder/decoder_segment_ids and _positions;
  decoder-only: decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, and optional
    decoder_segment_ids, decoder_positions, decoder_causal_attention (prefix LM).
A batch of a task with answer choices (efficientlm/data/choices.py) holds each of these as
[examples, choices, length], one choice per row, and choice_is_correct [examples, choices]; the
network sees examples x choices rows, and the loss adds rank classification and T-Few's losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.errors import ConfigError
from efficientlm.layers.moe.layer import MOE_COLLECTION
from efficientlm.models import losses, moe_losses, tfew_losses

Batch = Mapping[str, jax.Array]
# The collection of layer state carried from one training step to the next (block-recurrent
# layers on document streams), and the batch feature that marks rows starting a new document
# (data/document_streams.py), whose state is reset.
RECURRENT = 'recurrent'
STREAM_RESET_FEATURE = 'decoder_stream_reset'
# Present in (and only in) batches of tasks with answer choices: [examples, choices], 1 at the
# correct choice (efficientlm/data/choices.py).
CHOICE_IS_CORRECT = 'choice_is_correct'


@dataclasses.dataclass(frozen=True)
class BaseModel:
  module: nn.Module
  z_loss: float = 0.0
  label_smoothing: float = 0.0
  loss_normalizing_factor: str | float | None = 'num_real_target_tokens'
  # MoE router losses (used only when the network has MoE layers): Switch / ST-MoE weights.
  moe_aux_loss_weight: float = 0.01
  moe_z_loss_weight: float = 1e-3
  # T-Few (Liu et al. 2022; tfew_losses.py), on batches with answer choices only: the weights of
  # the unlikelihood and the length-normalized losses (0: off), and how rank classification
  # scores a choice: 'mean' (log-prob per token, T-Few's) or 'sum'.
  unlikelihood_loss_weight: float = 0.0
  length_normalized_loss_weight: float = 0.0
  rank_classification_score: str = 'mean'

  # Batch features the module takes, the required ones first.
  REQUIRED: ClassVar[tuple[str, ...]] = ()
  OPTIONAL: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    for name in ('unlikelihood_loss_weight', 'length_normalized_loss_weight'):
      if not getattr(self, name) >= 0:
        raise ConfigError(f'{type(self).__name__}.{name} = {getattr(self, name)!r}; it must be '
                          '>= 0 (0 turns the loss off; T-Few uses 1).')
    if self.rank_classification_score not in tfew_losses.SCORES:
      raise ConfigError(f'{type(self).__name__}.rank_classification_score = '
                        f'{self.rank_classification_score!r}; use one of {tfew_losses.SCORES}.')

  @property
  def feature_converter(self) -> str:
    """Name of the seqio feature converter that makes this model's batches (efficientlm.data)."""
    raise NotImplementedError

  def _inputs(self, batch: Batch) -> dict[str, jax.Array]:
    missing = [k for k in self.REQUIRED if k not in batch]
    if missing:
      raise ValueError(f'{type(self).__name__}: batch lacks features {missing}; it has '
                       f'{sorted(batch)}.')
    inputs = {k: batch[k] for k in self.REQUIRED + self.OPTIONAL if k in batch}
    if CHOICE_IS_CORRECT in batch:  # [examples, choices, ...] -> one row per choice
      inputs = {k: _rows(v) for k, v in inputs.items()}
    return inputs

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: Batch):
    """Boxed variables (LogicallyPartitioned leaves); see Partitioner.sharded_init."""
    return self.module.init({'params': rng}, **self._inputs(batch))

  def param_initializer(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
    """rng -> boxed parameters, for batches shaped like `batch_spec` (shapes and dtypes)."""

    def init_params(rng):
      dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
      return self.init(rng, dummy)['params']

    return init_params

  @property
  def carries_state(self) -> bool:
    """Whether the network keeps layer state across training steps (TransformerConfig.
    carry_state: block-recurrent layers trained on document streams)."""
    return bool(getattr(self.module.config, 'carry_state', False))

  def recurrent_spec(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]):
    """Shapes and dtypes of the carried state for batches like `batch_spec` (all zeros means
    every row starts fresh); nothing is computed."""
    def init(rng):
      dummy = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_spec.items()}
      return nn.unbox(self.init(rng, dummy).get(RECURRENT, {}))

    return jax.eval_shape(init, jax.random.key(0))

  def reset_recurrent(self, recurrent, reset: jax.Array):
    """Zeroes (fresh state) the rows where `reset` [batch] is nonzero. Scanned layers stack the
    state on a leading layer axis, so the batch axis is then the second."""
    axis = 1 if self.module.config.scan_layers else 0

    def keep(x):
      shape = [1] * x.ndim
      shape[axis] = x.shape[axis]
      return x * (reset == 0).reshape(shape).astype(x.dtype)

    return jax.tree.map(keep, recurrent)

  def _apply(self, params, batch: Batch, rng: jax.Array | None):
    """(logits, MoE summary). `rng` is the training randomness: dropout, router jitter and LSH draw
    from their own streams of it; None means deterministic (evaluation, scoring)."""
    logits, moe, _ = self._apply_with_state(params, batch, rng, None)
    return logits, moe

  def _apply_with_state(self, params, batch: Batch, rng: jax.Array | None, recurrent):
    """(logits, MoE summary, carried state after the batch). `recurrent` None: no state carried
    in (each row fresh) and none returned."""
    rngs = None
    if rng is not None:
      rngs = {'dropout': jax.random.fold_in(rng, 0), 'jitter': jax.random.fold_in(rng, 1),
              'lsh': jax.random.fold_in(rng, 2)}  # LSH attention's fresh hash rotations
    variables, mutable = {'params': params}, [MOE_COLLECTION]
    if recurrent is not None:
      variables[RECURRENT] = recurrent
      mutable.append(RECURRENT)
    logits, state = self.module.apply(variables, **self._inputs(batch),
                                      enable_dropout=rng is not None, rngs=rngs, mutable=mutable)
    return logits, moe_losses.summarize(state), state.get(RECURRENT)

  def logits(self, params, batch: Batch, rng: jax.Array | None = None) -> jax.Array:
    """Logits; dropout (and router jitter) are on exactly when an RNG is given (training)."""
    return self._apply(params, batch, rng)[0]

  @staticmethod
  def _weights(batch: Batch) -> jax.Array:
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] > 0
    return weights.astype(jnp.float32)

  def loss_sums(self, params, batch: Batch, rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Weighted sums over the batch: loss, z_loss, cross_entropy, correct, num_tokens, and for
    MoE models moe/<statistic> (see moe_losses) times num_tokens.

    Sums (not means) so that microbatches add up exactly; `normalize` turns them into the loss
    and metrics of the whole batch. The MoE router losses enter per token: the loss gains
    moe_aux_loss_weight * load balancing + moe_z_loss_weight * router z-loss, both averaged over
    the MoE layers.
    """
    return self._sums(*self._apply(params, batch, rng), batch)

  def loss_sums_with_state(self, params, batch: Batch, rng: jax.Array | None,
                           recurrent) -> tuple[dict[str, jax.Array], Any]:
    """`loss_sums` of a network that carries state across steps: (sums, the state after the
    batch), starting from `recurrent` (see reset_recurrent)."""
    logits, moe, recurrent = self._apply_with_state(params, batch, rng, recurrent)
    return self._sums(logits, moe, batch), recurrent

  def _sums(self, logits, moe, batch: Batch) -> dict[str, jax.Array]:
    targets, weights = batch['decoder_target_tokens'], self._weights(batch)
    is_correct = batch.get(CHOICE_IS_CORRECT)
    if is_correct is not None:  # answer choices: the LM loss counts the correct choices only
      choice_weights = weights
      targets, weights = _rows(targets), _rows(weights * (is_correct[..., None] > 0))
    per_token, z = losses.cross_entropy_with_logits(logits, targets, self.z_loss,
                                                    self.label_smoothing)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    num_tokens = jnp.sum(weights)
    cross_entropy = jnp.sum((per_token - z) * weights)
    loss = jnp.sum(per_token * weights)
    if moe:
      loss += num_tokens * (self.moe_aux_loss_weight * moe['load_balancing_loss'] +
                            self.moe_z_loss_weight * moe['router_z_loss'])
    choice_sums = {}
    if is_correct is not None:
      choice_sums = self._choice_sums(logits, targets, choice_weights, is_correct)
      if self.unlikelihood_loss_weight or self.length_normalized_loss_weight:
        loss += self._choice_loss(choice_sums, num_tokens)
    sums = {'loss': loss, 'z_loss': jnp.sum(z * weights), 'cross_entropy': cross_entropy,
            'correct': jnp.sum(correct * weights), 'num_tokens': num_tokens}
    sums.update({f'moe/{k}': v * num_tokens for k, v in moe.items()})
    sums.update(choice_sums)
    return sums

  def _choice_sums(self, logits, targets, weights, is_correct) -> dict[str, jax.Array]:
    """Sums over the examples of a batch with answer choices: real examples, rank-classified
    correctly, and T-Few's per-example losses (tfew_losses.py). weights [E, C, L]: every
    choice's loss weights; logits and targets: its E*C rows."""
    log_probs = tfew_losses.target_log_probs(logits, targets).reshape(weights.shape)
    scores = tfew_losses.choice_scores(log_probs, weights, self.rank_classification_score)
    sums = {
        'choices/examples': jnp.sum(tfew_losses.is_example(is_correct).astype(jnp.float32)),
        'choices/correct': jnp.sum(tfew_losses.rank_correct(scores, is_correct)),
        'choices/length_normalized_loss': jnp.sum(
            tfew_losses.length_normalized_loss(log_probs, weights, is_correct)),
    }
    if self.unlikelihood_loss_weight:  # a second logsumexp over the vocabulary: only if used
      log_one_minus_p = tfew_losses.log_one_minus_probs(logits, targets).reshape(weights.shape)
      sums['choices/unlikelihood_loss'] = jnp.sum(
          tfew_losses.unlikelihood_loss(log_one_minus_p, weights, is_correct))
    return sums

  def _choice_loss(self, sums, num_tokens) -> jax.Array:
    """T-Few's weighted per-example losses, to add to the summed LM loss, which the trainer
    divides by the LM's normalizer. With 'num_real_target_tokens' they are scaled by tokens /
    examples (constants), so that they enter as their mean over the batch's examples, as in
    T-Few (over microbatches each is scaled by its own ratio: equal to the full batch when the
    ratios are); with a constant or no normalizer they are summed like the tokens' losses."""
    extra = jnp.zeros((), jnp.float32)
    if self.length_normalized_loss_weight:
      extra += self.length_normalized_loss_weight * sums['choices/length_normalized_loss']
    if self.unlikelihood_loss_weight:
      extra += self.unlikelihood_loss_weight * sums['choices/unlikelihood_loss']
    if self.loss_normalizing_factor != 'num_real_target_tokens':
      return extra
    scale = jnp.maximum(num_tokens, 1e-8) / jnp.maximum(sums['choices/examples'], 1.0)
    return jax.lax.stop_gradient(scale) * extra

  def normalize(self, sums: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) from `loss_sums`, summed over any number of microbatches."""
    denominator = losses.normalizer(sums['num_tokens'], self.loss_normalizing_factor)
    tokens = jnp.maximum(sums['num_tokens'], 1e-8)
    metrics = {
        'loss': sums['loss'] / denominator,
        'z_loss': sums['z_loss'] / denominator,
        'cross_entropy': sums['cross_entropy'] / denominator,
        'accuracy': sums['correct'] / tokens,
        'num_tokens': sums['num_tokens'],
    }
    metrics.update({k: v / tokens for k, v in sums.items() if k.startswith('moe/')})
    if 'choices/examples' in sums:  # answer choices: per-example means
      examples = jnp.maximum(sums['choices/examples'], 1e-8)
      metrics.update({'rank_accuracy': sums['choices/correct'] / examples,
                      'num_examples': sums['choices/examples']})
      metrics.update({k.split('/', 1)[1]: v / examples for k, v in sums.items()
                      if k.endswith('_loss') and k.startswith('choices/')})
    return metrics['loss'], metrics

  def loss_fn(self, params, batch: Batch,
              rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross-entropy (with z-loss, label smoothing, MoE router losses) and metrics."""
    return self.normalize(self.loss_sums(params, batch, rng))

  def token_scores(self, params, batch: Batch) -> jax.Array:
    """log p(target token) at every position, zero where the loss weight is zero; shaped like
    the targets ([examples, choices, length] for a batch with answer choices)."""
    logits = self.logits(params, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch['decoder_target_tokens']
    scores = jnp.take_along_axis(log_probs, targets.reshape(logits.shape[:-1])[..., None],
                                 -1)[..., 0]
    return scores.reshape(targets.shape) * self._weights(batch)

  def score(self, params, batch: Batch) -> jax.Array:
    """Log-likelihood of each sequence's targets, [batch] (or [examples, choices])."""
    return jnp.sum(self.token_scores(params, batch), axis=-1)

  def predict(self, params, prompts: jax.Array, options=None, rng: jax.Array | None = None):
    """Decodes prompts [batch, P] (right-padded with 0; the encoder inputs of an
    encoder-decoder model) with a KV cache: an efficientlm.inference.decoding.Decoded."""
    from efficientlm.inference import decoding  # inference builds on the models, not back
    return decoding.generate(self, params, prompts, options or decoding.DecodeOptions(), rng)


def _rows(x: jax.Array) -> jax.Array:
  """[examples, choices, ...] -> [examples * choices, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def _zeros(batch_size: int, length: int) -> jax.Array:
  return jnp.zeros((batch_size, length), jnp.int32)


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel(BaseModel):
  REQUIRED = ('encoder_input_tokens', 'decoder_input_tokens')
  OPTIONAL = ('decoder_target_tokens', 'encoder_segment_ids', 'decoder_segment_ids',
              'encoder_positions', 'decoder_positions')

  @property
  def feature_converter(self) -> str:
    return 'enc_dec'

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    """lengths: {'inputs': encoder length, 'targets': decoder length}."""
    return {'encoder_input_tokens': _zeros(batch_size, lengths['inputs']),
            'decoder_input_tokens': _zeros(batch_size, lengths['targets']),
            'decoder_target_tokens': _zeros(batch_size, lengths['targets'])}


@dataclasses.dataclass(frozen=True)
class DecoderOnlyModel(BaseModel):
  """`prefix_lm=True` trains on seqio's prefix-LM features (inputs attended bidirectionally)."""

  prefix_lm: bool = False

  REQUIRED = ('decoder_input_tokens',)
  OPTIONAL = ('decoder_target_tokens', 'decoder_segment_ids', 'decoder_positions',
              'decoder_causal_attention')

  @property
  def feature_converter(self) -> str:
    return 'prefix_lm' if self.prefix_lm else 'decoder'

  def dummy_batch(self, batch_size: int, lengths: Mapping[str, int]) -> dict[str, jax.Array]:
    """lengths: {'targets': length} (and 'inputs' for a prefix LM, which sees both)."""
    length = lengths['targets'] + (lengths.get('inputs', 0) if self.prefix_lm else 0)
    batch = {'decoder_input_tokens': _zeros(batch_size, length),
             'decoder_target_tokens': _zeros(batch_size, length)}
    if self.prefix_lm:
      batch['decoder_causal_attention'] = _zeros(batch_size, length)
    return batch
