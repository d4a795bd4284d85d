"""(IA)3 against full fine-tuning: trained parameters, optimizer memory and train-step time.

One model gin, in one process on one device, two ways (Liu et al. 2022, sec. 3.3):
- full: every parameter trains (Adafactor at a constant 1e-3, as runs/finetune.gin);
- ia3: TransformerConfig.ia3, only the (IA)3 vectors train (Adafactor at 3e-3, 60 warmup steps,
  linear decay over 1000, gradient norm clipped at 1, as runs/ia3_finetune.gin), the step jitted
  as the trainer jits it: the state donated, the frozen base an argument.
Measured per way: trained and total parameters; optimizer-state bytes (the state's arrays);
XLA's memory analysis of the compiled step (arguments + outputs - aliased + temporaries);
seconds per step on the same batch; the device's peak memory where it reports one (GPU/TPU;
cumulative, so the second way's peak includes the first's).

Step times are taken in --rounds interleaved rounds (the ways alternate which goes first), each
way --steps_per_round steps per round after a warm-up step; the time ratio is the median over
rounds of (median ia3 step / median full step) within the round, so that load from other jobs
on shared machines hits both ways alike. The JSON gives ia3 / full ratios. Accuracy is not
measured here: run runs/finetune.gin and runs/ia3_finetune.gin on a task from the same
checkpoint and compare their eval.

  python -m benchmarks.ia3_bench --gin_file=models/t5_1_1/base.gin --batch_size 8 \
      --inputs 256 --targets 64
  # the tiny decoder of runs/tfew.gin on stdlib_code_next_line's batches (8 examples x 4 choices
  # x 176 bytes), with T-Few's losses and runs/finetune.gin's dropout, as in its runs:
  python -m benchmarks.ia3_bench --gin_file=models/decoder/tiny.gin --gin_file=runs/tfew.gin \
      --gin_bindings='DROPOUT_RATE = 0.1' --task stdlib_code_next_line --batch_size 8 \
      --inputs 128 --targets 48
  python -m benchmarks.ia3_bench --quick   # CPU smoke test: models/t5_1_1/tiny.gin

--task reads the first training batch of a task (unshuffled, unpacked; --batch_size examples of
--inputs and --targets tokens) instead of random tokens. Writes
benchmarks/results/ia3_vs_full[_<task>]_<platform>.json. Times on CPU say little about
accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from benchmarks import environment
from benchmarks.architectures_bench import device_peak_bytes, memory, single_device_partitioner
from efficientlm import gin_config
from efficientlm.training import optimizers, trainer
from efficientlm.training.parameter_efficient import FrozenBase, count, split
from efficientlm.training.steps import make_train_step

WAYS = ('full', 'ia3')
OPTIMIZERS = {  # as runs/finetune.gin and runs/ia3_finetune.gin set them
    'full': 'adafactor, constant 1e-3',
    'ia3': 'adafactor, 3e-3 warmup 60 linear decay to 1000, max_grad_norm 1.0',
}


def _optimizer(way: str) -> optimizers.Optimizer:
  if way == 'full':
    return optimizers.adafactor(optimizers.constant_schedule(1e-3))
  return optimizers.adafactor(optimizers.warmup_linear_decay_schedule(3e-3, 60, 1000),
                              max_grad_norm=1.0)


def _with_ia3(model, on: bool):
  cfg = dataclasses.replace(model.module.config, ia3=on)
  return dataclasses.replace(model, module=model.module.clone(config=cfg))


def task_batch(model, task: str, batch_size: int, lengths: dict) -> dict[str, np.ndarray]:
  """The first training batch of `task` as the trainer would read it (unshuffled, unpacked)."""
  from efficientlm.data.config import DatasetConfig  # pylint: disable=g-import-not-at-top
  from efficientlm.training.data_source import make_iterator  # pylint: disable=g-import-not-at-top
  cfg = DatasetConfig(task, lengths, batch_size=batch_size, shuffle=False, pack=False)
  return {k: np.asarray(v) for k, v in next(make_iterator(cfg, model.feature_converter)).items()}


def random_batch(model, batch_size: int, lengths: dict) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  vocab = model.module.config.vocab_size
  return {k: rng.integers(2, vocab, v.shape).astype(v.dtype)
          for k, v in model.dummy_batch(batch_size, lengths).items()}


def prepare(model, way: str, batch: dict[str, np.ndarray]) -> dict:
  """Compiles `way`'s step, initializes its state and runs one warm-up step. Returns the static
  measurements and what `run_steps` needs."""
  model = _with_ia3(model, way == 'ia3')
  partitioner = single_device_partitioner()
  optimizer = _optimizer(way)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainable = frozen_abstract = None
  if way == 'ia3':
    trainable, frozen_abstract = FrozenBase(None).split_abstract(model, partitioner, spec)
  abstract, shardings, init_params = trainer.abstract_state(model, optimizer, partitioner, spec,
                                                            trainable)
  frozen_shardings = () if frozen_abstract is None else (
      jax.tree.map(lambda x: x.sharding, frozen_abstract),)
  batch_shardings = {k: partitioner.batch_sharding(len(v.shape)) for k, v in spec.items()}
  params, _, _ = partitioner.sharded_init(init_params, jax.random.key(0))
  frozen = ()
  if way == 'ia3':
    params, base = split(params, FrozenBase(None).trainable)
    frozen = (base,)
  with partitioner.context():
    step = jax.jit(make_train_step(model, optimizer),
                   in_shardings=(shardings, batch_shardings, *frozen_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(abstract, {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
        for k, v in spec.items()}, *frozen).compile()
    opt_state = jax.jit(optimizer.tx.init, out_shardings=shardings.opt_state)(params)
  state = type(abstract)(step=jax.device_put(np.int32(0), shardings.step), params=params,
                         opt_state=opt_state)
  sharded = partitioner.shard_batch(batch)
  state, _ = compiled(state, sharded, *frozen)  # warm-up
  jax.block_until_ready(state)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
  stats = {'way': way, 'optimizer': OPTIMIZERS[way], 'trained_params': count(abstract.params),
           'total_params': count(abstract.params) + (count(frozen[0]) if frozen else 0),
           'optimizer_state_bytes': int(opt_bytes), **memory(compiled),
           'device_peak_bytes': device_peak_bytes()}
  return {'stats': stats, 'compiled': compiled, 'state': state, 'batch': sharded,
          'frozen': frozen}


def run_steps(way: dict, steps: int) -> list[float]:
  """Seconds of each of `steps` steps (the state carries on from the previous call)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    way['state'], _ = way['compiled'](way['state'], way['batch'], *way['frozen'])
    jax.block_until_ready(way['state'])
    times.append(time.perf_counter() - start)
  return times


