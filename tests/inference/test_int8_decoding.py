"""int8 weight-only decoding (inference.quantization) without float copies of the weights.

- `quantization.matmul` against numpy's x @ (q * s) in float64: column blocks, row tiles with
  a ragged last column block, decode- and prefill-sized row counts, float32 and bfloat16;
- decode step logits of a quantize_tree'd model equal those of the same model given the
  dequantize_tree'd float weights (the independent reference: plain float matmuls; prefill runs
  the same matmuls, see also tests/inference/test_infer.py's int8 run);
- the compiled decode step (and prefill) holds no float array of a quantized kernel's shape, and
  this check
  does find the float copies that dequantizing the tree inside the step (the previous path)
  makes;
- memory_analysis (compile time, deterministic) of the int8 step is <= 0.6x the float32 one.

The tiny model's kernels are far below TILE_BYTES, so the tests shrink the tiles to reach the
tiled path on them. The model scans its layers, so the int8 leaves also pass through nn.scan.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm.inference import kv_cache, quantization
from efficientlm.layers.moe.config import MoeConfig
from tests.helpers import decoder_model

# Kernel shapes unique among the step's arrays: d 48, query 4 x 8, kv 2 x 8, mlp 96, vocab 160.
MODEL = dict(vocab_size=160, emb_dim=48, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=96,
             mlp_activations=('gelu', 'linear'), logits_via_embedding=False, scan_layers=True)
BATCH, SLOTS = 3, 16
FLOAT_DTYPES = ('f16', 'bf16', 'f32', 'f64')


@pytest.fixture(scope='module')
def setup():
  """A scanned tiny model, its int8 tree, the dequantized reference, and a jitted step, with
  tiles of at most 2,560 bytes (read when a step is traced): every kernel is tiled, wo [96, 48]
  in row tiles of 12, the others in blocks of 8 to 16 whole columns."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(quantization, 'TILE_BYTES', 8 * 80 * 4)
    patch.setattr(quantization, 'MIN_BLOCK_COLS', 8)
    model = decoder_model(**MODEL)
    # Random weights of the model's shapes (eval_shape: nothing to compile), norms included.
    tokens = jnp.zeros((1, 4), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(model.module.init, jax.random.key(0), tokens)['params'])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(
        rng.normal(size=a.shape) / np.sqrt(a.shape[-2] if a.ndim > 1 else 1), a.dtype), shapes)
    quantized = jax.jit(quantization.quantize_tree)(params)
    reference = jax.jit(quantization.dequantize_tree, static_argnums=1)(quantized, jnp.float32)
    step = jax.jit(lambda *a: kv_cache.step(model, *a))
    yield model, params, quantized, reference, step


def _step_args(model, params):
  cache = kv_cache.init_cache(model, params, BATCH, SLOTS)
  return (params, cache, jnp.array([3, 7, 9]), jnp.array([12, 5, 9]))


def test_matmul_equals_numpy(monkeypatch):
  monkeypatch.setattr(quantization, 'TILE_BYTES', 24 * 32 * 4)
  monkeypatch.setattr(quantization, 'MIN_BLOCK_COLS', 16)
  monkeypatch.setattr(quantization, 'TILE_COLS', 32)
  rng = np.random.default_rng(0)
  matmul = jax.jit(quantization.matmul, static_argnums=2)
  # [72, 80]: 10-column blocks are too narrow, so 3 row tiles of 24, column blocks 32, 32, 16;
  # [24, 96]: 3 blocks of 32 whole columns.
  cases = (((72, 80), 2, jnp.float32, 1e-5), ((72, 80), 40, jnp.float32, 1e-5),
           ((72, 80), 2, jnp.bfloat16, 1e-2), ((24, 96), 2, jnp.float32, 1e-5))
  for shape, rows, dtype, tol in cases:
    q = quantization.quantize(jnp.asarray(rng.normal(size=shape), jnp.float32))
    x = rng.normal(size=(rows, shape[0])).astype(np.float32)
    # bfloat16 compute: the tiles are exact in bfloat16 (|q| <= 127), x is rounded once.
    expected = (np.asarray(jnp.asarray(x, dtype), np.float64)
                @ (np.asarray(q.values, np.float64) * np.asarray(q.scale)))
    got = matmul(x, q, dtype)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=tol, atol=tol)


def test_int8_logits_equal_dequantized_reference(setup):
  model, _, quantized, reference, step = setup
  tokens = np.random.default_rng(0).integers(2, 160, (3, BATCH))
  outs = {}
  for name, p in (('int8', quantized), ('reference', reference)):
    cache = kv_cache.init_cache(model, p, BATCH, SLOTS)
    logits = []
    for i in range(3):  # from an empty cache: each step attends to the ones before
      step_logits, cache = step(p, cache, jnp.asarray(tokens[i], jnp.int32),
                                jnp.full((BATCH,), i, jnp.int32))
      logits.append(step_logits)
    outs[name] = jnp.stack(logits)
  np.testing.assert_allclose(outs['int8'], outs['reference'], rtol=2e-5, atol=2e-5)
  assert np.abs(outs['reference']).max() > 0.1  # not vacuous


