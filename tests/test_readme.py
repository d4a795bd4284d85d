"""The README's Python blocks run as written and do what their comments say; a Python block that
no test runs must say it is an excerpt."""

from __future__ import annotations

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from efficientlm import partitioning

README = pathlib.Path(__file__).parent.parent / 'README.md'
# Written in the paragraph right above a Python block that cannot run as is (it needs a TPU, GCS,
# a long job), followed by what is missing.
EXCERPT = 'Excerpt (not runnable as is)'
# A line of each block that a test runs, found in that block only.
MODELS = "gin_config.parse(['models/t5_1_1/tiny.gin']"
PARTITIONING = 'partitioner.shard_batch(host_local_batch)'
DECODING = 'DecodeOptions(max_decode_length=8)'
KERNELS = 'bigbird_block_mask('
RUN_BY_TESTS = (MODELS, PARTITIONING, DECODING, KERNELS)

_FENCE = re.compile(r'^```(\S*)\n(.*?)^```$', re.M | re.S)


def fenced_blocks(text: str) -> list[tuple[str, str, int, str]]:
  """(language, body, line of the opening fence, the paragraph above it) of every block."""
  blocks = []
  for match in _FENCE.finditer(text):
    above = text[:match.start()].rstrip('\n').split('\n\n')[-1]
    blocks.append((match[1], match[2], text.count('\n', 0, match.start()) + 1, above))
  return blocks


def _is_python(body: str) -> bool:
  try:
    compile(body, '<block>', 'exec')
  except SyntaxError:
    return False
  return bool(re.search(r'^(import|from) \w', body, re.M))


def unchecked_blocks(text: str, keys=RUN_BY_TESTS) -> list[str]:
  """What is wrong with the Python blocks of `text`: one that holds no key and is not marked as
  an excerpt, a key found in no block or in several, Python in a block not tagged `python`."""
  problems = []
  python = [(body, line, above) for language, body, line, above in fenced_blocks(text)
            if language == 'python']
  for body, line, above in python:
    if not any(key in body for key in keys) and EXCERPT not in above:
      problems.append(f'line {line}: no test runs this python block; run it in '
                      f'tests/test_readme.py, or write "{EXCERPT}: <what it lacks>" above it')
  for key in keys:
    found = [line for body, line, _ in python if key in body]
    if len(found) != 1:
      problems.append(f'{key!r} is in the python blocks at lines {found}, not in exactly one')
  for language, body, line, _ in fenced_blocks(text):
    if language != 'python' and _is_python(body):
      problems.append(f'line {line}: Python in a block tagged {language!r}, not python')
  return problems


def run_block(key: str) -> dict:
  """Runs the README block holding `key`; its names. Tracebacks give README line numbers."""
  (block,) = [(body, line) for language, body, line, _ in fenced_blocks(README.read_text())
              if language == 'python' and key in body]
  body, line = block
  namespace = {}
  exec(compile('\n' * line + body, str(README), 'exec'), namespace)  # pylint: disable=exec-used
  return namespace


def test_every_python_block_is_run_by_a_test_or_marked_as_an_excerpt():
  assert unchecked_blocks(README.read_text()) == []


def test_the_check_finds_unchecked_blocks():
  run = '```python\nimport os\nRUN_ME = 1\n```\n'
  unmarked = '\nSome text.\n\n```python\nimport os\nos.getcwd()\n```\n'
  marked = f'\n{EXCERPT}: needs a TPU.\n\n```python\nimport os\nos.getcwd()\n```\n'
  untagged = '\n```\nfrom os import path\npath.join("a")\n```\n'
  shell = '\n```bash\nmake train\n```\n'
  assert unchecked_blocks(run + marked + shell, keys=('RUN_ME',)) == []
  assert len(unchecked_blocks(run + unmarked, keys=('RUN_ME',))) == 1
  assert len(unchecked_blocks(run + untagged, keys=('RUN_ME',))) == 1
  assert len(unchecked_blocks(run + run, keys=('RUN_ME',))) == 1  # a key in two blocks
  assert len(unchecked_blocks(marked, keys=('RUN_ME',))) == 1  # a key in none