def interleaved_times(ways: dict[str, dict], rounds: int, steps: int) -> dict[str, list]:
  """way -> per-round lists of step seconds; the first way of a round alternates."""
  times = {name: [] for name in ways}
  for r in range(rounds):
    for name in (WAYS if r % 2 == 0 else WAYS[::-1]):
      times[name].append(run_steps(ways[name], steps))
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--task', default=None, help='measure on this task\'s first batch')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=256, help='encoder length (enc-dec)')
  parser.add_argument('--targets', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps_per_round', type=int, default=5)
  parser.add_argument('--quick', action='store_true', help='tiny T5 on CPU, 2 rounds of 2')
  args = parser.parse_args(argv)
  if args.quick:
    args.gin_file, args.inputs, args.targets = ['models/t5_1_1/tiny.gin'], 32, 16
    args.rounds, args.steps_per_round = 2, 2
  gin_config.parse(args.gin_file or ['models/t5_1_1/small.gin'], args.gin_bindings)
  model = gin_config.macro('MODEL')
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  batch = (task_batch(model, args.task, args.batch_size, lengths) if args.task
           else random_batch(model, args.batch_size, lengths))
  ways = {way: prepare(model, way, batch) for way in WAYS}
  times = interleaved_times(ways, args.rounds, args.steps_per_round)
  round_ratios = [statistics.median(i) / statistics.median(f)
                  for f, i in zip(times['full'], times['ia3'])]
  results = []
  for name, way in ways.items():
    flat = [t for round_times in times[name] for t in round_times]
    results.append(dict(way['stats'], seconds=statistics.median(flat),
                        seconds_per_round=[round(statistics.median(t), 6) for t in times[name]]))
  full, ia3 = results
  ratios = {f'{k}_ratio': (round(ia3[k] / full[k], 6) if ia3[k] is not None and full[k] else None)
            for k in ('trained_params', 'optimizer_state_bytes', 'memory_bytes', 'temp_bytes',
                      'argument_bytes')}
  ratios.update(seconds_ratio=round(statistics.median(round_ratios), 6),
                seconds_ratio_rounds=[round(r, 6) for r in round_ratios])
  config = dict(vars(args), batch_shapes={k: list(v.shape) for k, v in batch.items()},
                batch_source=f'{args.task}: first training batch' if args.task else 'random')
  name = 'ia3_vs_full' + (f'_{args.task}' if args.task else '')
  path = environment.write(name, config, {'ways': results, 'ia3_over_full': ratios})
  for r in results:
    print(f"{r['way']:>4}: trains {r['trained_params']:,} of {r['total_params']:,} parameters, "
          f"optimizer state {r['optimizer_state_bytes'] / 2**20:.3f} MiB, step memory "
          f"{(r['memory_bytes'] or 0) / 2**20:.1f} MiB, {r['seconds'] * 1e3:.1f} ms/step")
  print(f'ia3 / full: {ratios}\nwrote {path}')


if __name__ == '__main__':
  main()
