"""The training loop (T5X style), read top to bottom in phases:
mesh -> data -> state (abstract, then restored or initialized) -> step functions -> hooks -> loop.

Checkpointing, evaluation, logging and profiling are hooks with an `every=` period. SIGTERM
(TPU preemption) saves a checkpoint at the current step and returns; a non-finite loss stops the
run naming the step, and the state that produced it is never checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from efficientlm import partitioning, storage
from efficientlm.checkpoints.load import load_params
from efficientlm.checkpoints.restore import RestoreOptions, partitioned_initializer
from efficientlm.errors import ConfigError, RunLockedError
from efficientlm.models.model import STREAM_RESET_FEATURE, BaseModel, EncoderDecoderModel
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training import run_lock
from efficientlm.training.data_source import (DataSource, global_batch_spec, make_eval_iterators,
                                              make_iterator)
from efficientlm.training.evaluation import evaluate_params
from efficientlm.training import metrics as metrics_lib
from efficientlm.training.optimizers import Optimizer
from efficientlm.training.parameter_efficient import META_KEY, FrozenBase, combine, count
from efficientlm.training.preemption import PreemptionWatcher
from efficientlm.training.steps import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class Hook:
  """Runs `fn(step)` every `every` steps (None: never periodically) and, if `at_end`, at the end."""

  every: int | None
  fn: Callable[[int], None]
  at_end: bool = True

  def maybe_run(self, step: int, last: bool) -> None:
    if (self.every and step % self.every == 0) or (last and self.at_end):
      self.fn(step)


# ----------------------------------------------------------------------------------------------
# State.


def abstract_state(model: BaseModel, optimizer: Optimizer, partitioner: partitioning.Partitioner,
                   batch_spec, params=None) -> tuple[TrainState, Any, Callable]:
  """(abstract TrainState carrying shardings, its shardings, params init fn). Nothing allocated.
  `params`: the abstract parameters that train (default: all of the model's)."""
  init_params = model.param_initializer(batch_spec)
  if params is None:
    params, _ = partitioner.abstract_params(init_params, jax.random.key(0))
  with partitioner.context():
    opt_init = jax.jit(optimizer.tx.init).lower(params).compile()
  opt_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           jax.eval_shape(optimizer.tx.init, params), opt_init.output_shardings)
  replicated = jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec())
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                     params=params, opt_state=opt_state)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  return state, shardings, init_params


def abstract_recurrent(model: BaseModel, partitioner: partitioning.Partitioner, batch_spec,
                       scanned: bool):
  """The carried layer state's abstract tree, each leaf sharded over the data axes along its
  batch axis (the second under scanned layers, after the layer axis)."""
  if STREAM_RESET_FEATURE not in batch_spec:
    raise ConfigError(
        'This model carries its layers\' state from one training step to the next '
        '(TransformerConfig.carry_state), so row r of each batch must continue row r\'s text: '
        'train on document streams (DatasetConfig.document_streams = True, shuffle = False, '
        'pack = False; e.g. --gin.train/data_config.DatasetConfig.document_streams=True), or '
        'set carry_state = False to start every row fresh.')
  axis = 1 if scanned else 0

  def sharded(a):
    logical = [None] * len(a.shape)
    logical[axis] = 'batch'
    spec = partitioning.logical_to_spec(logical, partitioner.axis_rules.activations,
                                        partitioner.mesh)
    return jax.ShapeDtypeStruct(a.shape, a.dtype,
                                sharding=jax.sharding.NamedSharding(partitioner.mesh, spec))

  return jax.tree.map(sharded, model.recurrent_spec(batch_spec))


def _zeros(abstract_tree):
  return jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_tree),
                 out_shardings=jax.tree.map(lambda a: a.sharding, abstract_tree))()


def _fresh_opt_state(optimizer, partitioner, params, abstract: TrainState):
  with partitioner.context():
    return jax.jit(optimizer.tx.init,
                   out_shardings=jax.tree.map(lambda x: x.sharding, abstract.opt_state))(params)


def _fresh_state(optimizer, partitioner, init_params, abstract: TrainState, seed: int):
  params, _, _ = partitioner.sharded_init(init_params, jax.random.key(seed))
  return params, _fresh_opt_state(optimizer, partitioner, params, abstract)


def _step_array(step: int, abstract: TrainState) -> jax.Array:
  return jax.device_put(jnp.asarray(step, jnp.int32), abstract.step.sharding)


# ----------------------------------------------------------------------------------------------
# The loop.


