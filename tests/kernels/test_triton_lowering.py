"""The GPU kernels lower to Triton IR for CUDA, checked on a CPU machine.

`lower(lowering_platforms=('cuda',))` runs Pallas' Triton lowering (jaxpr -> Triton MLIR) without
a GPU: an op that Triton cannot express, or a block shape it cannot tile, fails here. What only
a GPU can show (PTX compilation, speed) is left to benchmarks/attention_bench.py on a GPU.
Interpret mode, which the other kernel tests use, skips this lowering entirely.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from efficientlm.kernels import decode_attention as decode_module
from efficientlm.kernels.block_sparse import bigbird_block_mask, num_blocks
from efficientlm.kernels.flash_attention import RelativeBias, flash_attention

TRITON_CALL = 'xla.gpu.triton'


def _lower_for_cuda(fn, *args) -> str:
  return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()


def _specs(dtype, length, heads, kv_heads, depth):
  q = jax.ShapeDtypeStruct((2, length, heads, depth), dtype)
  kv = jax.ShapeDtypeStruct((2, length, kv_heads, depth), dtype)
  return q, kv


# A covering set of the options at real sizes: every option appears in f32 and bf16 and with
# GQA, MQA and MHA; head dims 64 and 128; 64- and 128-wide tiles.
@pytest.mark.parametrize('dtype, heads, kv_heads, depth, block, options', [
    (jnp.bfloat16, 8, 2, 128, 64, ('causal', 'segments', 'bias')),
    (jnp.bfloat16, 8, 1, 64, 128, ('window', 'sparse')),
    (jnp.float32, 4, 4, 64, 64, ('causal', 'window', 'segments', 'sparse', 'bias')),
    (jnp.float32, 8, 1, 128, 128, ()),
])
def test_flash_forward_and_backward_lower_to_triton(dtype, heads, kv_heads, depth, block,
                                                    options):
  length = 512
  q, kv = _specs(dtype, length, heads, kv_heads, depth)
  seg = jax.ShapeDtypeStruct((2, length), jnp.int32)
  table = jax.ShapeDtypeStruct((heads, 32), jnp.float32)
  blocks = num_blocks(length, block)
  sparse = bigbird_block_mask(blocks, blocks, window_blocks=1, num_global=1,
                              num_random=1, seed=0) if 'sparse' in options else None

  def loss(q, k, v, seg, table):
    out = flash_attention(
        q, k, v, causal='causal' in options, window=100 if 'window' in options else None,
        segment_ids=seg if 'segments' in options else None,
        relative_bias=RelativeBias(table) if 'bias' in options else None,
        block_mask=sparse, scale=depth**-0.5, block_q=block, block_k=block,
        implementation='pallas', target='triton', interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  text = _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2, 4)), q, kv, kv, seg, table)
  assert text.count(TRITON_CALL) == 3  # forward, dk/dv and dq kernels


@pytest.mark.parametrize('dtype, heads, kv_heads, depth', [
    (jnp.bfloat16, 8, 1, 128), (jnp.float32, 8, 2, 64)])
def test_decode_attention_lowers_to_triton(dtype, heads, kv_heads, depth):
  q = jax.ShapeDtypeStruct((4, heads, depth), dtype)
  cache = jax.ShapeDtypeStruct((4, 1000, kv_heads, depth), dtype)
  lengths = jax.ShapeDtypeStruct((4,), jnp.int32)

  def decode(q, k, v, lengths):  # the arguments decode_attention passes on a GPU
    return decode_module._decode_pallas(q, k, v, lengths, scale=None, block_k=128,
                                        num_splits=4, min_rows=16, interpret=False)

  assert TRITON_CALL in _lower_for_cuda(decode, q, cache, cache, lengths)


def test_compiled_form_is_what_a_gpu_runs():
  """Without forcing, the CPU backend interprets: no Triton call is emitted for CPU."""
  q, kv = _specs(jnp.float32, 64, 2, 2, 16)
  text = jax.jit(lambda q, k, v: flash_attention(q, k, v, implementation='pallas')).trace(
      q, kv, kv).lower().as_text()
  assert TRITON_CALL not in text
