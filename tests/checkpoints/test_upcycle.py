"""Sparse upcycling: T5X's dense test checkpoint -> MoE, checked against the dense weights by a
closed form, then trained and resumed through the gin run modes on an expert-parallel mesh."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import serialization

from efficientlm import main, partitioning
from efficientlm.checkpoints.formats import open_checkpoint
from efficientlm.checkpoints.restore import restore
from efficientlm.checkpoints.source import flatten
from efficientlm.checkpoints.upcycle import abstract_params, upcycle
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.layer import MoeLayer
from efficientlm.models.config import TransformerConfig
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.model import EncoderDecoderModel

E = 4
TINY = TransformerConfig(vocab_size=32128, emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16,
                         num_encoder_layers=2, num_decoder_layers=2, dtype='float32')


def _moe_model(dispatch='dropless', scan=False, **moe):
  cfg = MoeConfig(E, layout='mixed', num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                  dispatch=dispatch, **moe)
  return EncoderDecoderModel(EncoderDecoder(dataclasses.replace(TINY, moe=cfg, scan_layers=scan)))


def _expert_parallel():
  return partitioning.Partitioner((2, 4), ('data', 'expert'), 'expert_parallel')


def _dense(fixtures_dir):
  raw = (fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0').read_bytes()
  return flatten(serialization.msgpack_restore(raw)['optimizer']['target'])


def _upcycled(tmp_path, fixtures_dir, model, **kwargs):
  partitioner = _expert_parallel()
  upcycle(model=model, partitioner=partitioner, model_dir=str(tmp_path),
          dense_checkpoint=str(fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0'), **kwargs)
  unscanned = _moe_model(model.module.config.moe.dispatch)
  abstract, _ = abstract_params(unscanned, partitioner)
  params, _ = restore(open_checkpoint(str(tmp_path)), abstract)
  return flatten(jax.device_get(params))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize('dispatch,scan', [('dropless', True), ('dropping', False)])
def test_upcycled_layers_output_top1_probability_times_the_dense_mlp(tmp_path, fixtures_dir,
                                                                    dispatch, scan):
  # Dropping dispatch with capacity for every token: nothing is dropped either way.
  extra = {'min_expert_capacity': 64} if dispatch == 'dropping' else {}
  params = _upcycled(tmp_path, fixtures_dir, _moe_model(dispatch, scan, **extra))
  dense = _dense(fixtures_dir)
  for name, value in dense.items():  # everything but the sparse layers' MLPs is copied
    if '/layers_1/mlp/' not in name:
      np.testing.assert_array_equal(params[name], value, err_msg=name)
  for stack in ('encoder', 'decoder'):
    prefix = f'{stack}/layers_1/mlp/'
    for w in ('wi_0', 'wi_1', 'wo'):
      expert = params[f'{prefix}expert/{w}/kernel']
      assert expert.shape == (E,) + dense[f'{prefix}{w}/kernel'].shape
      for e in range(E):
        np.testing.assert_array_equal(expert[e], dense[f'{prefix}{w}/kernel'])
    router = params[f'{prefix}router/router_weights/w/kernel']
    assert router.shape == (8, E) and 0 < np.std(router) < 0.05  # fresh, Switch-small init

    x = np.random.default_rng(1).standard_normal((2, 6, 8)).astype(np.float32)
    layer = MoeLayer(_moe_model(dispatch, **extra).module.config.moe, 16)
    moe_params = {'router': {'router_weights': {'w': {'kernel': router}}},
                  'expert': {w: {'kernel': params[f'{prefix}expert/{w}/kernel']}
                             for w in ('wi_0', 'wi_1', 'wo')}}
    out = np.asarray(jax.jit(lambda p, x: layer.apply({'params': p}, x, mutable=['moe'])[0])(
        moe_params, x))
    # Closed form from the dense weights: p_top1(x) * wo(gelu(wi_0 x) * wi_1 x).
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mlp = (_gelu_tanh(x @ dense[f'{prefix}wi_0/kernel']) * (x @ dense[f'{prefix}wi_1/kernel'])
           ) @ dense[f'{prefix}wo/kernel']
    np.testing.assert_allclose(out, probs.max(-1, keepdims=True) * mlp, rtol=1e-5, atol=1e-6)


def test_expert_noise_makes_copies_differ(tmp_path, fixtures_dir):
  params = _upcycled(tmp_path, fixtures_dir, _moe_model(), expert_noise=0.01)
  dense = _dense(fixtures_dir)['encoder/layers_1/mlp/wi_0/kernel']
  experts = params['encoder/layers_1/mlp/expert/wi_0/kernel']
  assert not np.array_equal(experts[0], experts[1])
  ratio = experts / dense
  assert abs(np.std(ratio) - 0.01) < 0.004 and abs(np.mean(ratio) - 1) < 0.004


def test_upcycle_refuses_a_used_model_dir_and_a_dense_model(tmp_path, fixtures_dir):
  path = str(fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0')
  upcycle(model=_moe_model(), partitioner=_expert_parallel(), model_dir=str(tmp_path),
          dense_checkpoint=path)
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    upcycle(model=_moe_model(), partitioner=_expert_parallel(), model_dir=str(tmp_path),
            dense_checkpoint=path)
  with pytest.raises(ValueError, match='no MoE layers'):
    upcycle(model=EncoderDecoderModel(EncoderDecoder(TINY)), partitioner=_expert_parallel(),
            model_dir=str(tmp_path / 'dense'), dense_checkpoint=path)


_WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards hex pale moons'.split()


@pytest.mark.slow
def test_upcycle_train_checkpoint_resume_through_gin_on_an_expert_parallel_mesh(
    tmp_path, fixtures_dir, capsys):
  rng = np.random.default_rng(0)
  for i in range(6):
    (tmp_path / f'doc_{i}.txt').write_text(' '.join(rng.choice(_WORDS, size=400)))
  flags = ['--gin_file=models/switch/upcycle_t5_1_1_tiny.gin',
           '--gin_file=runs/upcycle_local_text.gin', '--gin_file=meshes/expert_parallel.gin',
           f"--gin.DENSE_CHECKPOINT='{fixtures_dir / 't5x' / 'test_t5_tiny.checkpoint_0'}'",
           f"--gin.TEXT_FILES='{tmp_path / '*.txt'}'", f"--gin.MODEL_DIR='{tmp_path / 'run'}'",
           '--gin.tasks.register_text_lm.vocab_size=100',
           '--gin.tasks.register_text_lm.validation_fraction=0.5', '--gin.BATCH_SIZE=8',
           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}",
           '--gin.CHECKPOINT_EVERY=2', '--gin.EVAL_EVERY=None', '--gin.LOG_EVERY=2',
           # No eval (not even the one at the end of a run): nothing here checks its scores, and
           # its pipeline and compilation took a quarter of the test's time.
           '--gin.trainer.train.eval_dataset=None']
  assert main.main(['--run_mode=upcycle'] + flags) == 0
  out = capsys.readouterr().out
  assert '2 from scratch' in out and '6 of them tiled over experts' in out

  results = main.main(['--run_mode=train', '--gin.TRAIN_STEPS=4'] + flags)
  out = capsys.readouterr().out
  assert 'parameters only (upcycled or converted)' in out and 'saved checkpoint 4' in out
  assert np.isfinite(results['loss']) and 'moe/load_balancing_loss' in results
  steps = sorted(int(p.name) for p in (tmp_path / 'run' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [0, 2, 4]

  main.main(['--run_mode=train', '--gin.TRAIN_STEPS=6'] + flags)
  out = capsys.readouterr().out
  assert f'resumed from {tmp_path / "run" / "checkpoints" / "4"}' in out
  assert 'steps 4 -> 6' in out and 'parameters only' not in out
