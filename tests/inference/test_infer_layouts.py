"""Run mode `infer` through the partitioned layouts (INFERENCE_LAYOUT) on 8 emulated devices.

The independent reference is the same run through the plain Flax model (INFERENCE_LAYOUT =
None), decoding by beam search: each layout must give its tokens and scores. Covered: a pair of
layouts with a KV cache reshard (wg_xyz/heads prefill, 2d/batch_xyz decode) and 'auto' (which
picks 1d/heads for prefill and 1d/batch_xyz for decode here); serial blocks only (the tiny
gin). 'auto' must pick the runnable layout of least predicted time (a brute-force minimum over
perf_model.predict), and infer_layout.json must hold that prediction beside a measured step.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from efficientlm import gin_config, main, partitioning
from efficientlm.errors import ConfigError
from efficientlm.inference import layout_generate
from efficientlm.inference import perf_model as pm
from efficientlm.inference.layout_plan import LayerPlan
from efficientlm.training import checkpoints

SENTENCEPIECE = str(pathlib.Path(seqio.__file__).parent / 'test_data' / 'sentencepiece' /
                    'sentencepiece.model')
PROMPTS = ['the quick brown fox', 'hello', 'a b c d e f g', 'one more prompt']
# tiny.gin with 8 query heads, so that 1d and 2d layouts split them over the 8 devices.
MODEL = ['VOCAB_SIZE = 64', "ACTIVATION_DTYPE = 'float32'",
         'model_config.TransformerConfig.num_heads = 8',
         'model_config.TransformerConfig.head_dim = 16']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A random tiny-decoder checkpoint and a prompt file; run(name, *flags) -> (lines, dir)."""
  root = tmp_path_factory.mktemp('infer_layouts')
  gin_config.parse(['models/decoder/tiny.gin'], MODEL)
  model = gin_config.macro('MODEL')
  shapes = jax.eval_shape(lambda: model.module.init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32))['params'])
  # Random weights drawn in numpy (compiling the init would cost more than the test's runs):
  # kernels ~ N(0, 1/fan_in), norm scales near one.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: (rng.normal(0, a.shape[0]**-0.5, a.shape) if len(a.shape) > 1 else
                 1 + 0.2 * rng.normal(size=a.shape)).astype(np.float32),
      partitioning.unbox(shapes))
  ckpt = checkpoints.Checkpointer(root / 'ckpt' / 'checkpoints', async_save=False)
  ckpt.save(3, params, wait=True)
  ckpt.close()
  prompt_file = root / 'prompts.txt'
  prompt_file.write_text('\n'.join(PROMPTS) + '\n')

  def infer(name, *flags, model_gin='models/decoder/tiny.gin'):
    out = root / name
    argv = ['--run_mode=infer', f'--gin_file={model_gin}', '--gin_file=runs/infer.gin',
            f"--gin.MODEL_DIR='{out}'", f"--gin.CHECKPOINT_PATH='{root / 'ckpt'}'",
            f"--gin.PROMPT_FILE='{prompt_file}'", '--gin.BATCH_SIZE=8',
            '--gin.MAX_DECODE_LENGTH=4', '--gin.infer.infer.layout_timing_repeats=1',
            f"--gin.vocabularies.default_vocabulary.path='{SENTENCEPIECE}'",
            '--gin.vocabularies.default_vocabulary.extra_ids=0',
            *(f'--gin_bindings={b}' for b in MODEL), *flags]
    path = pathlib.Path(main.main(argv))
    return [json.loads(line) for line in path.read_text().splitlines()], out
  return infer


def _same_predictions(lines, reference):
  assert [line['inputs'] for line in lines] == PROMPTS
  assert [line['tokens'] for line in lines] == [line['tokens'] for line in reference]
  np.testing.assert_allclose([line['score'] for line in lines],
                             [line['score'] for line in reference], rtol=1e-4, atol=1e-4)


# Beam search: the rows of each prompt's cache are repeated per beam and reordered every step,
# the most any decoding method asks of a layout's cache (greedy and sampling share its steps).
BEAMS = ["--gin.DECODE_METHOD='beam'", f'--gin.decoding.DecodeOptions.num_beams={2}']


