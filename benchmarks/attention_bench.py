"""Attention kernels: ours (Pallas flash) vs XLA, cuDNN and jax's own Pallas attention; decode.

Training attention (self-attention, q_len = k_len = seq, bf16, scale d**-0.5), per point of
seq x head_dim x causal x {MHA, GQA, MQA} and per implementation:
- 'pallas': ours, `kernels.flash_attention(implementation='pallas')` (interpret mode off GPU);
- 'xla', 'cudnn': `jax.nn.dot_product_attention(implementation=...)` (cuDNN: GPU only);
- 'jax_pallas': the Pallas attention shipped in jax: `pallas.ops.gpu.attention.mha` on GPU (and,
  in interpret mode, on CPU), `pallas.ops.tpu.flash_attention` on TPU. Neither takes grouped KV
  heads, so for GQA/MQA the KV heads are repeated (`jnp.repeat` inside the timed function: its
  time, memory and the gradient's sum over each group are included). The TPU kernel takes
  [b, heads, seq, d]: inputs are made in that layout outside the timed function.
Measured: forward, and forward + backward (`jax.vjp` with a random output cotangent, giving dq, dk,
dv), each compiled once, warmed up, then the median of `--repeats` runs under
`jax.block_until_ready`; TFLOP/s from the FlashAttention count (forward 4 b h lq lk d, halved when
causal; backward 2.5x forward, so forward + backward 3.5x); memory from XLA's memory analysis of
the compiled program (arguments, outputs, scratch) and, where the device reports it, the
process's peak bytes in use after the point (a high-water mark over the whole run). Ratios are
ours' time over the other's, measured in one process (< 1: ours is faster).

Decode (`kernels.decode_attention`, one query token per sequence against a full KV cache):
'pallas' vs the 'xla' reference, MQA and GQA, time and achieved KV read bandwidth
b * len * kv_heads * d * 2 (k and v) * bytes / time, against the device's HBM bandwidth
(`inference.hardware`, H100/H200; null elsewhere).

A failing point (out of memory, unsupported) records its error and the run goes on.

  python -m benchmarks.attention_bench                        # the full grid (for a GPU)
  python -m benchmarks.attention_bench --seq 4096 --head-dim 128 --repeats 5 --skip-backward
  python -m benchmarks.attention_bench --quick                # tiny grid; CPU smoke test
On CPU the Pallas kernels run in interpret mode: their times there are meaningless as speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import environment
from efficientlm.inference import hardware
from efficientlm.kernels.decode_attention import decode_attention
from efficientlm.kernels.flash_attention import flash_attention

IMPLEMENTATIONS = ('pallas', 'xla', 'cudnn', 'jax_pallas')
FWD_BWD_FLOP_FACTOR = 3.5  # forward 1 + backward 2.5 (the FlashAttention benchmarks' count)


# --- timing ---------------------------------------------------------------------------------

def _memory(compiled) -> dict:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats is None:
    return {'argument_bytes': None, 'output_bytes': None, 'temp_bytes': None}
  return {'argument_bytes': int(stats.argument_size_in_bytes),
          'output_bytes': int(stats.output_size_in_bytes),
          'temp_bytes': int(stats.temp_size_in_bytes)}


def _device_peak() -> int | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return None if not stats else stats.get('peak_bytes_in_use')


def time_compiled(fn, args, repeats: int) -> dict:
  """Compiles fn once, warms up, returns the median seconds of `repeats` runs and memory."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {'seconds': statistics.median(times), **_memory(compiled),
          'device_peak_bytes': _device_peak()}


def significant(x: float, digits: int = 4) -> float:
  """x to `digits` significant digits, for the JSON. Unlike round(x, n), a small positive rate
  (a slow CPU, interpret mode) stays positive instead of becoming 0.0."""
  return float(f'{x:.{digits}g}')


def _error(e: Exception) -> str:
  msg = str(e).strip().splitlines()
  return f'{type(e).__name__}: {msg[0][:400] if msg else ""}'


