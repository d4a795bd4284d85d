"""T5.1.1 encoder-decoder. Unscanned parameter names are T5X's exactly."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from efficientlm.layers import masks
from efficientlm.models.config import TransformerConfig
from efficientlm.models.stacks import Decoder, Encoder, token_embedder


class EncoderDecoder(nn.Module):
  config: TransformerConfig

  def setup(self):
    self.token_embedder = token_embedder(self.config)
    self.encoder = Encoder(self.config, self.token_embedder)
    self.decoder = Decoder(self.config, self.token_embedder, cross_attention=True)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
             enable_dropout=False):
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, encoder_segment_ids=None, decoder_segment_ids=None,
             decoder_positions=None, enable_dropout=False, decode=None, cache_length=None):
    """Decoder logits given the encoder output; `decode`, `cache_length`: KV-cache decoding (see
    stacks.Decoder; at 'step', `encoded` may be None: cross-attention reads its cache)."""
    if decoder_target_tokens is None:  # no targets: every decoder position is real
      decoder_valid = jnp.ones(decoder_input_tokens.shape, bool)
    else:
      decoder_valid = decoder_target_tokens > 0
    cross_mask = masks.combine_masks(
        masks.make_attention_mask(decoder_valid, encoder_input_tokens > 0),
        None if decoder_segment_ids is None or encoder_segment_ids is None else
        masks.make_segment_mask(decoder_segment_ids, encoder_segment_ids))
    return self.decoder(decoder_input_tokens, decoder_target_tokens, encoded, cross_mask,
                        decoder_segment_ids, decoder_positions,
                        deterministic=not enable_dropout, decode=decode,
                        cache_length=cache_length)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, enable_dropout=False):
    """Returns logits [batch, decoder_length, vocab]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                       decoder_positions, enable_dropout)
