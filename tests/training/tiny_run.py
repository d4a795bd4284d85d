"""The tiny training run the trainer tests share; `python -m tests.training.tiny_run DIR STEPS
DELAY [WIDE]` runs it in a subprocess (for preemption, locking and disk-full tests), sleeping DELAY
seconds per batch; WIDE=1 uses `wide_model` (arrays large enough for Orbax data files). A RunError
ends the subprocess as `python -m efficientlm.main` ends: its message, exit status 1."""

from __future__ import annotations

import pathlib
import sys

import jax

from efficientlm import partitioning
from efficientlm.checkpoints.load import load_params
from efficientlm.errors import RunError
from efficientlm.training import optimizers, trainer
from tests import helpers
from tests.training import fake_data

VOCAB, LENGTH, BATCH = 32, 8, 8


def model():
  return helpers.decoder_model(vocab_size=VOCAB)


def wide_model():
  """Kernels of 64 x 256 floats: Orbax writes them to data files, not inline in its b-tree, so a
  flipped byte there changes values rather than the file's structure."""
  return helpers.decoder_model(vocab_size=VOCAB, emb_dim=64, mlp_dim=256)


def partitioner(devices=None, shape=(2, 4), axes=('data', 'model'), rules='tensor_parallel'):
  return partitioning.Partitioner(shape, axes, rules, devices=devices)


def adamw(learning_rate=3e-3):
  return optimizers.adamw(optimizers.constant_schedule(learning_rate), weight_decay=0.01)


def latest_params(model_dir, for_model=None):
  """(step, parameters) of the newest checkpoint of a run of `for_model` (default: `model()`)."""
  batch = helpers.lm_batch(0, BATCH, LENGTH, VOCAB)
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  abstract, _ = partitioner().abstract_params(
      (for_model or model()).param_initializer(spec), jax.random.key(0))
  step, params, _ = load_params(str(pathlib.Path(model_dir) / 'checkpoints'), abstract)
  return step, params


def train(model_dir, steps, log=None, delay=0.0, hold=None, **kwargs):
  source = fake_data.source(BATCH, LENGTH, VOCAB, log=log, delay=delay, hold=hold)
  args = dict(model=model(), partitioner=partitioner(), model_dir=str(model_dir),
              train_dataset=source, optimizer=adamw(), total_steps=steps, log_every=5,
              checkpoint_every=10, eval_dataset=None, eval_every=None, async_checkpointing=True)
  args.update(kwargs)
  return trainer.train(**args)


if __name__ == '__main__':
  directory, total, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
  wide = len(sys.argv) > 4 and sys.argv[4] == '1'
  try:
    train(directory, total, delay=pause, log_every=1, **({'model': wide_model()} if wide else {}))
  except RunError as e:
    print(f'efficientlm: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
