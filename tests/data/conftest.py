"""Fixtures for the data tests: the seqio test vocabulary bound through gin, and TFDS mock data."""

import pathlib

import gin
import pytest
import seqio

# seqio's wheel ships a 26-piece SentencePiece model (pad 0, EOS 1, unk 2).
SENTENCEPIECE_MODEL = str(pathlib.Path(seqio.__file__).parent / 'test_data' / 'sentencepiece' /
                          'sentencepiece.model')
EXTRA_IDS = 100
VOCAB_SIZE = 26 + EXTRA_IDS


@pytest.fixture
def test_vocabulary():
  """Binds the tasks' default vocabulary to the test model, as a run gin would."""
  gin.clear_config()
  gin.parse_config(['from __gin__ import dynamic_registration',
                    'from efficientlm.data import vocabularies',
                    f"vocabularies.default_vocabulary.path = '{SENTENCEPIECE_MODEL}'",
                    f'vocabularies.default_vocabulary.extra_ids = {EXTRA_IDS}'])
  yield
  gin.clear_config()


@pytest.fixture
def mock_tfds(test_vocabulary):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  del test_vocabulary
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    yield
