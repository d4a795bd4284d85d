"""Bytes per step of dropless MoE under expert parallelism: the ragged all-to-all
(layers/moe/expert_parallel.py) against GSPMD's partitioning of the single-device dropless layer,
on an emulated CPU mesh data x expert (8 devices by default).

Per chip, for one MoE layer with N local tokens (tokens / devices), k choices, d features,
n devices on the expert axis:

  closed form      each way N k d bytes (n - 1) / n with balanced routing: the dispatch sends
                   that much, the return as much; the backward pass's transposed exchanges the
                   same again. So forward 2x, forward + backward 4x.
  ragged, sent     rows each chip sends off-chip (the send sizes of a run, with balanced and with
                   the layer's own randomly initialized router) x d x bytes, each way. This is
                   what jax.lax.ragged_all_to_all moves; computed from the CPU emulation's sizes,
                   since XLA:CPU cannot compile the ragged op.
  ragged, buffer   the static receive buffer n N min(k, E_l) x d x bytes (memory, not traffic).
  GSPMD            bytes of every collective in the compiled program of the dropless layer with
                   dropless_exchange='gspmd' (all-gather counts its output, all-reduce and
                   all-to-all their operand, as efficientlm/inference/hlo_collectives.py does),
                   forward and forward + backward.
  emulated HLO     the same for the shard_map program with the all_to_all emulation, whose
                   padded [n, S, d] buffers move n S d per chip whatever the sizes (CPU tests only).

Ratios: GSPMD's forward bytes over the ragged forward (2x each way, balanced); forward +
backward, GSPMD's total over the ragged path's 4x each way plus its data-parallel all-reduce of
the expert weight gradients (from the emulated program).

Not counted for the ragged path: the counts and offsets exchanged first (all_to_alls of n and
n E_l int32 per chip), the psum over 'model' when expert hidden units are split (none here).

  python -m benchmarks.moe_all_to_all_bench
  python -m benchmarks.moe_all_to_all_bench --experts 8 --tokens 1024
"""

from __future__ import annotations

import os

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import collections  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import environment  # noqa: E402
from efficientlm import partitioning  # noqa: E402
from efficientlm.inference import hlo_collectives  # noqa: E402
from efficientlm.layers.moe import expert_parallel  # noqa: E402
from efficientlm.layers.moe.config import MoeConfig  # noqa: E402
from efficientlm.layers.moe.layer import MoeLayer  # noqa: E402

BYTES = 4  # float32


_COLLECTIVE = re.compile(r'= (.+?) (all-gather|all-reduce|all-to-all|reduce-scatter)(?:-start)?\(')


def _collective_bytes(compiled) -> dict:
  """Bytes per chip by kind: each collective's result (for all-gather its output, for all-reduce
  and all-to-all the same size as its operand). hlo_collectives.collectives_of would map groups
  to mesh axes too, but does not parse the `mesh[...]` replica groups jax 0.10's shardy
  partitioner writes."""
  by_kind = collections.Counter()
  for shape, kind in _COLLECTIVE.findall(compiled.as_text()):
    if kind == 'reduce-scatter':
      raise NotImplementedError('reduce-scatter: count its operand, not its result')
    by_kind[kind] += hlo_collectives.shape_bytes(shape)
  return dict(by_kind, total=sum(by_kind.values()))


def _programs(layer, params, x):
  def forward(p, x):
    return layer.apply({'params': p}, x, mutable=['moe'])[0]

  def loss(p, x):
    return jnp.sum(jnp.sin(forward(p, x)))

  return forward, jax.grad(loss, argnums=(0, 1))


