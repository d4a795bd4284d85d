"""Every shipped gin parses and builds; model sizes match their published parameter counts."""

import math
import pathlib
import tempfile

import gin
import jax
import pytest

from efficientlm import gin_config, partitioning

SHIPPED = [str(p.relative_to(gin_config.CONFIG_DIR)) for p in gin_config.shipped_gin_files()]


def _num_params() -> int:
  model = gin_config.macro('MODEL')
  # 512 tokens: block-sparse layers need several blocks (abstract: nothing is computed).
  batch = model.dummy_batch(1, {'inputs': 512, 'targets': 512})
  abstract = jax.eval_shape(lambda: partitioning.unbox(model.init(jax.random.key(0), batch)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def test_configs_are_shipped():
  assert any(p.startswith('models/t5_1_1/') for p in SHIPPED)
  assert any(p.startswith('meshes/') for p in SHIPPED)


# Run gins are used after a model gin (except recall_tiny, which includes its own) with their
# required macros bound.
RUN_MACROS = ["MODEL_DIR = '/tmp/run'", "RESTORE_PATH = '/tmp/pretrained'",
              "CHECKPOINT_PATH = '/tmp/run/checkpoints'", "DENSE_CHECKPOINT = '/tmp/dense'",
              "BASE_CHECKPOINT = '/tmp/base'", "SOURCE_CHECKPOINT = '/tmp/source'",
              'TRAIN_STEPS = 1000']
# What each run mode's function receives from the run gins, built here short of running it.
RUN_ARGUMENTS = ('trainer.train.train_dataset', 'trainer.train.eval_dataset',
                 'trainer.train.optimizer', 'evaluation.evaluate.eval_dataset',
                 'infer.infer.dataset', 'infer.infer.decode_options',
                 'prune.prune.calibration_dataset')


# Fragments included by other gins, parsed as they are used.
FRAGMENTS = {'models/switch/common.gin': (['models/switch/common.gin'], ['NUM_EXPERTS = 8']),
             'models/switch/base.gin': (['models/switch/base.gin'], ['NUM_EXPERTS = 8']),
             'models/switch/decoder_common.gin': (['models/decoder/tiny.gin',
                                                   'models/switch/decoder_common.gin'], []),
             # Architecture overlays go on top of a model gin.
             'models/bigbird/bigbird.gin': (['models/decoder/tiny.gin',
                                             'models/bigbird/bigbird.gin'], []),
             'models/reformer/lsh.gin': (['models/decoder/tiny.gin', 'models/reformer/lsh.gin'],
                                         []),
             'models/evolving/evolving.gin': (['models/decoder/tiny.gin',
                                               'models/evolving/evolving.gin'], []),
             'models/reformer/reversible.gin': (['models/decoder/tiny.gin',
                                                 'models/reformer/reversible.gin'], [])}
FRAGMENTS.update({path: (['models/decoder/tiny.gin', path], []) for path in (
    'models/h3/h3.gin', 'models/h3/hybrid.gin', 'models/h3/s4d.gin', 'models/gss/gss.gin',
    'models/gss/hybrid.gin', 'models/scaling/sparse_ffn.gin', 'models/scaling/sparse_qkv.gin',
    'models/scaling/scaling.gin', 'models/terraformer/terraformer.gin',
    'models/perceiver_ar/perceiver_ar.gin', 'models/block_recurrent/block_recurrent.gin')})
# An overlay on a fine-tuning run gin.
FRAGMENTS['runs/tfew.gin'] = (['models/decoder/tiny.gin', 'runs/finetune.gin', 'runs/tfew.gin'],
                              RUN_MACROS)
FRAGMENTS['models/block_recurrent/window.gin'] = (
    ['models/block_recurrent/decoder_tiny.gin', 'models/block_recurrent/window.gin'], [])
FRAGMENTS.update({f'models/fnet/{name}.gin': (['models/t5_1_1/tiny.gin', f'models/fnet/{name}.gin'],
                                              []) for name in ('fnet', 'fnet_seq', 'low_pass',
                                                               'global_filter')})


def _parse_shipped(path: str) -> None:
  if path in FRAGMENTS:
    gin_config.parse(*FRAGMENTS[path])
  elif path.startswith('sweeps/'):  # run gins of their own (the sweep run mode)
    gin_config.parse([path], RUN_MACROS[:1])
  elif not path.startswith('runs/'):
    gin_config.parse([path])
  elif path == 'runs/recall_tiny.gin':
    gin_config.parse([path], RUN_MACROS)
  elif path in ('runs/upcycle_local_text.gin', 'runs/long_document_text.gin'):
    # Both train a vocabulary on a few text files.
    directory = tempfile.mkdtemp()
    for i in range(4):
      pathlib.Path(directory, f'{i}.txt').write_text(' '.join(['some words here'] * 50 + [str(i)]))
    model = ('models/switch/upcycle_t5_1_1_tiny.gin' if path == 'runs/upcycle_local_text.gin'
             else 'models/block_recurrent/decoder_tiny.gin')
    gin_config.parse([model, path],
                     RUN_MACROS + [f"TEXT_FILES = '{directory}/*.txt'",
                                   'tasks.register_text_lm.vocab_size = 40',
                                   'tasks.register_text_lm.validation_fraction = 0.5'])
  elif path.startswith('runs/long_document'):
    gin_config.parse(['models/block_recurrent/decoder_tiny.gin', path], RUN_MACROS)
  else:
    gin_config.parse(['models/t5_1_1/tiny.gin', path], RUN_MACROS)


@pytest.mark.parametrize('path', SHIPPED)
def test_every_gin_file_parses_and_builds(path):
  _parse_shipped(path)
  gin_config.check_binding_types()
  built = []
  for name in ('MODEL', 'PARTITIONER'):
    try:
      value = gin_config.macro(name)
    except ValueError:
      continue
    built.append(name)
    if name == 'MODEL':
      assert _num_params() > 0
    else:
      assert value.mesh.size == jax.device_count()
  for argument in RUN_ARGUMENTS:
    try:
      reference = gin.query_parameter(argument)
    except ValueError:
      continue
    built.append(argument)
    assert reference.scoped_configurable_fn() is not None
  if path.startswith('sweeps/'):  # a dry run validates the grid without running it
    from efficientlm.inference import sweep  # pylint: disable=g-import-not-at-top
    assert gin.get_configurable(sweep.sweep)(dry_run=True)
    built.append('sweep')
  assert built, f'{path} defines nothing to build'
  if path.startswith('runs/'):
    assert any(a.endswith('dataset') for a in built), f'{path} configures no data'


# Scanned layers hold the same parameters stacked, and trace one layer instead of all of them
# (the unscanned trees of these gins are built by test_every_gin_file_parses_and_builds).
SCANNED = 'SCAN_LAYERS = True'


# Published sizes: T5X's T5.1.1 checkpoints table.
@pytest.mark.parametrize('size,published', [('small', 77e6), ('base', 248e6), ('large', 783e6),
                                            ('xl', 2.85e9), ('xxl', 11.1e9)])
def test_t5_1_1_parameter_counts(size, published):
  gin_config.parse([f'models/t5_1_1/{size}.gin'], [SCANNED])
  assert abs(_num_params() / published - 1) < 0.01


# Switch Transformer paper (Fedus et al. 2021), Table 9: Switch-Base 7.4B, Switch-Large 26.3B.
@pytest.mark.parametrize('path,published', [('models/switch/base_128.gin', 7.4e9),
                                            ('models/switch/large_128.gin', 26.3e9)])
def test_switch_parameter_counts(path, published):
  gin_config.parse([path], [SCANNED])
  assert abs(_num_params() / published - 1) < 0.01


# GPT-3 paper (Brown et al. 2020, Table 2.1) sizes, with GPT-2's 50257-token vocabulary. Ours
# lack learned position embeddings and biases, hence 2%.
@pytest.mark.parametrize('size,published', [('gpt_125m', 125e6), ('gpt_350m', 350e6),
                                            ('gpt_1_3b', 1.3e9)])
def test_gpt_style_parameter_counts(size, published):
  gin_config.parse([f'models/decoder/{size}.gin'], ['VOCAB_SIZE = 50257', SCANNED])
  assert abs(_num_params() / published - 1) < 0.02


def test_typo_in_a_binding_names_it():
  with pytest.raises(ValueError, match='emb_dimm'):
    gin_config.parse(['models/t5_1_1/tiny.gin'], ['model_config.TransformerConfig.emb_dimm = 4'])


def test_undefined_macro_names_it():
  gin_config.parse(['meshes/data_parallel.gin'])
  with pytest.raises(ValueError, match='Gin macro MODEL is not defined'):
    gin_config.macro('MODEL')


def test_missing_gin_file_is_named():
  with pytest.raises(IOError, match='models/t5_1_1/huge.gin'):
    gin_config.parse(['models/t5_1_1/huge.gin'])


def test_directories_named_like_config_folders_do_not_break_lookup(tmp_path, monkeypatch):
  """`make train` writes runs/ into the working directory; gin must still find runs/*.gin."""
  for name in ('runs', 'models'):
    (tmp_path / name).mkdir()
  monkeypatch.chdir(tmp_path)
  gin_config.parse(['runs/recall_tiny.gin'], ["MODEL_DIR = 'x'"])
  assert gin_config.macro('VOCAB_SIZE') == 64


RECALL = ['runs/recall_tiny.gin']


@pytest.mark.parametrize('binding,message', [
    ("TRAIN_STEPS = 'ten'", "TRAIN_STEPS = 'ten' is bound to trainer.train.total_steps and "
     'optimizers.warmup_cosine_schedule.total_steps, which expect an int: e.g. '
     '--gin.TRAIN_STEPS=1000'),
    ("TRAIN_STEPS = '100'", '--gin.TRAIN_STEPS=100'),  # a quoted number: the fix unquotes it
    ('TRAIN_STEPS = 1e3', 'TRAIN_STEPS = 1000.0 is bound .* expect an int: e.g. '
     '--gin.TRAIN_STEPS=1000'),
    ('SCAN_LAYERS = 1', 'SCAN_LAYERS = 1 is bound to model_config.TransformerConfig.scan_layers, '
     'which expects True or False'),  # a bool is no int, nor an int a bool
    ('trainer.train.log_every = True', 'trainer.train.log_every = True, but it expects an int'),
    ('MAX_EVAL_BATCHES = 0.5', 'MAX_EVAL_BATCHES = 0.5 is bound to trainer.train.max_eval_batches '
     'and evaluation.evaluate.max_eval_batches, which expect an int or None'),
    ('MODEL_DIR = 7', 'MODEL_DIR = 7 is bound to trainer.train.model_dir and '
     'evaluation.evaluate.checkpoint_path, which expect a string: e.g. --gin.MODEL_DIR="\'7\'"\n'
     'MODEL_DIR = 7 is bound to evaluation.evaluate.model_dir, which expects a string or None'),
    ('train/data_config.DatasetConfig.batch_size = [8]',
     r"train/data_config.DatasetConfig.batch_size = \[8\], but it expects an int"),
])
def test_a_value_of_the_wrong_type_names_its_macro_and_parameter(binding, message):
  gin_config.parse(RECALL, ["MODEL_DIR = '/tmp/run'", binding])
  with pytest.raises(ValueError, match=message):
    gin_config.check_binding_types()


def test_values_of_the_right_type_pass():
  gin_config.parse(RECALL, ["MODEL_DIR = '/tmp/run'", 'optimizers.adamw.weight_decay = 1',
                            'MAX_EVAL_BATCHES = None', 'AUX_LOSS_WEIGHT = 0',
                            'RESTORE_PATH = %MODEL_DIR'])
  gin_config.check_binding_types()  # an int is a float; None for `int | None`; macro chains


@pytest.mark.parametrize('bindings,message', [
    (['TRAIN_STEPZ = 4'], 'no loaded gin file defines or uses the macro TRAIN_STEPZ; did you '
     'mean TRAIN_STEPS?'),
    (['TRAIN_STEPS = 4\nWARMUP_STEPZ = 1'], 'WARMUP_STEPZ; did you mean WARMUP_STEPS?'),
    (['QQQQ = 1'], 'the macro QQQQ; check its spelling'),
])
def test_an_unknown_macro_on_the_command_line_is_an_error(bindings, message):
  bindings = ["MODEL_DIR = '/tmp/run'"] + bindings
  gin_config.parse(RECALL, bindings)
  with pytest.raises(ValueError, match=message):
    gin_config.check_command_line_macros(bindings)


def test_macros_that_the_config_defines_or_uses_are_known():
  # MODEL_DIR: defined in a gin file; MY_SEED: new, but used by another binding.
  bindings = ["MODEL_DIR = '/tmp/run'", 'MY_SEED = 3', 'trainer.train.seed = %MY_SEED']
  gin_config.parse(RECALL, bindings)
  gin_config.check_command_line_macros(bindings)


def test_binding_source_names_the_macro_that_feeds_a_parameter():
  gin_config.parse(RECALL, ["MODEL_DIR = '/tmp/run'", 'STEPS = 10', 'TRAIN_STEPS = %STEPS'])
  schedule = 'optimizers.warmup_cosine_schedule'
  assert gin_config.binding_source(schedule, 'warmup_steps') == 'WARMUP_STEPS'
  assert gin_config.binding_source(schedule, 'total_steps') == 'STEPS'  # the macro to change
  assert gin_config.binding_source(schedule, 'peak_learning_rate') is None  # a literal
  assert gin_config.binding_source(schedule, 'final_fraction') is None  # unbound
  # In a scope, the scope's binding: the train dataset's seed is %SEED, the eval one's 42.
  with gin.config_scope('train'):
    assert gin_config.binding_source('data_config.DatasetConfig', 'seed') == 'SEED'
  with gin.config_scope('eval'):
    assert gin_config.binding_source('data_config.DatasetConfig', 'seed') is None
  gin.clear_config()
  assert gin_config.binding_source(schedule, 'total_steps') is None
