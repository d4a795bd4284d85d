"""The trainer's tokens and FLOPs per step (its tokens/s and MFU) on batches with answer choices
[examples, choices, length] equal those of the flattened [examples * choices, length] batch that
the network runs, and the hand-checked metrics.flops_per_example times the rows."""

import jax
import numpy as np
import pytest

from efficientlm.models.config import TransformerConfig
from efficientlm.models.decoder_only import DecoderOnly
from efficientlm.models.encoder_decoder import EncoderDecoder
from efficientlm.models.model import CHOICE_IS_CORRECT, DecoderOnlyModel, EncoderDecoderModel
from efficientlm.training import metrics
from efficientlm.training.trainer import step_work

SMALL = dict(vocab_size=10, emb_dim=4, num_heads=2, head_dim=2, mlp_dim=8)
E, C, INPUTS, TARGETS = 3, 4, 5, 7


def _spec(shapes):
  return {k: jax.ShapeDtypeStruct(s, np.int32) for k, s in shapes.items()}


@pytest.mark.parametrize('encoder_decoder', [False, True])
def test_choices_batch_counts_every_row(encoder_decoder):
  if encoder_decoder:
    cfg = TransformerConfig(**SMALL, num_encoder_layers=1, num_decoder_layers=1)
    model = EncoderDecoderModel(EncoderDecoder(cfg))
    lengths = {'inputs': INPUTS, 'targets': TARGETS}
  else:
    cfg = TransformerConfig(**SMALL, num_encoder_layers=0, num_decoder_layers=2)
    model = DecoderOnlyModel(DecoderOnly(cfg))
    lengths = {'targets': TARGETS}
  features = {'decoder_target_tokens': TARGETS, 'decoder_input_tokens': TARGETS}
  if encoder_decoder:
    features['encoder_input_tokens'] = INPUTS
  choices = _spec({k: (E, C, n) for k, n in features.items()} | {CHOICE_IS_CORRECT: (E, C)})
  flat = _spec({k: (E * C, n) for k, n in features.items()})
  tokens, flops = step_work(model, choices)
  assert (tokens, flops) == step_work(model, flat)
  assert tokens == E * C * TARGETS
  assert flops == E * C * metrics.flops_per_example(cfg, lengths, encoder_decoder)