def train(*,
          model: BaseModel,
          partitioner: partitioning.Partitioner,
          model_dir: str,
          train_dataset: DataSource,
          optimizer: Optimizer,
          total_steps: int,
          eval_dataset: DataSource | None = None,
          num_microbatches: int = 1,
          seed: int = 0,
          log_every: int = 100,
          checkpoint_every: int | None = 1000,
          keep_checkpoints: int | None = 3,
          keep_checkpoints_every: int | None = None,
          async_checkpointing: bool = True,
          eval_every: int | None = 1000,
          max_eval_batches: int | None = None,
          restore_path: str | None = None,
          restore_options: RestoreOptions | None = None,
          base_checkpoint: str | None = None,
          profile_steps: tuple[int, int] | None = None) -> dict[str, float]:
  """Trains `model` for `total_steps` and returns the last logged and eval metrics.

  Holds MODEL_DIR's run lock (run_lock.py) throughout. Resumes from the newest readable
  checkpoint in `model_dir` (see checkpoints.py for what happens to damaged ones, and to those
  of another configuration: the run stops before writing anything); otherwise starts from
  `restore_path`'s parameters (another run, a T5X or a Hugging Face checkpoint;
  `restore_options` maps names, falls back to scratch, see efficientlm.checkpoints.restore) or
  from scratch. A parameters-only checkpoint in `model_dir` (written by upcycling) gets a fresh
  optimizer state.

  A model with (IA)3 vectors (TransformerConfig.ia3) trains only them, on the frozen parameters
  of `base_checkpoint` (any format; on resume, the base the checkpoints recorded), and checkpoints
  only them (training/parameter_efficient.py).
  """
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}.')
  model_dir = storage.as_path(model_dir)  # gs:// kept
  log = metrics_lib.log
  results: dict[str, float] = {}
  cleanup = contextlib.ExitStack()  # closed, in reverse order, however the run ends
  with cleanup:
    preemption = cleanup.enter_context(PreemptionWatcher())
    lock = cleanup.enter_context(run_lock.hold(model_dir, enabled=jax.process_index() == 0))

    def stopped_in_startup(phase: str) -> bool:
      if preemption.requested:
        log(f'{preemption.signal_name} during start-up ({phase}): stopped before the first step, '
            'nothing to save.')
      return preemption.requested

    # --- mesh (the partitioner) and data -------------------------------------------------------
    log(f'mesh {dict(partitioner.mesh.shape)} over {jax.device_count()} '
        f'{jax.devices()[0].platform} devices, rules {partitioner.rules!r}')
    with metrics_lib.phase('building the data pipeline'):
      iterator = make_iterator(train_dataset, model.feature_converter)
      batch_spec = global_batch_spec(iterator)
    global_batch = next(iter(batch_spec.values())).shape[0]
    partitioner.local_batch_size(global_batch)  # divisibility, with a clear error
    if stopped_in_startup('data pipeline'):
      return results

    # --- state: abstract, then restored or initialized -----------------------------------------
    # Nothing is written to MODEL_DIR before the restore has accepted its checkpoints.
    with metrics_lib.phase('tracing the model and optimizer state'):
      # A parameter-efficient run trains a part of the parameters; the frozen rest is read from
      # its base checkpoint below, and stays out of the state (never updated nor checkpointed).
      frozen_base = FrozenBase.for_run(model, base_checkpoint, restore_path)
      trainable = abstract_frozen = None
      if frozen_base is not None:
        trainable, abstract_frozen = frozen_base.split_abstract(model, partitioner, batch_spec)
      abstract, state_shardings, init_params = abstract_state(model, optimizer, partitioner,
                                                              batch_spec, trainable)
      if model.carries_state:
        abstract = abstract.replace(recurrent=abstract_recurrent(
            model, partitioner, batch_spec, model.module.config.scan_layers))
        state_shardings = jax.tree.map(lambda x: x.sharding, abstract)
    num_params = count(combine(abstract.params, abstract_frozen))
    checkpointer = ckpt_lib.Checkpointer(model_dir / 'checkpoints', keep_checkpoints,
                                         keep_checkpoints_every, async_checkpointing)
    cleanup.callback(checkpointer.close)
    had_checkpoints = bool(checkpointer.steps())
    with (metrics_lib.phase(f'reading the newest good checkpoint in {checkpointer.directory}')
          if had_checkpoints else contextlib.nullcontext()):
      restored = checkpointer.restore_latest(abstract.params, abstract.opt_state, iterator,
                                             abstract.recurrent)
    if had_checkpoints and (restored is None or restored.opt_state is None):
      # Starting the data from its beginning: a fresh iterator, whatever a step set aside as
      # damaged may have done to this one.
      iterator = make_iterator(train_dataset, model.feature_converter)
    if restored is not None:
      start, params, opt_state = restored.step, restored.params, restored.opt_state
      log(f'resumed from {model_dir / "checkpoints" / str(start)}')
      if opt_state is None:
        opt_state = _fresh_opt_state(optimizer, partitioner, params, abstract)
    elif restore_path:
      start = 0
      with metrics_lib.phase(f'initializing {num_params / 1e6:.2f}M parameters from '
                             f'{restore_path}'):
        initializer = partitioned_initializer(partitioner, init_params, jax.random.key(seed))
        step, params, _ = load_params(restore_path, abstract.params, restore_options,
                                      initializer)
        opt_state = _fresh_opt_state(optimizer, partitioner, params, abstract)
      log(f'initialized parameters from {restore_path} (step {step})')
    elif frozen_base is not None:
      start = 0
      params = frozen_base.init_trainable(abstract.params)
      opt_state = _fresh_opt_state(optimizer, partitioner, params, abstract)
    else:
      start = 0
      with metrics_lib.phase(f'initializing {num_params / 1e6:.2f}M parameters'):
        params, opt_state = _fresh_state(optimizer, partitioner, init_params, abstract, seed)
    frozen, meta = None, None
    if frozen_base is not None:  # the rest of the parameters: the base checkpoint's, frozen
      with metrics_lib.phase('reading the frozen base parameters'):
        frozen = frozen_base.load(abstract_frozen, _recorded_base(restored), str(model_dir),
                                  restore_options, partitioned_initializer(
                                      partitioner, init_params, jax.random.key(seed)))
      meta = frozen_base.meta
      trained = count(abstract.params)
      log(f'(IA)3: training {trained:,} of {num_params:,} parameters '
          f'({100 * trained / num_params:.4f}%); the base is frozen')
    recurrent = None
    if abstract.recurrent is not None:  # resumed streams continue their state
      recurrent = (restored.recurrent if restored is not None and restored.recurrent is not None
                   else _zeros(abstract.recurrent))
    state = TrainState(step=_step_array(start, abstract), params=params, opt_state=opt_state,
                       recurrent=recurrent)
    log(f'{type(model.module).__name__}: {num_params / 1e6:.2f}M parameters; global batch '
        f'{global_batch}, {num_microbatches} microbatch(es); steps {start} -> {total_steps}')
    if stopped_in_startup('state'):
      return results
    if jax.process_index() == 0:
      _write_gin_config(model_dir, 'config.gin', gin.config_str)
      cleanup.callback(_write_gin_config, model_dir, 'operative_config.gin',
                       gin.operative_config_str)
    writer = metrics_lib.MetricWriter(model_dir / 'train')
    eval_writer = metrics_lib.MetricWriter(model_dir / 'eval')
    cleanup.callback(writer.close)
    cleanup.callback(eval_writer.close)

    # --- step functions ---------------------------------------------------------------------------
    batch_shardings = {k: partitioner.batch_sharding(len(v.shape)) for k, v in batch_spec.items()}
    # The frozen parameters, if any, are the step's third argument: read, never donated.
    frozen_args = () if frozen is None else (frozen,)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen_args)
    with partitioner.context():
      train_step = jax.jit(make_train_step(model, optimizer, num_microbatches, seed),
                           in_shardings=(state_shardings, batch_shardings, *frozen_shardings),
                           out_shardings=(state_shardings, None), donate_argnums=(0,))
      eval_step = jax.jit(make_eval_step(model), in_shardings=(
          combine(state_shardings.params, *frozen_shardings), None))
      params_finite = jax.jit(lambda p: jnp.all(jnp.asarray(
          [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))
      if start < total_steps:  # ahead of the first step, so that the wait is named and timed
        with metrics_lib.phase('compiling the train step'):
          train_step = train_step.lower(abstract, {
              k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
              for k, v in batch_spec.items()}, *frozen_args).compile()
    if stopped_in_startup('compilation'):
      return results

    tokens_per_step, flops = step_work(model, batch_spec)
    peak = metrics_lib.peak_flops_per_device()

    # --- hooks ------------------------------------------------------------------------------------
    latest: dict[str, Any] = {'metrics': None, 'step': start}
    progress = metrics_lib.Progress(start, total_steps)

    def stop(problem):
      checkpointer.wait()
      good = checkpointer.steps()
      raise FloatingPointError(
          f'{problem}; stopping. The last good checkpoint is '
          f'{model_dir / "checkpoints" / str(good[-1]) if good else "none (none was saved)"}.')

    def check_finite(step, metrics):
      loss = float(metrics['loss'])
      if not np.isfinite(loss):
        stop(f'Loss is {loss} at step {step}')

    def check_params_finite(step):
      # A finite loss at step s says nothing of the parameters its update produced.
      if not bool(params_finite(state.params)):
        stop(f'Parameters are not finite after step {step}')

    def check_lock():
      if lock is not None and not lock.verify():
        raise RunLockedError(f'The run lock {lock.path} was taken over by another process; this '
                             'run stopped without saving so as not to write over its checkpoints.')

    def log_metrics(step):
      values = {k: float(v) for k, v in jax.device_get(latest['metrics']).items()}
      step_time, bar = progress.update(step)
      values.update(step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                    mfu=flops / step_time / (peak * jax.device_count()) if peak else None)
      writer.write(step, values, [metrics_lib.train_line(step, values, bar),
                                  metrics_lib.moe_line(values)])
      results.update(values)

    def save(step):
      check_finite(step, latest['metrics'])
      check_params_finite(step)
      check_lock()
      checkpointer.save(step, state.params, state.opt_state, iterator,
                        wait=not async_checkpointing, meta=meta, recurrent=state.recurrent)

    def run_eval(step):
      if eval_dataset is None:
        return
      scores = evaluate_params(combine(state.params, frozen), eval_step, partitioner,
                               make_eval_iterators(eval_dataset, model.feature_converter),
                               max_eval_batches)
      eval_writer.write(step, scores, metrics_lib.eval_lines(step, scores))
      results.update({f'eval/{k}': v for k, v in scores.items()})

    hooks = [Hook(log_every, log_metrics), Hook(checkpoint_every, save),
             Hook(eval_every, run_eval)]
    if profile_steps is not None:
      hooks.append(Hook(1, _profiler(*profile_steps, model_dir / 'profile'), at_end=False))

    # --- loop -------------------------------------------------------------------------------------
    step = start
    while step < total_steps:
      local = next(iterator)
      if step == start and stopped_in_startup('first batch'):
        return results
      state, metrics = train_step(state, partitioner.shard_batch(local), *frozen_args)
      if latest['metrics'] is not None:  # check the previous step while this one runs
        check_finite(step, latest['metrics'])
      step += 1
      latest['metrics'], latest['step'] = metrics, step
      checkpointer.poll()  # says 'saved checkpoint' once a background save has committed
      if preemption.should_stop(step):
        check_finite(step, metrics)
        check_params_finite(step)
        check_lock()
        checkpointer.save(step, state.params, state.opt_state, iterator, wait=True, meta=meta,
                          recurrent=state.recurrent)
        log(f'{preemption.signal_name}: saved checkpoint {step} and stopped; run the same command '
            'again to resume from it.')
        return results
      for hook in hooks:
        hook.maybe_run(step, last=step == total_steps)
    if start == total_steps:
      log(f'already at step {total_steps}: nothing to train.')
      run_eval(step)
    checkpointer.finish()
    return results


def _recorded_base(restored: ckpt_lib.Restored | None) -> dict[str, Any] | None:
  """The base checkpoint a restored (IA)3 run's checkpoint names."""
  meta = (restored.meta or {}) if restored is not None else {}
  return (meta.get(META_KEY) or {}).get('base_checkpoint')


def _write_gin_config(model_dir: epath.Path, name: str, render: Callable[[], str]) -> None:
  """A gin config of this run (nothing when the trainer is called without gin). It is also
  written on the way out of a failed run: a full disk is said in one line, not raised over the
  error that stopped the run."""
  text = render()
  if not text.strip():
    return
  try:
    (model_dir / name).write_text(text)
  except OSError as e:
    metrics_lib.log(f'Could not write {model_dir / name}: {e}.')


def step_work(model: BaseModel, batch_spec) -> tuple[int, float]:
  """(target tokens, training FLOPs) of one step on global batches shaped like `batch_spec`,
  padding included. The network's rows are every axis of the targets but the last: [batch], or
  [examples, choices] for a task with answer choices (one row per choice); FLOPs are
  metrics.flops_per_example (one row of the given lengths) times the rows."""
  targets = batch_spec['decoder_target_tokens'].shape
  rows = int(np.prod(targets[:-1]))
  lengths = {'targets': targets[-1]}
  if 'encoder_input_tokens' in batch_spec:
    lengths['inputs'] = batch_spec['encoder_input_tokens'].shape[-1]
  flops = metrics_lib.flops_per_example(model.module.config, lengths,
                                        isinstance(model, EncoderDecoderModel))
  return rows * targets[-1], flops * rows


def _profiler(first: int, last: int, directory: epath.Path) -> Callable[[int], None]:
  """Traces steps first..last with jax.profiler into `directory` (view with TensorBoard)."""

  def maybe_trace(step):
    if step == first:
      jax.profiler.start_trace(str(directory))
    elif step == last:
      jax.profiler.stop_trace()
      metrics_lib.log(f'profile of steps {first}-{last} written to {directory}')

  return maybe_trace
