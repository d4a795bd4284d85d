"""Interim `make train`: a few AdamW steps of a gin-configured model on one fixed random batch.

Until the trainer (efficientlm/training) lands, this is the smallest honest end-to-end job: gin
model + mesh, sharded init, a jitted and sharded train step, and a loss that must fall (the model
memorizes the batch). Usage:

  python scripts/train.py --gin_file=models/decoder/tiny.gin --gin_file=meshes/data_parallel.gin \
      [--gin.ACTIVATION_DTYPE="'float32'"] [--steps=30] [--batch_size=8] [--length=64]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efficientlm import gin_config


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--gin_bindings', action='append', default=[])
  parser.add_argument('--gin_search_paths', action='append', default=[])
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--learning_rate', type=float, default=3e-3)
  parser.add_argument('--seed', type=int, default=0)
  args, rest = parser.parse_known_args(argv)
  for flag in rest:  # T5X-style --gin.NAME=VALUE
    if not flag.startswith('--gin.') or '=' not in flag:
      parser.error(f'unrecognized argument {flag}')
    name, value = flag[len('--gin.'):].split('=', 1)
    args.gin_bindings.append(f'{name} = {value}')
  args.gin_file = args.gin_file or ['models/decoder/tiny.gin', 'meshes/data_parallel.gin']
  return args


def random_batch(model, batch_size: int, length: int, vocab: int, seed: int):
  """Random targets; decoder inputs are the targets shifted right, as seqio builds them."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, value in model.dummy_batch(batch_size, {'inputs': length,
                                                    'targets': length}).items():
    batch[name] = rng.integers(2, vocab, size=value.shape, dtype=np.int32)
  targets = batch['decoder_target_tokens']
  batch['decoder_input_tokens'] = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return batch


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  gin_config.parse(args.gin_file, args.gin_bindings, args.gin_search_paths)
  model, partitioner = gin_config.macro('MODEL'), gin_config.macro('PARTITIONER')
  vocab = model.module.config.vocab_size
  print(f'devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh '
        f'{dict(partitioner.mesh.shape)}; rules {partitioner.rules!r}')

  batch = partitioner.shard_batch(random_batch(model, args.batch_size, args.length, vocab,
                                               args.seed))
  params, shardings, _ = partitioner.sharded_init(
      lambda rng: model.init(rng, batch)['params'], jax.random.key(args.seed))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'model: {type(model.module).__name__}, {n_params / 1e6:.2f}M parameters')

  optimizer = optax.adamw(args.learning_rate)

  def train_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  with partitioner.context():
    opt_state = jax.jit(optimizer.init)(params)
    step = jax.jit(train_step, donate_argnums=(0, 1))
    first = last = None
    start = time.time()
    for i in range(1, args.steps + 1):
      params, opt_state, metrics = step(params, opt_state, batch)
      loss = float(metrics['loss'])
      if not jnp.isfinite(loss):
        raise FloatingPointError(f'loss is {loss} at step {i}')
      first, last = first if first is not None else loss, loss
      if i == 1 or i % 5 == 0 or i == args.steps:
        print(f'step {i:4d}  loss {loss:.4f}  accuracy {float(metrics["accuracy"]):.3f}  '
              f'({time.time() - start:.1f}s)', flush=True)
  print(f'loss {first:.4f} -> {last:.4f} over {args.steps} steps on one fixed batch of '
        f'{args.batch_size}x{args.length} random tokens (memorization).')
  return first, last


if __name__ == '__main__':
  main()
