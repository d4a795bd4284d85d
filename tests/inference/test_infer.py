"""Run mode `infer` through the gins: a checkpoint and a prompt file in, JSONL out, resumable."""

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
from efficientlm.data import prompts as prompt_lib
from efficientlm.inference import decoding, quantization
from efficientlm.training import checkpoints

SENTENCEPIECE = str(pathlib.Path(seqio.__file__).parent / 'test_data' / 'sentencepiece' /
                    'sentencepiece.model')
PROMPTS = ['the quick brown fox', 'hello', 'a b c d e f g', 'one more prompt']


@functools.partial(jax.jit, static_argnums=0)
def _init(model):
  """Jitted (op by op, compiling each op costs more), the model static: the tests that build the
  same model from the same gin share one compiled init."""
  return model.module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']


def _checkpoint(tmp_path, model_gin='models/decoder/tiny.gin'):
  """A random tiny-decoder checkpoint (`model_gin`, float32, vocabulary 64)."""
  gin_config.parse([model_gin],
                   ['VOCAB_SIZE = 64', "ACTIVATION_DTYPE = 'float32'"])
  model = gin_config.macro('MODEL')
  params = partitioning.unbox(_init(model))
  ckpt = checkpoints.Checkpointer(tmp_path / 'ckpt' / 'checkpoints', async_save=False)
  ckpt.save(3, params, wait=True)
  ckpt.close()
  return model, params


def _flags(tmp_path, prompt_file, *extra, model_gin='models/decoder/tiny.gin'):
  return ['--run_mode=infer', f'--gin_file={model_gin}', '--gin_file=runs/infer.gin',
          f"--gin.MODEL_DIR='{tmp_path / 'out'}'", f"--gin.CHECKPOINT_PATH='{tmp_path / 'ckpt'}'",
          f"--gin.PROMPT_FILE='{prompt_file}'", '--gin.VOCAB_SIZE=64', '--gin.BATCH_SIZE=8',
          "--gin.ACTIVATION_DTYPE='float32'", '--gin.MAX_DECODE_LENGTH=5',
          f"--gin.vocabularies.default_vocabulary.path='{SENTENCEPIECE}'",
          '--gin.vocabularies.default_vocabulary.extra_ids=0',
          *extra]


@pytest.mark.slow
def test_infer_writes_greedy_predictions_and_resumes(tmp_path):
  model, params = _checkpoint(tmp_path)
  prompt_file = tmp_path / 'prompts.txt'
  prompt_file.write_text('\n'.join(PROMPTS) + '\n')
  out = pathlib.Path(main.main(_flags(tmp_path, prompt_file)))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [line['inputs'] for line in lines] == PROMPTS
  # Each prediction is what decoding the tokenized prompt alone gives.
  vocabulary = seqio.SentencePieceVocabulary(SENTENCEPIECE)
  for line in lines:
    ids = jnp.asarray([vocabulary.encode(line['inputs'])], jnp.int32)
    alone = model.predict(params, ids, decoding.DecodeOptions(max_decode_length=5))
    expected = alone.tokens[0, :int(alone.lengths[0])].tolist()
    assert line['tokens'] == expected
    assert line['prediction'] == prompt_lib.detokenize(vocabulary, expected)

  # A rerun after a crash (here: the last line lost) writes only what is missing.
  out.write_text('\n'.join(out.read_text().splitlines()[:3]) + '\n')
  main.main(_flags(tmp_path, prompt_file))
  again = [json.loads(line) for line in out.read_text().splitlines()]
  assert again == lines


