"""The train and eval steps: pure functions of (state, batch), jitted by the trainer.

A parameter-efficient run (training/parameter_efficient.py) trains only `state.params`, a part
of the model's parameters; the step then also takes the frozen rest, which it reads and never
returns (the trainer neither donates nor checkpoints it), and differentiates the loss with respect
to the trained part only.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from efficientlm import partitioning
from efficientlm.models import losses
from efficientlm.models.model import STREAM_RESET_FEATURE, BaseModel
from efficientlm.training.optimizers import Optimizer
from efficientlm.training.parameter_efficient import combine

# Named RNG streams, folded with the step so a resumed run draws what an uninterrupted one would.
DROPOUT_STREAM = 1


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # The layers' state carried to the next step (BaseModel.carries_state), else None.
  recurrent: Any = None


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int) -> dict[str, jax.Array]:
  """[B, ...] -> [n, B / n, ...], microbatch j holding rows j, j + n, j + 2n, ...

  Strided rather than contiguous, so each microbatch is spread over all data-parallel devices
  instead of living on a few of them.
  """

  def split(x):
    if x.shape[0] % num_microbatches:
      raise ValueError(f'Batch size {x.shape[0]} is not divisible by num_microbatches '
                       f'{num_microbatches}.')
    x = x.reshape((x.shape[0] // num_microbatches, num_microbatches) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return partitioning.constrain(x, (None, 'batch') + (None,) * (x.ndim - 2))

  return {k: split(v) for k, v in batch.items()}


def make_train_step(model: BaseModel, optimizer: Optimizer, num_microbatches: int = 1,
                    seed: int = 0):
  """step(state, batch, frozen=None) -> (state, metrics). Gradients of the summed loss are
  accumulated over microbatches and divided once by the whole batch's normalizer: equal to the
  full-batch step. `frozen`: the parameters that do not train (see the module docstring)."""
  if num_microbatches < 1:
    raise ValueError(f'num_microbatches must be >= 1, got {num_microbatches}.')
  base_key = jax.random.key(seed)

  def sums_and_grads(params, frozen, batch, rng):
    def summed_loss(p):
      sums = model.loss_sums(combine(p, frozen), batch, rng)
      return sums['loss'], sums

    (_, sums), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
    return sums, grads

  def stateful_sums_and_grads(params, frozen, batch, rng, recurrent):
    """Truncated backprop through time: the carried state enters as a constant (the layers
    stop its gradient), the state after this batch leaves for the next step."""
    recurrent = model.reset_recurrent(recurrent, batch[STREAM_RESET_FEATURE])

    def summed_loss(p):
      sums, new_state = model.loss_sums_with_state(combine(p, frozen), batch, rng, recurrent)
      return sums['loss'], (sums, new_state)

    (_, (sums, new_state)), grads = jax.value_and_grad(summed_loss, has_aux=True)(params)
    return sums, grads, new_state

  def step(state: TrainState, batch, frozen=None) -> tuple[TrainState, dict[str, jax.Array]]:
    rng = jax.random.fold_in(jax.random.fold_in(base_key, DROPOUT_STREAM), state.step)
    recurrent = state.recurrent
    if recurrent is not None:
      if num_microbatches != 1:  # each row's state must see its segments in order, whole
        raise ValueError('A model that carries state across steps trains on whole batches: set '
                         f'num_microbatches = 1 (got {num_microbatches}).')
      sums, grads, recurrent = stateful_sums_and_grads(state.params, frozen, batch, rng,
                                                       recurrent)
    elif num_microbatches == 1:
      sums, grads = sums_and_grads(state.params, frozen, batch, rng)
    else:
      microbatches = split_microbatches(batch, num_microbatches)

      def accumulate(carry, xs):
        microbatch, index = xs
        sums, grads = sums_and_grads(state.params, frozen, microbatch,
                                     jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          sums_and_grads, state.params, frozen, jax.tree.map(lambda x: x[0], microbatches), rng))
      (sums, grads), _ = jax.lax.scan(accumulate, zeros,
                                      (microbatches, jnp.arange(num_microbatches)))
    loss, metrics = model.normalize(sums)
    denominator = losses.normalizer(sums['num_tokens'], model.loss_normalizing_factor)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=jnp.asarray(optimizer.schedule(state.step), jnp.float32))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      recurrent=recurrent), metrics

  return step


def make_eval_step(model: BaseModel):
  """eval_step(params, batch) -> the batch's loss sums (see BaseModel.loss_sums)."""

  def eval_step(params, batch):
    return model.loss_sums(params, batch)

  return eval_step