def _float_kernel_copies(hlo: str, params) -> set[str]:
  """Float arrays in `hlo` shaped like a quantized kernel of `params` (stacked, or one layer's)."""
  shapes = {','.join(map(str, shape)) for leaf in jax.tree.leaves(
      params, is_leaf=quantization.is_quantized) if quantization.is_quantized(leaf)
            for shape in (leaf.shape, leaf.shape[-2:])}
  pattern = re.compile(r'\b(%s)\[(%s)\]' % ('|'.join(FLOAT_DTYPES),
                                           '|'.join(map(re.escape, shapes))))
  return {m.group(0) for m in pattern.finditer(hlo)}


def test_compiled_step_has_no_float_kernel_and_less_memory(setup):
  model, params, quantized, _, step = setup
  int8_step = step.lower(*_step_args(model, quantized)).compile()
  assert not _float_kernel_copies(int8_step.as_text(), quantized)
  cache = kv_cache.init_cache(model, quantized, BATCH, SLOTS)
  prefill = jax.jit(lambda *a: kv_cache.prefill(model, *a)).lower(
      quantized, cache, jnp.ones((BATCH, 12), jnp.int32), jnp.array([12, 5, 9])).compile()
  assert not _float_kernel_copies(prefill.as_text(), quantized)
  # The check can fail: dequantizing the tree inside the step copies every kernel to float.
  old = jax.jit(lambda p, *a: kv_cache.step(model, quantization.dequantize_tree(
      p, jnp.float32), *a)).lower(*_step_args(model, quantized)).compile()
  assert len(_float_kernel_copies(old.as_text(), quantized)) >= 5  # query ... logits shapes
  float_step = step.lower(*_step_args(model, params)).compile()
  memory = lambda c: (c.memory_analysis().argument_size_in_bytes  # noqa: E731
                      + c.memory_analysis().temp_size_in_bytes)
  assert memory(int8_step) <= 0.6 * memory(float_step)


def test_dropless_moe_decodes_with_int8_experts_and_no_float_expert_kernel(monkeypatch):
  """A dropless MoE decoder (top-2 of 4 experts in both layers): the decode step multiplies by
  each expert's int8 kernel tile by tile inside the grouped matmul's block loop. Logits equal
  the dequantized reference's, and the compiled step holds no float array of an expert kernel's
  shape ([4, 40, 72] stacked, [40, 72] / [72, 40] one expert's)."""
  monkeypatch.setattr(quantization, 'TILE_BYTES', 40 * 24 * 4)
  monkeypatch.setattr(quantization, 'MIN_BLOCK_COLS', 8)
  moe = MoeConfig(4, layout='all', dispatch='dropless', num_selected_experts=2)
  model = decoder_model(vocab_size=96, emb_dim=40, mlp_dim=72, moe=moe)
  shapes = nn.unbox(jax.eval_shape(model.module.init, jax.random.key(0),
                                   jnp.zeros((1, 4), jnp.int32))['params'])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(
      rng.normal(size=a.shape) / np.sqrt(a.shape[-2] if a.ndim > 1 else 1), a.dtype), shapes)
  quantized = jax.jit(quantization.quantize_tree)(params)
  experts = quantized['decoder']['layers_0']['mlp']['expert']
  assert quantization.is_quantized(experts['wo']['kernel'])  # the experts are int8 in the tree
  reference = jax.jit(quantization.dequantize_tree, static_argnums=1)(quantized, jnp.float32)
  step = jax.jit(lambda *a: kv_cache.step(model, *a))
  args = lambda p: (p, kv_cache.init_cache(model, p, BATCH, SLOTS),  # noqa: E731
                    jnp.array([3, 7, 9]), jnp.array([0, 0, 0]))
  np.testing.assert_allclose(step(*args(quantized))[0], step(*args(reference))[0], rtol=2e-5,
                             atol=2e-5)
  hlo = step.lower(*args(quantized)).compile().as_text()
  expert_shapes = {'4,40,72', '4,72,40', '40,72', '72,40'}
  pattern = re.compile(r'\b(%s)\[(%s)\]' % ('|'.join(FLOAT_DTYPES), '|'.join(expert_shapes)))
  assert not pattern.findall(hlo)
  # The check can fail: the dropping path converts the layer's expert kernels whole.
  dropping = decoder_model(vocab_size=96, emb_dim=40, mlp_dim=72,
                           moe=MoeConfig(4, layout='all', num_selected_experts=2))
  hlo = jax.jit(lambda *a: kv_cache.step(dropping, *a)).lower(*args(quantized)).compile()
  assert pattern.findall(hlo.as_text())