@pytest.mark.slow
def test_an_h3_model_decodes_recurrently_through_the_run_mode(tmp_path):
  """H3 layers keep recurrent states instead of a KV cache; the run mode decodes them like any
  model: each prediction is what decoding its prompt alone gives."""
  gin = 'models/h3/decoder_tiny.gin'
  model, params = _checkpoint(tmp_path, gin)
  prompt_file = tmp_path / 'prompts.txt'
  prompt_file.write_text('\n'.join(PROMPTS[:2]) + '\n')
  lines = [json.loads(line) for line in
           pathlib.Path(main.main(_flags(tmp_path, prompt_file, model_gin=gin))).read_text()
           .splitlines()]
  vocabulary = seqio.SentencePieceVocabulary(SENTENCEPIECE)
  for line in lines:
    ids = jnp.asarray([vocabulary.encode(line['inputs'])], jnp.int32)
    alone = model.predict(params, ids, decoding.DecodeOptions(max_decode_length=5))
    assert line['tokens'] == alone.tokens[0, :int(alone.lengths[0])].tolist()


@pytest.mark.parametrize('name,text', [('prompts.txt', ''), ('prompts.jsonl', '\n  \n\n')])
def test_a_prompt_file_without_prompts_is_an_error(tmp_path, name, text):
  _checkpoint(tmp_path)
  prompt_file = tmp_path / name
  prompt_file.write_text(text)
  with pytest.raises(ValueError, match=f'Prompt file {prompt_file} has no prompts'):
    main.main(_flags(tmp_path, prompt_file))  # rather than an empty predictions.jsonl


def test_int8_weights(tmp_path):
  model, params = _checkpoint(tmp_path)
  prompt_file = tmp_path / 'prompts.jsonl'
  prompt_file.write_text(''.join(json.dumps({'prompt': p}) + '\n' for p in PROMPTS))
  out = pathlib.Path(main.main(_flags(tmp_path, prompt_file, '--gin.INT8_WEIGHTS=True')))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  # The run decoded with the int8 weights: exactly what the dequantized weights give.
  dequantized = quantization.dequantize_tree(quantization.quantize_tree(params), jnp.float32)
  vocabulary = seqio.SentencePieceVocabulary(SENTENCEPIECE)
  for line in lines:
    ids = jnp.asarray([vocabulary.encode(line['inputs'])], jnp.int32)
    alone = model.predict(dequantized, ids, decoding.DecodeOptions(max_decode_length=5))
    assert line['tokens'] == alone.tokens[0, :int(alone.lengths[0])].tolist()
    np.testing.assert_allclose(line['score'], alone.scores[0], rtol=1e-4)


def test_infer_on_a_language_modelling_task_prompts_with_its_targets(tmp_path):
  model, params = _checkpoint(tmp_path)
  flags = ['--run_mode=infer', '--gin_file=models/decoder/tiny.gin', '--gin_file=runs/infer.gin',
           f"--gin.MODEL_DIR='{tmp_path / 'out'}'", f"--gin.CHECKPOINT_PATH='{tmp_path / 'ckpt'}'",
           '--gin.VOCAB_SIZE=64', "--gin.ACTIVATION_DTYPE='float32'", '--gin.BATCH_SIZE=8',
           "--gin.MIXTURE_OR_TASK_NAME='synthetic_recall'",
           "--gin.TASK_FEATURE_LENGTHS={'targets': 49}", '--gin.PROMPT_LENGTH=20',
           '--gin.MAX_EXAMPLES=8', '--gin.MAX_DECODE_LENGTH=3']
  out = pathlib.Path(main.main(flags))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  # The prompts are the first 20 target tokens of the validation split, read here by seqio.
  ds = seqio.get_mixture_or_task('synthetic_recall').get_dataset(
      {'targets': 49}, split='validation', shuffle=False)
  examples = list(ds.take(8).as_numpy_iterator())
  assert len(lines) == 8
  for line, example in zip(lines, examples):
    prompt = example['targets'][:20]
    assert list(line['inputs']) == prompt.tolist()
    assert list(line['targets']) == example['targets'][20:].tolist()
    alone = model.predict(params, jnp.asarray(prompt[None]),
                          decoding.DecodeOptions(max_decode_length=3))
    assert line['tokens'] == alone.tokens[0, :int(alone.lengths[0])].tolist()