# --- the implementations ------------------------------------------------------------------

def _jax_pallas_gpu_mha():
  """jax's GPU Pallas (Triton) mha, or None where this jax version lacks it."""
  try:
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
    return attention.mha
  except Exception:  # pylint: disable=broad-except
    return None


def _jax_pallas_tpu_flash():
  try:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
    return fa.flash_attention
  except Exception:  # pylint: disable=broad-except
    return None


def jax_pallas_info(backend: str) -> dict:
  gpu, tpu = _jax_pallas_gpu_mha(), _jax_pallas_tpu_flash()
  return {
      'gpu_mha': 'jax.experimental.pallas.ops.gpu.attention.mha' + ('' if gpu else ' (missing)'),
      'tpu_flash_attention': 'jax.experimental.pallas.ops.tpu.flash_attention.flash_attention' +
                             ('' if tpu else ' (missing)'),
      'used_here': {'gpu': 'gpu_mha', 'cpu': 'gpu_mha (interpret mode)',
                    'tpu': 'tpu_flash_attention'}.get(backend),
      'kv_heads': 'takes no grouped KV heads: for GQA/MQA k and v are repeated to the query '
                  'heads with jnp.repeat inside the timed function (included in its time and '
                  'memory; the backward sums dk, dv over each group)',
      'tpu_layout': 'the TPU kernel takes [b, heads, seq, d]; inputs are made in that layout '
                    'outside the timed function',
  }


def make_attention_fn(impl: str, *, causal: bool, scale: float, group: int, backend: str,
                      block_q: int | None, block_k: int | None):
  """(fn(q, k, v) -> out, layout) for an implementation, or raises ValueError if unsupported.

  layout 'bshd': q [b, s, heads, d], k/v [b, s, kv_heads, d]; 'bhsd' for the TPU kernel.
  """
  if impl == 'pallas':
    return functools.partial(flash_attention, causal=causal, scale=scale,
                             implementation='pallas', block_q=block_q, block_k=block_k), 'bshd'
  if impl in ('xla', 'cudnn'):
    if impl == 'cudnn' and backend != 'gpu':
      raise ValueError(f'cuDNN attention needs a GPU; the JAX backend is {backend!r}')
    return functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=causal,
                             implementation=impl), 'bshd'
  if impl == 'jax_pallas':
    if backend in ('gpu', 'cpu'):
      mha = _jax_pallas_gpu_mha()
      if mha is None:
        raise ValueError('jax.experimental.pallas.ops.gpu.attention.mha is missing in jax '
                         f'{jax.__version__}')

      def fn(q, k, v):
        if group > 1:
          k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        return mha(q, k, v, None, sm_scale=scale, causal=causal, interpret=backend == 'cpu')
      return fn, 'bshd'
    if backend == 'tpu':
      tpu_flash = _jax_pallas_tpu_flash()
      if tpu_flash is None:
        raise ValueError('jax.experimental.pallas.ops.tpu.flash_attention is missing in jax '
                         f'{jax.__version__}')

      def fn(q, k, v):
        if group > 1:
          k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
        return tpu_flash(q, k, v, causal=causal, sm_scale=scale)
      return fn, 'bhsd'
    raise ValueError(f'no jax Pallas attention for backend {backend!r}')
  raise ValueError(f'unknown implementation {impl!r}')


def _fwd_bwd(fn):
  def step(q, k, v, d_out):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)
  return step


def attention_flops(b, heads, seq, d, causal) -> float:
  flops = 4.0 * b * heads * seq * seq * d
  return flops / 2 if causal else flops


