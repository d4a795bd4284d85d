"""Our T5 models reproduce logits computed by Hugging Face transformers on the same weights."""

import jax
import numpy as np
import pytest

from efficientlm.checkpoints.hf_t5 import load_hf_t5
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.model import EncoderDecoderModel


@pytest.mark.parametrize('name,tied', [('t5_v1_1_tiny', False), ('t5_original_tiny', True)])
def test_logits_match_transformers(fixtures_dir, name, tied):
  directory = fixtures_dir / 'hf' / name
  cfg, params = load_hf_t5(directory, dtype='float32')
  assert cfg.logits_via_embedding == tied
  expected = np.load(directory / 'expected_logits.npz')
  model = EncoderDecoderModel(EncoderDecoder(cfg))
  logits = jax.jit(model.logits)(params, {'encoder_input_tokens': expected['encoder_input_tokens'],
                                 'decoder_input_tokens': expected['decoder_input_tokens']})
  np.testing.assert_allclose(logits, expected['logits'], rtol=1e-4, atol=1e-4)


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json'):
    load_hf_t5(tmp_path / 'nope')


def test_switch_checkpoint_is_rejected_with_a_reason(fixtures_dir):
  with pytest.raises(ValueError, match='not a T5 model'):
    load_hf_t5(fixtures_dir / 'hf' / 'switch_tiny')
