"""Decoder-only language model: causal, or prefix-LM through `decoder_causal_attention`."""

from __future__ import annotations

import flax.linen as nn

from efficientlm.models.config import TransformerConfig
from efficientlm.models.stacks import Decoder, token_embedder


class DecoderOnly(nn.Module):
  config: TransformerConfig

  def setup(self):
    self.token_embedder = token_embedder(self.config)
    self.decoder = Decoder(self.config, self.token_embedder, cross_attention=False)

  def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
               decoder_positions=None, decoder_causal_attention=None, enable_dropout=False,
               decode=None, cache_length=None):
    """Returns logits [batch, length, vocab].

    `decoder_causal_attention` is 1 on prefix (input) positions, which then attend to each
    other bidirectionally (prefix LM); None is a plain causal LM. `decode` and `cache_length`:
    KV-cache decoding (see stacks.Decoder).
    """
    return self.decoder(decoder_input_tokens, decoder_target_tokens,
                        segment_ids=decoder_segment_ids, positions=decoder_positions,
                        causal_attention=decoder_causal_attention,
                        deterministic=not enable_dropout, decode=decode,
                        cache_length=cache_length)