def measure_attention(point: dict, impls, *, repeats: int, backward: bool, backend: str,
                      block_q: int | None, block_k: int | None, dtype) -> dict:
  b, seq, heads, kv_heads, d = (point[n] for n in ('batch', 'seq', 'heads', 'kv_heads',
                                                   'head_dim'))
  causal = point['causal']
  keys = jax.random.split(jax.random.key(0), 4)
  shapes = {'q': (b, seq, heads, d), 'kv': (b, seq, kv_heads, d)}
  q = jax.random.normal(keys[0], shapes['q'], dtype)
  k = jax.random.normal(keys[1], shapes['kv'], dtype)
  v = jax.random.normal(keys[2], shapes['kv'], dtype)
  d_out = jax.random.normal(keys[3], shapes['q'], dtype)
  flops = attention_flops(b, heads, seq, d, causal)
  row = dict(point)
  row['forward_flops'] = flops
  for impl in impls:
    result = {}
    try:
      fn, layout = make_attention_fn(impl, causal=causal, scale=d ** -0.5,
                                     group=heads // kv_heads, backend=backend,
                                     block_q=block_q, block_k=block_k)
    except ValueError as e:
      row[impl] = {'error': _error(e)}
      continue
    args = (q, k, v) if layout == 'bshd' else tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    grad_out = d_out if layout == 'bshd' else jnp.swapaxes(d_out, 1, 2)
    passes = [('forward', fn, args, 1.0)]
    if backward:
      passes.append(('fwd_bwd', _fwd_bwd(fn), args + (grad_out,), FWD_BWD_FLOP_FACTOR))
    for name, step, step_args, factor in passes:
      try:
        r = time_compiled(step, step_args, repeats)  # seconds unrounded, as measured
        r['tflops'] = significant(factor * flops / r['seconds'] / 1e12)
        result[name] = r
      except Exception as e:  # pylint: disable=broad-except  (OOM, unsupported, ...)
        result[name] = {'error': _error(e)}
    if impl in ('pallas', 'jax_pallas') and backend == 'cpu':
      result['interpret_mode'] = True
    if impl == 'jax_pallas' and heads != kv_heads:
      result['kv_heads_repeated'] = heads // kv_heads
    row[impl] = result
  row['ratios'] = ratios(row, impls)
  return row


def _seconds(row, impl, name):
  return (row.get(impl) or {}).get(name, {}).get('seconds')


def ratios(row: dict, impls) -> dict:
  """ours' time / the other's, per pass (< 1: ours is faster); None where either failed."""
  out = {}
  for other in impls:
    if other == 'pallas':
      continue
    for name in ('forward', 'fwd_bwd'):
      ours, theirs = _seconds(row, 'pallas', name), _seconds(row, other, name)
      out[f'{name}_pallas_over_{other}'] = significant(ours / theirs) if ours and theirs else None
  return out


# --- decode ---------------------------------------------------------------------------------

def hbm_bandwidth(device_kind: str) -> tuple[str | None, float | None]:
  kind = device_kind.lower()
  for name in ('h200', 'h100'):
    if name in kind:
      return name, hardware.get_hardware(name).hbm_bandwidth
  return None, None


def measure_decode(point: dict, *, repeats: int, dtype, hbm: float | None) -> dict:
  b, ctx, heads, kv_heads, d = (point[n] for n in ('batch', 'context', 'heads', 'kv_heads',
                                                   'head_dim'))
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, heads, d), dtype)
  k = jax.random.normal(keys[1], (b, ctx, kv_heads, d), dtype)
  v = jax.random.normal(keys[2], (b, ctx, kv_heads, d), dtype)
  lengths = jnp.full((b,), ctx, jnp.int32)  # every slot valid
  kv_bytes = b * ctx * kv_heads * d * 2 * jnp.dtype(dtype).itemsize
  row = dict(point, valid_len=ctx, kv_read_bytes=kv_bytes)
  for impl in ('pallas', 'xla'):
    fn = functools.partial(decode_attention, scale=d ** -0.5, implementation=impl)
    try:
      r = time_compiled(fn, (q, k, v, lengths), repeats)  # seconds unrounded, as measured
      gbs = kv_bytes / r['seconds'] / 1e9
      r['kv_read_gb_per_s'] = significant(gbs)
      r['fraction_of_hbm'] = significant(gbs * 1e9 / hbm) if hbm else None
      if impl == 'pallas' and jax.default_backend() == 'cpu':
        r['interpret_mode'] = True
      row[impl] = r
    except Exception as e:  # pylint: disable=broad-except
      row[impl] = {'error': _error(e)}
  ours = row['pallas'].get('seconds')
  xla = row['xla'].get('seconds')
  row['ratio_pallas_over_xla'] = significant(ours / xla) if ours and xla else None
  return row


