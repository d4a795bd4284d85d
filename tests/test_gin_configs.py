"""Every shipped gin parses and builds; model sizes match their published parameter counts."""

import math

import jax
import pytest

from efficientlm import gin_config, partitioning

SHIPPED = [str(p.relative_to(gin_config.CONFIG_DIR)) for p in gin_config.shipped_gin_files()]


def _num_params() -> int:
  model = gin_config.macro('MODEL')
  batch = model.dummy_batch(1, {'inputs': 8, 'targets': 8})
  abstract = jax.eval_shape(lambda: partitioning.unbox(model.init(jax.random.key(0), batch)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def test_configs_are_shipped():
  assert any(p.startswith('models/t5_1_1/') for p in SHIPPED)
  assert any(p.startswith('meshes/') for p in SHIPPED)


@pytest.mark.parametrize('path', SHIPPED)
def test_every_gin_file_parses_and_builds(path):
  gin_config.parse([path])
  built = False
  for name in ('MODEL', 'PARTITIONER'):
    try:
      value = gin_config.macro(name)
    except ValueError:
      continue
    built = True
    if name == 'MODEL':
      assert _num_params() > 0
    else:
      assert value.mesh.size == jax.device_count()
  assert built, f'{path} defines neither MODEL nor PARTITIONER'


# Published sizes: T5X's T5.1.1 checkpoints table.
@pytest.mark.parametrize('size,published', [('small', 77e6), ('base', 248e6), ('large', 783e6),
                                            ('xl', 2.85e9), ('xxl', 11.1e9)])
def test_t5_1_1_parameter_counts(size, published):
  gin_config.parse([f'models/t5_1_1/{size}.gin'])
  assert abs(_num_params() / published - 1) < 0.01


# GPT-3 paper (Brown et al. 2020, Table 2.1) sizes, with GPT-2's 50257-token vocabulary. Ours
# lack learned position embeddings and biases, hence 2%.
@pytest.mark.parametrize('size,published', [('gpt_125m', 125e6), ('gpt_350m', 350e6),
                                            ('gpt_1_3b', 1.3e9)])
def test_gpt_style_parameter_counts(size, published):
  gin_config.parse([f'models/decoder/{size}.gin'], ['VOCAB_SIZE = 50257'])
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