def _log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(log-probabilities, log-normalizer) in float64."""
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
  return logits - log_z[..., None], log_z


def test_models_example_computes_the_cross_entropy_of_its_batch(capsys):
  names = run_block(MODELS)
  model, batch, metrics = names['model'], names['batch'], names['metrics']
  targets = np.asarray(batch['decoder_target_tokens'])
  log_probs, log_z = _log_softmax(np.asarray(names['logits']))
  assert log_probs.shape == (8, 16, 32128)
  real = targets > 0
  target_log_probs = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  cross_entropy = -target_log_probs[real].mean()
  z_loss = 1e-4 * np.square(log_z[real]).mean()  # Z_LOSS of configs/models/t5_1_1/common.gin
  assert model.z_loss == 1e-4 and float(metrics['num_tokens']) == real.sum() == 8 * 12
  np.testing.assert_allclose(float(metrics['cross_entropy']), cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(float(names['loss']), cross_entropy + z_loss, rtol=1e-5)
  assert abs(cross_entropy - math.log(32128)) < 1.0  # a fresh model is nearly uniform
  scores = np.asarray(names['scores'])
  np.testing.assert_allclose(scores[real], target_log_probs[real], rtol=1e-4)
  assert (scores[~real] == 0).all()
  assert capsys.readouterr().out == f'{float(names["loss"]):.2f}\n' == '10.87\n'  # as commented
  assert f'{cross_entropy:.2f}' == '10.86'


# The tensor_parallel preset over ('data', 'model') as the README's table says: heads, MLP
# units and vocabulary over 'model', the multi-query K/V projections and norms replicated.
_TENSOR_PARALLEL = {'token_embedder/embedding': P('model', None),
                    'query/kernel': P(None, 'model'), 'key/kernel': P(None, None),
                    'value/kernel': P(None, None), 'out/kernel': P('model', None),
                    'wi/kernel': P(None, 'model'), 'wo/kernel': P('model', None),
                    'scale': P(None)}


def _expected_spec(path: str) -> P:
  (spec,) = [s for suffix, s in _TENSOR_PARALLEL.items() if path.endswith(suffix)]
  return spec


def test_partitioning_example_shards_as_the_table_says_and_equals_one_device(capsys):
  names = run_block(PARTITIONING)
  mesh = names['partitioner'].mesh
  assert dict(mesh.shape) == {'data': 2, 'model': 4}
  flat = jax.tree_util.tree_flatten_with_path(names['params'])[0]
  assert len(flat) == 1 + 1 + 2 * 8  # embedding, final norm, 8 per layer
  for path, value in flat:
    name = '/'.join(k.key for k in path)
    expected = NamedSharding(mesh, _expected_spec(name))
    assert value.sharding.is_equivalent_to(expected, value.ndim), (name, value.sharding)
  batch = names['batch']['decoder_target_tokens']
  assert batch.sharding.is_equivalent_to(NamedSharding(mesh, P('data', None)), 2)
  assert {s.data.shape for s in batch.addressable_shards} == {(4, 16)}
  assert capsys.readouterr().out == f"{P('model', None)}\n"

  # The same step on one device, from an unsharded init with the same key.
  model, local = names['model'], names['host_local_batch']
  params = partitioning.unbox(jax.jit(model.init)(jax.random.key(0), local))['params']
  loss, grads = jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, local)[0]))(params)
  np.testing.assert_allclose(float(names['loss']), float(loss), rtol=1e-5)
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  for (path, ours), theirs in zip(flat, jax.tree.leaves(stepped)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_decoding_example_decodes_as_full_forward_passes_do():
  names = run_block(DECODING)
  model, params, prompts = names['model'], names['params'], names['prompts']
  out, greedy = names['out'], names['greedy']
  assert out.tokens.shape == (2, 32) and greedy.tokens.shape == (2, 8)
  assert np.isfinite(out.scores).all() and np.isfinite(names['scores']).all()
  again = model.predict(params, prompts, names['sampling'], rng=jax.random.key(0))
  np.testing.assert_array_equal(again.tokens, out.tokens)  # same rng, same tokens

  # The first prompt's greedy tokens and their log-probabilities, from one full forward pass.
  batch, length = names['batch'], int(greedy.lengths[0])
  logits = jax.jit(model.logits)(params, batch)[0]
  tokens = np.asarray(greedy.tokens[0, :length])
  np.testing.assert_array_equal(np.argmax(logits[4:4 + length], -1), tokens)
  token_scores = np.asarray(jax.jit(model.token_scores)(params, batch)[0], np.float64)
  np.testing.assert_allclose(token_scores[4:4 + length].sum(), float(greedy.scores[0]), rtol=1e-4)
  np.testing.assert_allclose(float(names['scores'][0]), token_scores.sum(), rtol=1e-5)


def test_kernel_example_runs():
  names = run_block(KERNELS)
  for name in ('out', 'local', 'bigbird'):
    assert names[name].shape == (2, 1000, 8, 64), name
  assert names['step'].shape == (2, 8, 64)
  assert all(jnp.isfinite(names[n].astype(jnp.float32)).all() for n in ('out', 'local', 'step'))
