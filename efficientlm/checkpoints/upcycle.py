"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints"; T5X's sparse_upcycle.gin): a dense checkpoint becomes the first checkpoint of
an MoE run.

Every MoE layer's experts are copies of that layer's dense MLP (`mlp/wi_0` -> `mlp/expert/wi_0`
repeated E times), its router starts from scratch, every other parameter is copied, and the
optimizer state starts fresh (the checkpoint holds parameters only; the trainer initializes the
rest when it resumes). Which layers are sparse, how many experts and the capacity factors come
from the MoE model's gin. Arrays are read and tiled one at a time on the devices, so host memory
holds one device slice of one dense array at a time, never the model.

  python -m efficientlm.main --run_mode=upcycle --gin_file=models/switch/upcycle_t5_1_1_tiny.gin \
      --gin_file=runs/upcycle.gin --gin.DENSE_CHECKPOINT="'/ckpt/checkpoint_0'" \
      --gin.MODEL_DIR="'/runs/moe'"
  # then the same command with --run_mode=train continues from it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from efficientlm import partitioning, storage
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import RestoreOptions, partitioned_initializer, restore
from efficientlm.checkpoints.source import flatten, unflatten
from efficientlm.models.model import BaseModel
from efficientlm.training import checkpoints as ckpt_lib
from efficientlm.training.metrics import log

# MoE parameters named after the dense ones they come from (canonical, unscanned names).
UPCYCLE_ASSIGNMENT = ((r'(.*)/mlp/expert/(.*)', r'\1/mlp/\2'),
                      (r'.*/mlp/router/.*', None))


def abstract_params(model: BaseModel, partitioner: partitioning.Partitioner, seed: int = 0):
  """(abstract parameters with shardings, init fn): shapes need no data, so a dummy batch."""
  batch = model.dummy_batch(partitioner.data_shards(), {'inputs': 8, 'targets': 8})
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  init_params = model.param_initializer(spec)
  abstract, _ = partitioner.abstract_params(init_params, jax.random.key(seed))
  return abstract, init_params


def add_expert_noise(params, scale: float, seed: int):
  """Multiplies every expert weight by (1 + scale * N(0, 1)), independently per expert and entry,
  so copies can diverge (the paper found small noise neutral; 0 turns it off)."""
  if scale <= 0:
    return params
  flat = flatten(params)
  for name, value in flat.items():
    if '/expert/' in name:
      key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
      flat[name] = jax.jit(
          lambda x, k: x * (1 + scale * jax.random.normal(k, x.shape, jnp.float32)).astype(
              x.dtype), out_shardings=value.sharding)(value, key)
  return unflatten(flat)


def upcycle(*,
            model: BaseModel,
            partitioner: partitioning.Partitioner,
            model_dir: str,
            dense_checkpoint: str,
            dense_format: str = 'auto',
            expert_noise: float = 0.0,
            reset_step: bool = False,
            assignment_map: Sequence[tuple[str, str | None]] = (),
            seed: int = 0) -> int:
  """Run mode `upcycle`: writes MODEL_DIR/checkpoints/<step> from a dense checkpoint; returns the
  step (the dense checkpoint's, as T5X continues it, or 0 with `reset_step`).

  `assignment_map` entries go before the upcycling ones (e.g. to rename a differently named
  dense model); every dense array must be used and every MoE parameter but the routers loaded.
  """
  directory = storage.as_path(model_dir) / 'checkpoints'
  checkpointer = ckpt_lib.Checkpointer(directory, keep=None, async_save=False)
  existing = checkpointer.steps()
  if existing:
    checkpointer.close()
    raise FileExistsError(f'{directory} already holds checkpoints {existing}; upcycle into a '
                          'new MODEL_DIR (or continue it with --run_mode=train).')
  abstract, init_params = abstract_params(model, partitioner, seed)
  if not any('/expert/' in name for name in flatten(abstract)):
    checkpointer.close()
    raise ValueError('The model has no MoE layers to upcycle into: give an MoE model gin '
                     '(TransformerConfig.moe).')
  source = open_checkpoint(dense_checkpoint, dense_format)
  log(f'upcycling {source.describe()} into {type(model.module).__name__} with '
      f'{model.module.config.moe.num_experts} experts')
  options = RestoreOptions(assignment_map=tuple(assignment_map) + UPCYCLE_ASSIGNMENT,
                           strict=True, tile_experts=True)
  initializer = partitioned_initializer(partitioner, init_params, jax.random.key(seed))
  params, report = restore(source, abstract, options, initializer)
  log(report.summary())
  params = add_expert_noise(params, expert_noise, seed)
  step = 0 if reset_step or source.step is None else source.step
  checkpointer.save(step, params, wait=True,
                    meta={'upcycled_from': str(dense_checkpoint), 'expert_noise': expert_noise})
  checkpointer.close()
  log(f'wrote upcycled checkpoint {directory / str(step)} (parameters only; training continues '
      'from it with a fresh optimizer state)')
  return step
