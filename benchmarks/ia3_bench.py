"""(IA)3 against full fine-tuning: trained parameters, optimizer memory and train-step time.

One model gin, in one process on one device, two ways (Liu et al. 2022, sec. 3.3):
- full: every parameter trains (Adafactor, as runs/finetune.gin);
- ia3: TransformerConfig.ia3, only the (IA)3 vectors train (Adafactor, as runs/ia3_finetune.gin),
  the step jitted as the trainer jits it: the state donated, the frozen base an argument.
Measured per way: trained and total parameters; optimizer-state bytes (the state's arrays);
XLA's memory analysis of the compiled step (arguments + outputs - aliased + temporaries);
seconds per step (median of --repeats after a warm-up, same random batch); the device's peak
memory where it reports one (GPU/TPU; cumulative, so the second way's peak includes the first's).
The JSON gives ia3 / full ratios. Accuracy is not measured here: run runs/finetune.gin and
runs/ia3_finetune.gin on a task from the same checkpoint and compare their eval.

  python -m benchmarks.ia3_bench --gin_file=models/t5_1_1/base.gin --batch_size 8 \
      --inputs 256 --targets 64
  python -m benchmarks.ia3_bench --quick   # CPU smoke test: models/t5_1_1/tiny.gin

Writes benchmarks/results/ia3_vs_full_<platform>.json. Times on CPU say little about
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


def _with_ia3(model, on: bool):
  cfg = dataclasses.replace(model.module.config, ia3=on)
  return dataclasses.replace(model, module=model.module.clone(config=cfg))


def measure(model, way: str, batch_size: int, lengths: dict, repeats: int) -> dict:
  model = _with_ia3(model, way == 'ia3')
  partitioner = single_device_partitioner()
  optimizer = optimizers.adafactor(optimizers.constant_schedule(3e-3 if way == 'ia3' else 1e-3))
  rng = np.random.default_rng(0)
  vocab = model.module.config.vocab_size
  batch = {k: rng.integers(2, vocab, v.shape).astype(v.dtype)
           for k, v in model.dummy_batch(batch_size, lengths).items()}
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
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, _ = compiled(state, sharded, *frozen)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state))
  return {'way': way, 'trained_params': count(abstract.params),
          'total_params': count(abstract.params) + (count(frozen[0]) if frozen else 0),
          'optimizer_state_bytes': int(opt_bytes), 'seconds': statistics.median(times),
          **memory(compiled), 'device_peak_bytes': device_peak_bytes()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--inputs', type=int, default=256, help='encoder length (enc-dec)')
  parser.add_argument('--targets', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--quick', action='store_true', help='tiny T5 on CPU, 2 repeats')
  args = parser.parse_args(argv)
  if args.quick:
    args.gin_file, args.inputs, args.targets, args.repeats = (['models/t5_1_1/tiny.gin'], 32, 16,
                                                              2)
  gin_config.parse(args.gin_file or ['models/t5_1_1/small.gin'], args.gin_bindings)
  model = gin_config.macro('MODEL')
  lengths = {'inputs': args.inputs, 'targets': args.targets}
  results = [measure(model, way, args.batch_size, lengths, args.repeats)
             for way in ('full', 'ia3')]
  full, ia3 = results
  ratios = {f'{k}_ratio': (round(ia3[k] / full[k], 6) if ia3[k] is not None and full[k] else None)
            for k in ('trained_params', 'optimizer_state_bytes', 'seconds', 'memory_bytes',
                      'temp_bytes', 'argument_bytes')}
  config = dict(vars(args), optimizer='adafactor (T5 defaults)')
  path = environment.write('ia3_vs_full', config, {'ways': results, 'ia3_over_full': ratios})
  for r in results:
    print(f"{r['way']:>4}: trains {r['trained_params']:,} of {r['total_params']:,} parameters, "
          f"optimizer state {r['optimizer_state_bytes'] / 2**20:.2f} MiB, "
          f"{r['seconds'] * 1e3:.1f} ms/step")
  print(f'ia3 / full: {ratios}\nwrote {path}')


if __name__ == '__main__':
  main()
