"""stdlib_code_lm on a small fake standard library: which files, the split by file, the bytes."""

import shutil

import numpy as np
import pytest
import seqio

from efficientlm.data import stdlib_code, tasks

_MODULES = [f'mod_{i}.py' for i in range(24)] + [f'pkg/sub_{i}.py' for i in range(12)] + [
    'pkg/__init__.py', 'pkg/deep/inner.py', 'encodings/utf_8.py']
_EXCLUDED = ['test/test_os.py', 'test/support/helper.py', 'pkg/tests/case.py',
             'idlelib/idle_test/t.py', 'site-packages/third/party.py', '__pycache__/x.py',
             'pkg/test_thing.py', 'notes.txt', 'pkg/data.pyc']


def _write(root, relative, index):
  path = root / relative
  path.parent.mkdir(parents=True, exist_ok=True)
  # Non-ASCII text so that bytes and characters differ (the vocabulary is bytes).
  path.write_text(f'# módulo {relative}\n' + f'x_{index} = {index} * 2\n' * (index % 7 + 1))


@pytest.fixture
def fake_stdlib(tmp_path):
  root = tmp_path / 'lib' / 'python3.x'
  for i, relative in enumerate(_MODULES + _EXCLUDED):
    _write(root, relative, i)
  return root


def test_lists_sources_without_tests_or_site_packages(fake_stdlib):
  assert stdlib_code.source_files(str(fake_stdlib)) == sorted(_MODULES)


def test_split_is_by_file_disjoint_and_deterministic(fake_stdlib, tmp_path):
  splits = stdlib_code.split_files(str(fake_stdlib), 0.3)
  train, validation = set(splits['train']), set(splits['validation'])
  assert train and validation and not train & validation
  assert train | validation == set(_MODULES)
  # The same relative paths elsewhere, plus one more file: the old files keep their split (the
  # split depends on each file's own path only, not on the root or the other files).
  copy = tmp_path / 'elsewhere'
  shutil.copytree(fake_stdlib, copy)
  _write(copy, 'pkg/new_module.py', 99)
  again = stdlib_code.split_files(str(copy), 0.3)
  assert set(again['validation']) - {'pkg/new_module.py'} == validation
  assert set(again['train']) - {'pkg/new_module.py'} == train
  # About 30% of the files: a binomial(39, 0.3) lies in [3, 21] with probability > 0.9999.
  assert 3 <= len(validation) <= 21


def test_task_yields_each_file_as_bytes_then_eos(fake_stdlib):
  name = stdlib_code.register_stdlib_code_lm('fake_stdlib_lm', root=str(fake_stdlib),
                                             validation_fraction=0.3)
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset({'targets': 16}, split='validation', shuffle=False)
  tokens = np.concatenate([ex['targets'] for ex in ds.as_numpy_iterator()])
  paths = stdlib_code.split_files(str(fake_stdlib), 0.3)['validation']
  # ByT5's ids, written out independently: byte b -> b + 3, EOS 1 after each document.
  expected = np.concatenate([np.append(np.frombuffer((fake_stdlib / p).read_bytes(), np.uint8)
                                       .astype(np.int64) + 3, 1) for p in paths])
  np.testing.assert_array_equal(tokens, expected)
  stats = stdlib_code.corpus_stats(str(fake_stdlib), 0.3)['validation']
  assert stats['tokens'] == len(expected) and stats['files'] == len(paths)
  assert stats['bytes_per_token'] == pytest.approx((len(expected) - len(paths)) / len(expected))


def test_the_real_standard_library_is_registered():
  assert tasks.register_stdlib_code_lm() == 'stdlib_code_lm'
  files = stdlib_code.source_files(stdlib_code.stdlib_root())
  assert 'os.py' in files and 'json/decoder.py' in files
  assert not any(p.startswith('test/') or '/site-packages/' in p for p in files)
  assert seqio.get_mixture_or_task('stdlib_code_lm').output_features['targets'].vocabulary \
      .vocab_size == stdlib_code.VOCAB_SIZE == 259


def test_bad_fraction_names_the_fix():
  with pytest.raises(ValueError, match='validation_fraction'):
    stdlib_code.register_stdlib_code_lm('x', validation_fraction=0.0)