def _sent_rows(partitioner, x, params, probs, k, n):
  """Rows each chip sends to other chips (one way), from a run of the emulated exchange."""
  expert = params['expert']

  def run(x, wi, wo, probs):
    return expert_parallel.dropless(x, wi, wo, None, None, probs=probs, k=k,
                                    activations=('gelu', 'linear'), exchange='emulated',
                                    with_send_sizes=True)

  with partitioner.context():
    send = jax.jit(run)(x, [expert['wi_0']['kernel'], expert['wi_1']['kernel']],
                        expert['wo']['kernel'], probs)[-1]
  shape = tuple(partitioner.mesh.devices.shape)
  send = np.asarray(send).reshape(shape + (n,))
  expert_axis = list(partitioner.mesh.axis_names).index('expert')
  coordinate = np.indices(shape)[expert_axis]
  own = coordinate[..., None] == np.arange(n)
  return np.where(own, 0, send).sum(-1).reshape(-1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 32])
  parser.add_argument('--tokens', type=int, nargs='+', default=[1024, 4096])
  parser.add_argument('--k', type=int, default=2)
  parser.add_argument('--d_model', type=int, default=64)
  parser.add_argument('--mlp_dim', type=int, default=128)
  parser.add_argument('--sequence', type=int, default=128)
  parser.add_argument('--mesh', type=int, nargs=2, default=[2, 4], help='data expert')
  args = parser.parse_args()
  partitioner = partitioning.Partitioner(tuple(args.mesh), ('data', 'expert'), 'expert_parallel')
  mesh = partitioner.mesh
  devices, n = mesh.devices.size, args.mesh[1]
  results = []
  for tokens in args.tokens:
    x = jax.random.normal(jax.random.key(0), (tokens // args.sequence, args.sequence,
                                              args.d_model))
    local = tokens // devices
    for experts in args.experts:
      layers = {ex: MoeLayer(MoeConfig(experts, layout='all', dispatch='dropless',
                                       num_selected_experts=args.k, dropless_exchange=ex),
                             args.mlp_dim)
                for ex in ('gspmd', 'emulated')}
      params = partitioning.unbox(jax.jit(layers['gspmd'].init)(jax.random.key(1), x)['params'])
      row = {'tokens': tokens, 'experts': experts, 'k': args.k, 'd_model': args.d_model,
             'expert_axis': n, 'devices': devices}
      each_way = local * args.k * args.d_model * BYTES * (n - 1) / n
      row['closed_form_bytes_per_chip'] = {'each_way': each_way, 'forward': 2 * each_way,
                                           'forward_backward': 4 * each_way}
      # Balanced: token t takes experts k t, ..., k t + k - 1 (mod E).
      balanced = np.zeros(x.shape[:2] + (experts,), np.float32)
      for t in range(x.shape[1]):
        for c in range(args.k):
          balanced[:, t, (args.k * t + c) % experts] = 5.0 - c
      router = params['router']['router_weights']['w']['kernel']
      for name, logits in (('balanced', jnp.asarray(balanced)), ('random_router', x @ router)):
        sent = _sent_rows(partitioner, x, params, jax.nn.softmax(logits, -1), args.k, n)
        bytes_sent = sent * args.d_model * BYTES
        row[f'ragged_sent_bytes_per_chip_{name}'] = {
            'each_way_mean': float(bytes_sent.mean()), 'each_way_max': int(bytes_sent.max()),
            'forward_backward_max': 4 * int(bytes_sent.max())}
      bound = expert_parallel.receive_bound(local, args.k, n, experts // n)
      row['ragged_receive_buffer_bytes_per_chip'] = bound * args.d_model * BYTES
      with partitioner.context():
        for ex, layer in layers.items():
          forward, grad = _programs(layer, params, x)
          for what, fn in (('forward', forward), ('forward_backward', grad)):
            compiled = jax.jit(fn).lower(params, x).compile()
            label = 'gspmd' if ex == 'gspmd' else 'shard_map_emulated'
            row[f'{label}_hlo_bytes_per_chip_{what}'] = _collective_bytes(compiled)
      # Like for like: token traffic in the forward pass; in forward + backward, the ragged
      # path also all-reduces expert weight gradients over 'data' (measured in the emulated
      # program), which GSPMD's program, holding every token everywhere, does not need.
      ragged_fb = (row['closed_form_bytes_per_chip']['forward_backward'] +
                   row['shard_map_emulated_hlo_bytes_per_chip_forward_backward'].get(
                       'all-reduce', 0))
      row['ragged_total_bytes_per_chip_forward_backward'] = ragged_fb
      row['gspmd_over_ragged_forward'] = round(
          row['gspmd_hlo_bytes_per_chip_forward']['total'] /
          row['closed_form_bytes_per_chip']['forward'], 2)
      row['gspmd_over_ragged_forward_backward'] = round(
          row['gspmd_hlo_bytes_per_chip_forward_backward']['total'] / ragged_fb, 2)
      print(row, flush=True)
      results.append(row)
  config = dict(vars(args), dtype='float32', mesh_axes=('data', 'expert'),
                note='bytes, not time: collectives on the emulated CPU devices are memory copies')
  path = environment.write('moe_all_to_all', config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
