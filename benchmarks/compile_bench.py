"""Compile time of a train step (forward + backward), unrolled layers vs nn.scan, by depth.

Reports lower+compile seconds and their ratio, measured in one process. The claim it checks:
with scan_layers, compile time stays flat as depth grows, so 100-layer models compile fast.

  python benchmarks/compile_bench.py [--depths 4 16 48 100] [--width 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm import partitioning
from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.model import DecoderOnlyModel


def compile_seconds(cfg: TransformerConfig, batch) -> float:
  model = DecoderOnlyModel(DecoderOnly(cfg))
  abstract = jax.eval_shape(
      lambda b: partitioning.unbox(model.init(jax.random.key(0), b))['params'], batch)
  step = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b)[0]))
  start = time.perf_counter()
  step.lower(abstract, batch).compile()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--depths', type=int, nargs='+', default=[4, 16, 48, 100])
  parser.add_argument('--width', type=int, default=256)
  args = parser.parse_args()
  base = TransformerConfig(vocab_size=1024, emb_dim=args.width, num_heads=4, num_kv_heads=1,
                           head_dim=args.width // 4, mlp_dim=4 * args.width,
                           num_encoder_layers=0, position_embedding='rotary',
                           scale_attention_logits=True, dtype='bfloat16', remat_policy='full')
  batch = {name: jax.ShapeDtypeStruct((8, 128), jnp.int32)
           for name in ('decoder_input_tokens', 'decoder_target_tokens')}
  results = []
  for depth in args.depths:
    row = {'layers': depth}
    for mode, scan in (('unrolled', False), ('scanned', True)):
      cfg = dataclasses.replace(base, num_decoder_layers=depth, scan_layers=scan)
      row[f'{mode}_compile_s'] = round(compile_seconds(cfg, batch), 3)
    row['unrolled_over_scanned'] = round(row['unrolled_compile_s'] / row['scanned_compile_s'], 2)
    print(row, flush=True)
    results.append(row)
  config = dataclasses.asdict(base) | {'batch': [8, 128], 'depths': args.depths}
  for varied in ('num_decoder_layers', 'scan_layers'):
    del config[varied]
  path = environment.write('compile_scan', config, results)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
