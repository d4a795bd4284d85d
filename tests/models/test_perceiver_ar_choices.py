"""Perceiver AR refuses batches with answer choices ([examples, choices, length]: its latents,
the last N slots of a row, need not hold a right-padded choice), naming the fix, in the loss and
in the scores of rank classification; the same rows without choices are accepted."""

import jax
import numpy as np
import pytest

from efficientlm.errors import ConfigError
from efficientlm.models.config import TransformerConfig
from efficientlm.models.model import CHOICE_IS_CORRECT
from efficientlm.models.perceiver_ar import PerceiverAr, PerceiverArConfig, PerceiverArModel

E, C, LENGTH, VOCAB = 2, 3, 8, 32
CFG = TransformerConfig(vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                        num_encoder_layers=0, num_decoder_layers=2, dtype='float32')


def _batches():
  targets = np.random.default_rng(0).integers(2, VOCAB, size=(E, C, LENGTH)).astype(np.int32)
  inputs = np.concatenate([np.zeros((E, C, 1), np.int32), targets[..., :-1]], axis=-1)
  choices = {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
             'decoder_loss_weights': np.ones((E, C, LENGTH), np.float32),
             CHOICE_IS_CORRECT: np.eye(C, dtype=np.int32)[[0, 2]]}
  rows = {k: v.reshape((E * C, LENGTH)) for k, v in choices.items() if k != CHOICE_IS_CORRECT}
  return choices, rows


@pytest.mark.parametrize('method', ['loss_fn', 'token_scores'])
def test_batches_with_answer_choices_are_refused_with_the_fix(method):
  model = PerceiverArModel(PerceiverAr(CFG, PerceiverArConfig(4)))
  choices, rows = _batches()
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), rows)['params'])
  jax.eval_shape(getattr(model, method), params, rows)  # the same rows without choices: fine
  with pytest.raises(ConfigError, match=r'answer choices.*stdlib_code_next_line.*use a '
                     r'decoder-only'):
    jax.eval_shape(getattr(model, method), params, choices)
