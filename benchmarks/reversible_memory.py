"""Activation memory of a training step by depth: reversible stack vs standard residual stack.

Measures XLA's temporary buffer size (compiled.memory_analysis().temp_size_in_bytes, what the
step needs beyond its inputs and outputs) of the jitted loss + gradient of a stack of pre-norm
attention / feed-forward layers, at 2 and at 12 layers, with the same branches and parameters
in both structures:
  standard    x = x + F(x); x = x + G(x), plain autodiff (every layer's activations kept);
  reversible  y1 = x1 + F(x2); y2 = x2 + G(y1) with the custom VJP of efficientlm.models.reversible.
The claim it checks (issue 18): reversible 12 layers / 2 layers within 1.3x, standard ~6x.
It compiles only (no timing), so any backend gives the numbers; CPU is the reference.

  python -m benchmarks.reversible_memory [--width 256] [--length 512] [--batch 4]

A third row, reversible with the feed-forward in 4 chunks, shows what chunking costs and saves:
it bounds the FFN's [batch, length, d_ff] hidden activation to a quarter (a large saving where
the FFN dominates, e.g. d_ff = 32 d), but on XLA:CPU the chunk loop's backward keeps two
zero-initialized [batch, length, d_model] loop buffers per layer alive, so that row grows with
depth by that much.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.layers.attention import MultiHeadAttention
from efficientlm.layers.mlp import MlpBlock
from efficientlm.layers.norms import RMSNorm
from efficientlm.models import reversible


class AttentionBranch(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = RMSNorm(name='pre_self_attention_layer_norm')(x)
    return MultiHeadAttention(self.num_heads, x.shape[-1] // self.num_heads,
                              name='self_attention')(h, h, mask)


class FeedForwardBranch(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return MlpBlock(self.mlp_dim, name='mlp')(RMSNorm(name='pre_mlp_layer_norm')(x))


@dataclasses.dataclass(frozen=True)
class Setting:
  width: int = 256
  length: int = 512
  batch: int = 4
  num_heads: int = 4
  mlp_factor: int = 4


def temp_bytes(setting: Setting, num_layers: int, structure: str, ff_chunks: int = 1) -> int:
  """Temporary bytes of the compiled loss + gradient (wrt parameters and input)."""
  s = setting
  cfg = reversible.ReversibleConfig(num_layers, ff_chunks=ff_chunks)
  stack = reversible.ReversibleStack(cfg, lambda i: AttentionBranch(s.num_heads),
                                     lambda i: FeedForwardBranch(s.mlp_factor * s.width))
  x = jax.ShapeDtypeStruct((s.batch, s.length, s.width), jnp.float32)
  mask = jnp.tril(jnp.ones((s.length, s.length), bool))[None, None]
  params = jax.eval_shape(lambda x: partitioning.unbox(stack.init(jax.random.key(0), x, mask)),
                          x)

  def standard(variables, x):
    f = AttentionBranch(s.num_heads)
    g = FeedForwardBranch(s.mlp_factor * s.width)
    for i in range(num_layers):
      p = {'params': variables['params'][f'layers_{i}']}
      x = x + f.apply(p, x, mask)
      x = x + g.apply(p, x)
    return x

  forward = {'standard': standard, 'reversible': lambda v, x: stack.apply(v, x, mask)}[structure]
  loss = lambda v, x: jnp.mean(jnp.square(forward(v, x)))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def measure(setting: Setting, depths: tuple[int, int] = (2, 12)) -> list[dict]:
  """One row per structure: temp bytes at both depths and their ratio (deep / shallow)."""
  rows = []
  for structure, chunks in (('standard', 1), ('reversible', 1), ('reversible', 4)):
    if setting.length % chunks:
      continue
    row = {'structure': structure, 'ff_chunks': chunks}
    for depth in depths:
      row[f'temp_bytes_{depth}_layers'] = temp_bytes(setting, depth, structure, chunks)
    row['ratio'] = round(row[f'temp_bytes_{depths[1]}_layers']
                         / row[f'temp_bytes_{depths[0]}_layers'], 3)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--batch', type=int, default=4)
  args = parser.parse_args()
  setting = Setting(width=args.width, length=args.length, batch=args.batch)
  results = measure(setting)
  for row in results:
    print(row, flush=True)
  config = dataclasses.asdict(setting) | {
      'depths': [2, 12], 'dtype': 'float32',
      'measure': 'compiled.memory_analysis().temp_size_in_bytes of jit(grad(loss)) wrt '
                 'parameters and input; loss = mean(stack(x)**2)'}
  path = environment.write('reversible_memory', config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