@functools.lru_cache(maxsize=None)
def _reference(run):
  """The predictions of the plain Flax model (INFERENCE_LAYOUT = None), computed once."""
  return run('plain', *BEAMS)[0]


def test_two_layouts_with_a_cache_reshard_equal_the_unpartitioned_model(run):
  """wg_xyz prefill, then the cache resharded for 2d/batch_xyz steps."""
  lines, _ = run('pair', "--gin.INFERENCE_LAYOUT={'prefill': 'wg_xyz', 'decode': '2d/batch_xyz'}",
                 '--gin.infer.infer.layout_timing_repeats=0', *BEAMS)
  _same_predictions(lines, _reference(run))


def test_auto_picks_the_fastest_predicted_layout_and_records_it(run):
  lines, out = run('auto', "--gin.INFERENCE_LAYOUT='auto'", *BEAMS)
  _same_predictions(lines, _reference(run))
  record = json.loads((out / 'infer_layout.json').read_text())
  assert record['mesh'] == {'x': 2, 'y': 2, 'z': 2} and record['hardware'] == 'tpu_v4'
  gin_config.parse(['models/decoder/tiny.gin'], MODEL)
  cfg = gin_config.macro('MODEL').module.config
  spec = pm.ModelSpec.from_transformer_config(cfg)
  mesh = layout_generate.layout_mesh(None)
  vocabulary = seqio.SentencePieceVocabulary(SENTENCEPIECE)
  prompt_tokens = max(len(vocabulary.encode(p)) for p in PROMPTS) + 1  # BOS
  expected = {'prefill': (8, prompt_tokens, 0), 'decode': (16, 1, prompt_tokens)}  # 2 beams
  for phase, row in record['phases'].items():
    assert row['chosen_by'] == 'perf_model'
    assert (row['batch'], row['length'], row['context']) == expected[phase]
    times = {}
    for layout in pm.candidate_layouts(spec):  # brute force over what the layout code runs
      try:
        LayerPlan.create(cfg, layout, mesh).check_batch(row['batch'])
      except ValueError:
        continue
      times[layout.name] = pm.predict(
          spec, 'tpu_v4', (2, 2, 2), layout, phase, row['batch'],
          row['length'] if phase == 'prefill' else None, row['context'],
          weight_dtype='float32', act_bytes=4).time
    assert row['layout'] in times and len(times) > 3
    assert row['predicted_s'] == pytest.approx(min(times.values()), rel=1e-12)
    assert times[row['layout']] == pytest.approx(row['predicted_s'], rel=1e-12)
  assert record['phases']['decode']['measured_step_s'] > 0


@pytest.mark.parametrize('flags,match', [
    (["--gin.INFERENCE_LAYOUT='3d/heads'"], "INFERENCE_LAYOUT '3d/heads'.*'1d', '2d'"),
    (["--gin.INFERENCE_LAYOUT='2d/batch_xyz'", '--gin.BATCH_SIZE=4'], r'batch \(B\) = 4'),
    (["--gin.INFERENCE_LAYOUT='1d/heads/parallel'"], 'parallel block but the model is serial'),
    (["--gin.INFERENCE_LAYOUT='2d'", '--gin.INFERENCE_MESH=(2, 2)'], r'INFERENCE_MESH = \(2, 2\)'),
])
def test_bad_layouts_stop_before_decoding(run, flags, match):
  with pytest.raises(ConfigError, match=match):
    run('bad', *flags)


def test_encoder_decoder_models_are_refused(run):
  with pytest.raises(ConfigError, match='decoder-only models; this is an encoder-decoder'):
    run('t5', "--gin.INFERENCE_LAYOUT='1d'", model_gin='models/t5_1_1/tiny.gin')


@pytest.mark.parametrize('devices,shape', [(8, (2, 2, 2)), (16, (2, 2, 4)), (4, (1, 2, 2)),
                                           (6, (1, 2, 3)), (1, (1, 1, 1)), (12, (2, 2, 3))])
def test_default_mesh_shape(devices, shape):
  assert layout_generate.default_mesh_shape(devices) == shape
