"""FLOPs per example against hand computation; schedules and optimizer details."""

import re
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficientlm import gin_config, main
from efficientlm.models.config import TransformerConfig
from efficientlm.training import metrics, optimizers

SMALL = dict(vocab_size=10, emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8)


def test_decoder_only_flops_by_hand():
  cfg = TransformerConfig(**SMALL, num_kv_heads=1, num_encoder_layers=0, num_decoder_layers=2,
                          mlp_activations=('gelu',))
  # Per layer: attention d*hd*(2H + 2KV) = 4*2*(4+2) = 48 (query and out have H=2 heads, key
  # and value KV=1);
  # MLP wi + wo = 2*4*8 = 64. Two layers: 224 matmul parameters; logits 4*10 = 40.
  # Per token: 6*(224+40) = 1584, attention 12*L*H*hd*T = 12*2*4*3 = 288. Three tokens: 5616.
  assert metrics.flops_per_example(cfg, {'targets': 3}, encoder_decoder=False) == 5616


def test_encoder_decoder_flops_by_hand():
  cfg = TransformerConfig(**SMALL, num_encoder_layers=1, num_decoder_layers=1)
  # Attention 4*2*(4+4) = 64, gated MLP 3*4*8 = 96. Encoder layer 160; decoder layer with
  # cross-attention 2*64 + 96 = 224; logits 40. Encoder (5 tokens): 5*(6*160 + 12*4*5) = 6000.
  # Decoder (3 tokens, attending to 3 + 5 positions): 3*(6*(224+40) + 12*4*8) = 5904.
  assert metrics.flops_per_example(cfg, {'inputs': 5, 'targets': 3},
                                   encoder_decoder=True) == 6000 + 5904


@pytest.mark.parametrize('kind,peak', [('TPU v4', 275e12), ('TPU v5 lite', 197e12),
                                       ('NVIDIA H100 80GB HBM3', 989e12), ('cpu', None)])
def test_peak_flops_table(kind, peak):
  assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind=kind)) == peak


def test_progress_eta():
  progress = metrics.Progress(0, 100)
  _, text = progress.update(50)
  assert '50/100' in text and '50%' in text and 'ETA' in text


def test_rsqrt_and_cosine_schedules():
  rsqrt = optimizers.rsqrt_schedule(base_learning_rate=1.0, warmup_steps=100)
  assert float(rsqrt(0)) == pytest.approx(0.1) and float(rsqrt(100)) == pytest.approx(0.1)
  assert float(rsqrt(10_000)) == pytest.approx(0.01)
  cosine = optimizers.warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=110,
                                             final_fraction=0.1)
  assert float(cosine(0)) == 0.0 and float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
  assert float(cosine(110)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match='warmup_steps'):
    optimizers.warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=10)


def test_a_warmup_longer_than_the_run_names_the_macros(tmp_path):
  # runs/recall_tiny.gin has WARMUP_STEPS = 200.
  with pytest.raises(ValueError, match=re.escape(
      'WARMUP_STEPS = 200 and TRAIN_STEPS = 100: raise TRAIN_STEPS or lower WARMUP_STEPS')):
    main.main(['--gin_file=runs/recall_tiny.gin', f"--gin.MODEL_DIR='{tmp_path}'",
               '--gin.TRAIN_STEPS=100'])
  # Called directly, not with the loaded config's values: the parameters are named instead.
  with pytest.raises(ValueError, match='warmup_steps = 10 and total_steps = 10: raise '
                                       'total_steps or lower warmup_steps'):
    optimizers.warmup_cosine_schedule(1.0, warmup_steps=10, total_steps=10)


def test_a_non_positive_rsqrt_warmup_names_its_macro():
  gin_config.parse(['runs/recall_tiny.gin'], ["MODEL_DIR = '/tmp/run'", 'RSQRT_WARMUP = 0',
                                              'optimizers.rsqrt_schedule.warmup_steps = '
                                              '%RSQRT_WARMUP'])
  with pytest.raises(ValueError, match='RSQRT_WARMUP = 0: set RSQRT_WARMUP to a positive'):
    gin.get_configurable(optimizers.rsqrt_schedule)()
  gin.clear_config()
  with pytest.raises(ValueError, match='warmup_steps = 0: set warmup_steps'):
    optimizers.rsqrt_schedule(warmup_steps=0)


def test_adafactor_factors_only_large_matrices():
  params = {'big': jnp.ones((256, 512)), 'small': jnp.ones((64, 64)), 'vector': jnp.ones(512)}
  state = optimizers.adafactor().tx.init(params)
  factored = state[0]  # (FactoredState, ...)
  assert factored.v_row['big'].shape == (256,) and factored.v_col['big'].shape == (512,)
  assert factored.v['small'].shape == (64, 64) and factored.v['vector'].shape == (512,)


def test_adamw_decays_kernels_not_norm_scales():
  params = {'layer': {'kernel': jnp.ones((3, 3)), 'scale': jnp.ones((2, 3))}}
  opt = optimizers.adamw(optimizers.constant_schedule(0.1), weight_decay=0.5, max_grad_norm=None)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
  np.testing.assert_allclose(updates['layer']['kernel'], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
  np.testing.assert_array_equal(updates['layer']['scale'], 0.0)
