"""A T5 encoder-decoder TransformerConfig read off a checkpoint's array shapes, for converting a
T5X or efficientlm checkpoint without its gin (T5X checkpoints carry no model config).

What shapes cannot tell is taken from T5.1.1 conventions and reported: the activation of a gated
MLP is GELU (T5.1.1; a ReLU-gated model needs its gin), an ungated one ReLU (original T5),
tied logits are scaled by d**-0.5 (original T5), MoE routing is top-1.
"""

from __future__ import annotations

import re

from efficientlm.checkpoints.layer_names import canonical_index
from efficientlm.checkpoints.source import Source
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.models.config import TransformerConfig

_LAYER = re.compile(r'^(encoder|decoder)/layers_(\d+)/')


def infer_t5_config(source: Source, **overrides) -> TransformerConfig:
  index = canonical_index({k: v.shape for k, v in source.leaves.items()})
  shapes = {name: source.leaves[stored].shape[0 if b is None else 1:]
            for name, (stored, b) in index.items()}
  needed = ('token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
            'encoder/layers_0/attention/query/kernel')
  missing = [n for n in needed if n not in shapes]
  if missing:
    raise ValueError(f'{source.describe()} does not look like a T5 encoder-decoder (no '
                     f'{missing}); give the model gin (--gin_file) instead.')
  vocab, emb = shapes['token_embedder/embedding']
  heads, buckets = shapes['encoder/relpos_bias/rel_embedding']
  layers = {'encoder': set(), 'decoder': set()}
  sparse = {'encoder': [], 'decoder': []}
  experts = expert_mlp = None
  for name, shape in shapes.items():
    match = _LAYER.match(name)
    if match:
      layers[match.group(1)].add(int(match.group(2)))
      if name.endswith('/mlp/expert/wo/kernel'):
        sparse[match.group(1)].append(int(match.group(2)))
        experts, expert_mlp = shape[0], shape[1]
  dense_mlp = next((shapes[f'encoder/layers_{i}/mlp/{w}/kernel'][1]
                    for i in sorted(layers['encoder']) for w in ('wi_0', 'wi')
                    if f'encoder/layers_{i}/mlp/{w}/kernel' in shapes), expert_mlp)
  gated = any(n.endswith('/wi_0/kernel') for n in shapes)
  moe = None
  if experts:
    moe = MoeConfig(experts, expert_mlp_dim=expert_mlp if expert_mlp != dense_mlp else None,
                    layout='explicit', encoder_layers=tuple(sorted(sparse['encoder'])),
                    decoder_layers=tuple(sorted(sparse['decoder'])))
  tied = 'decoder/logits_dense/kernel' not in shapes
  head_dim = shapes['encoder/layers_0/attention/query/kernel'][1] // heads
  kv_heads = shapes.get('encoder/layers_0/attention/key/kernel', (0, heads * head_dim))[1]
  kv_heads //= head_dim
  kwargs = dict(
      vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=head_dim,
      num_kv_heads=None if kv_heads == heads else kv_heads,
      mlp_dim=dense_mlp, num_encoder_layers=len(layers['encoder']),
      num_decoder_layers=len(layers['decoder']),
      mlp_activations=('gelu', 'linear') if gated else ('relu',),
      relative_attention_num_buckets=buckets, logits_via_embedding=tied,
      scale_tied_logits=tied, moe=moe, dtype='float32')
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)
