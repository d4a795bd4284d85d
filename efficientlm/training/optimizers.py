"""Optimizers and learning-rate schedules (optax), with T5/T5X defaults.

An `Optimizer` pairs the optax transformation with its schedule so the trainer can log the
learning rate of every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
import optax

from efficientlm import gin_config
from efficientlm.errors import ConfigError

Schedule = Callable[[int], float]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation
  schedule: Schedule


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
  """T5's inverse square root: base / sqrt(max(step, warmup)), constant during warmup."""
  if warmup_steps <= 0:
    warmup = _knob(rsqrt_schedule, 'warmup_steps', warmup_steps)
    raise ConfigError(f'rsqrt_schedule needs warmup_steps > 0, but {warmup} = {warmup_steps}: set '
                     f'{warmup} to a positive number of steps (T5 uses 10000).')

  def schedule(step):
    return base_learning_rate * jnp.reciprocal(jnp.sqrt(jnp.maximum(step, warmup_steps)))

  return schedule


def _knob(fn: Callable, parameter: str, value) -> str:
  """What a user sets to change `parameter` of `fn`: its gin macro, or the parameter's name."""
  macro = gin_config.binding_source(f'{fn.__module__}.{fn.__name__}', parameter)
  # The macro only if it gave this value: a direct call while a gin config is loaded is not
  # the config's doing.
  return macro if macro and gin.query_parameter(f'%{macro}') == value else parameter


def constant_schedule(learning_rate: float) -> Schedule:
  return optax.constant_schedule(learning_rate)


def _check_warmup(schedule: Callable[..., Schedule], warmup_steps: int, total_steps: int) -> None:
  """0 <= warmup_steps < total_steps, else an error naming the gin knobs that set them."""
  if not 0 <= warmup_steps < total_steps:
    warmup = _knob(schedule, 'warmup_steps', warmup_steps)
    total = _knob(schedule, 'total_steps', total_steps)
    raise ConfigError(f'{schedule.__name__} needs 0 <= warmup_steps < total_steps, but '
                      f'{warmup} = {warmup_steps} and {total} = {total_steps}: raise {total} or '
                      f'lower {warmup}.')


def warmup_cosine_schedule(peak_learning_rate: float, warmup_steps: int, total_steps: int,
                           final_fraction: float = 0.1) -> Schedule:
  """Linear warmup to the peak, then cosine decay to `final_fraction` of it at `total_steps`."""
  _check_warmup(warmup_cosine_schedule, warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, peak_learning_rate, warmup_steps, total_steps,
                                            peak_learning_rate * final_fraction)


def warmup_linear_decay_schedule(peak_learning_rate: float, warmup_steps: int,
                                 total_steps: int) -> Schedule:
  """Linear warmup from 0 to the peak, then linear decay to 0 at `total_steps` (T-Few's schedule,
  Liu et al. 2022: 60 warmup steps of 1000)."""
  _check_warmup(warmup_linear_decay_schedule, warmup_steps, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_learning_rate, warmup_steps),
       optax.linear_schedule(peak_learning_rate, 0.0, total_steps - warmup_steps)], [warmup_steps])


def adafactor(learning_rate: Schedule = rsqrt_schedule(),
              decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True,
              min_dim_size_to_factor: int = 128,
              momentum: float | None = None,
              weight_decay_rate: float | None = None,
              max_grad_norm: float | None = None) -> Optimizer:
  """Adafactor as T5 trains with it (Shazeer & Stern 2018): factored second moments for
  matrices, decay 0.8, update clipping at 1.0, updates scaled by parameter RMS, no momentum."""
  tx = optax.adafactor(learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                       decay_rate=decay_rate, clipping_threshold=clipping_threshold,
                       momentum=momentum, multiply_by_parameter_scale=multiply_by_parameter_scale,
                       weight_decay_rate=weight_decay_rate)
  return Optimizer(_with_clipping(tx, max_grad_norm), learning_rate)


def adamw(learning_rate: Schedule,
          b1: float = 0.9,
          b2: float = 0.95,
          eps: float = 1e-8,
          weight_decay: float = 0.1,
          max_grad_norm: float | None = 1.0) -> Optimizer:
  """AdamW (Loshchilov & Hutter 2019) with GPT-3's betas and weight decay, global-norm clipping.

  Weight decay applies to projection kernels and embeddings only, never to norm scales or the
  relative position tables (by parameter name, so scanned [layers, d] scales are spared too).
  """
  tx = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                   mask=_decayed)
  return Optimizer(_with_clipping(tx, max_grad_norm), learning_rate)


_DECAYED = ('kernel', 'embedding')


def _decayed(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[-1], 'key', '')) in _DECAYED, params)


def _with_clipping(tx: optax.GradientTransformation,
                   max_grad_norm: float | None) -> optax.GradientTransformation:
  if max_grad_norm is None:
    return tx
  if max_grad_norm <= 0:
    raise ValueError(f'max_grad_norm must be positive or None, got {max_grad_norm}.')
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