# --- main -----------------------------------------------------------------------------------

QUICK = dict(seq=[128], head_dim=[64], tokens=256, d_model=256, gqa_group=2, repeats=1,
             decode_batch=2, decode_context=[256], decode_heads=4)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--seq', type=int, nargs='+', default=None,
                      help='sequence lengths (default 1k 2k 4k 8k 16k)')
  parser.add_argument('--head-dim', type=int, nargs='+', default=None,
                      help='head dims (default 64 128)')
  parser.add_argument('--repeats', type=int, default=None, help='timed runs per point (median)')
  parser.add_argument('--quick', action='store_true',
                      help='a tiny grid that runs on CPU (Pallas in interpret mode) in ~1 min')
  parser.add_argument('--skip-backward', action='store_true', help='forward only')
  parser.add_argument('--skip-decode', action='store_true')
  parser.add_argument('--skip-train', action='store_true', help='decode only')
  parser.add_argument('--impls', nargs='+', default=list(IMPLEMENTATIONS),
                      choices=IMPLEMENTATIONS)
  parser.add_argument('--tokens', type=int, default=None,
                      help='batch * seq per point (default 16384; batch at least 1)')
  parser.add_argument('--d-model', type=int, default=None,
                      help='query heads = d_model / head_dim (default 2048)')
  parser.add_argument('--gqa-group', type=int, default=None,
                      help='query heads per KV head for GQA (default 8)')
  parser.add_argument('--causal', choices=('both', 'yes', 'no'), default='both')
  parser.add_argument('--block-q', type=int, default=None,
                      help="ours' block_q (default: the kernel target's, 64 Triton, 128 Mosaic)")
  parser.add_argument('--block-k', type=int, default=None, help="ours' block_k (as --block-q)")
  parser.add_argument('--decode-batch', type=int, default=None, help='default 64')
  parser.add_argument('--decode-context', type=int, nargs='+', default=None,
                      help='default 1k 2k 4k 8k 16k 32k')
  parser.add_argument('--decode-heads', type=int, default=None, help='default 32')
  parser.add_argument('--decode-head-dim', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16')
  args = parser.parse_args(argv)
  defaults = dict(seq=[1024, 2048, 4096, 8192, 16384], head_dim=[64, 128], tokens=16384,
                  d_model=2048, gqa_group=8, repeats=10, decode_batch=64,
                  decode_context=[1024, 2048, 4096, 8192, 16384, 32768], decode_heads=32)
  if args.quick:
    defaults.update(QUICK)
    if args.decode_head_dim == 128:
      args.decode_head_dim = 64
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def attention_points(args):
  causals = {'both': (False, True), 'yes': (True,), 'no': (False,)}[args.causal]
  for seq, d, causal in itertools.product(args.seq, args.head_dim, causals):
    heads = max(1, args.d_model // d)
    group = min(args.gqa_group, heads)
    for variant, kv_heads in (('MHA', heads), ('GQA', heads // group), ('MQA', 1)):
      yield {'variant': variant, 'seq': seq, 'head_dim': d, 'causal': causal,
             'batch': max(1, args.tokens // seq), 'heads': heads, 'kv_heads': kv_heads}


def decode_points(args):
  heads = args.decode_heads
  group = min(args.gqa_group, heads)
  for ctx in args.decode_context:
    for variant, kv_heads in (('MQA', 1), ('GQA', heads // group)):
      yield {'variant': variant, 'batch': args.decode_batch, 'context': ctx, 'heads': heads,
             'kv_heads': kv_heads, 'head_dim': args.decode_head_dim}


def _summary(row) -> str:
  parts = [f"{row['variant']} seq={row['seq']} d={row['head_dim']} causal={row['causal']}"]
  for impl in IMPLEMENTATIONS:
    if impl not in row:
      continue
    r = row[impl]
    if 'error' in r:
      parts.append(f'{impl}: n/a')
      continue
    for name in ('forward', 'fwd_bwd'):
      if name in r:
        p = r[name]
        parts.append(f'{impl} {name} ' + ('ERR' if 'error' in p else
                                          f"{p['seconds'] * 1e3:.2f}ms {p['tflops']}TF"))
  return ' | '.join(parts)


def main(argv=None):
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  backend = jax.default_backend()
  device_kind = jax.devices()[0].device_kind
  hbm_name, hbm = hbm_bandwidth(device_kind)
  interpret = backend == 'cpu'
  if interpret:
    print('CPU backend: the Pallas kernels run in interpret mode; their times are meaningless '
          'as speed (a smoke test only).', flush=True)
  attention_results, decode_results = [], []
  if not args.skip_train:
    for point in attention_points(args):
      row = measure_attention(point, args.impls, repeats=args.repeats,
                              backward=not args.skip_backward, backend=backend,
                              block_q=args.block_q, block_k=args.block_k, dtype=dtype)
      print(_summary(row), flush=True)
      print('  ratios', row['ratios'], flush=True)
      attention_results.append(row)
  if not args.skip_decode:
    for point in decode_points(args):
      row = measure_decode(point, repeats=args.repeats, dtype=dtype, hbm=hbm)
      print(f"decode {row['variant']} b={row['batch']} ctx={row['context']}: " + ', '.join(
          f"{impl} " + (row[impl]['error'] if 'error' in row[impl] else
                        f"{row[impl]['seconds'] * 1e6:.1f}us "
                        f"{row[impl]['kv_read_gb_per_s']}GB/s")
          for impl in ('pallas', 'xla')) + f", pallas/xla {row['ratio_pallas_over_xla']}",
          flush=True)
      decode_results.append(row)
  config = dict(
      vars(args), backend=backend, interpret_mode=interpret,
      interpret_note=('on CPU the Pallas kernels (ours and jax\'s) run in interpret mode: their '
                      'times are meaningless as speed') if interpret else None,
      implementations={
          'pallas': "ours: efficientlm.kernels.flash_attention(implementation='pallas')",
          'xla': "jax.nn.dot_product_attention(implementation='xla')",
          'cudnn': "jax.nn.dot_product_attention(implementation='cudnn') (GPU only)",
          'jax_pallas': jax_pallas_info(backend)},
      attention_inputs='self-attention q_len = k_len = seq, scale head_dim**-0.5, random normal '
                       'inputs; heads = d_model / head_dim; GQA kv_heads = heads / gqa_group; '
                       'batch = tokens / seq',
      flop_count=('forward 4*b*heads*seq*seq*d, halved when causal; fwd_bwd '
                  f'{FWD_BWD_FLOP_FACTOR}x forward (backward 2.5x forward)'),
      timing='compiled once, one warm-up run, median of repeats with jax.block_until_ready; '
             'fwd_bwd = jax.vjp forward plus dq, dk, dv for a random output cotangent',
      memory=('argument/output/temp bytes from compiled.memory_analysis(); device_peak_bytes: '
              "the device's peak_bytes_in_use after the point (process-wide high-water mark)"),
      ratios='ours seconds / other seconds, same process (< 1: ours is faster)',
      decode=dict(kernel='efficientlm.kernels.decode_attention (pallas) vs its xla reference',
                  lengths='every sequence uses the whole context (valid_len = context)',
                  kv_read='batch * valid_len * kv_heads * head_dim * 2 (k and v) * bytes',
                  hbm_device=hbm_name, hbm_bandwidth_bytes_per_s=hbm))
  path = environment.write('attention', config,
                           {'attention': attention_results, 'decode': decode_results})
  print(f'wrote {path}')
  return path


if __name__ == '__main__':
  main()
