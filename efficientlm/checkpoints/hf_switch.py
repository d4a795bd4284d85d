"""Hugging Face SwitchTransformers configs <-> ours (the tensors map through hf_layout).

What transformers 5.23 (modeling_switch_transformers.py) computes:
- A stack of L layers with S = num_sparse_{encoder,decoder}_layers has step = L // S (L when S is
  0) and layer i is sparse iff step == 1 or i % step == 1; step 0 (S > L) gives none. The
  `{encoder,decoder}_sparse_step` in config.json are derived and recomputed on load. (S = 0 makes
  layer 1 sparse despite HF's comment that it creates none.)
- Top-1 tokens-choose routing: probabilities are a float32 softmax of `router.classifier.weight`
  [E, d] (no bias unless router_bias); a sparse MLP outputs p_top1 * expert(x), experts being
  non-gated `wi`/`wo` MLPs with the dense layers' activation and d_ff.
- Capacity: `expert_capacity` tokens per expert and sequence, in position order. A dropped
  token's MLP output is zero in 5.23 (the residual carries it), as in T5X and our dropping layer;
  some 4.x releases instead passed its hidden state through, times its probability.
- tie_word_embeddings true: logits use shared.weight, the decoder output scaled by d_model**-0.5;
  false: a separate lm_head, no scaling, and independent {encoder,decoder}.embed_tokens tables.

Our side: 'dropping' dispatch with one routing group per sequence, min_expert_capacity =
expert_capacity and capacity factors so small that the minimum always wins, which is HF's capacity
exactly at any length ('dropless' would only agree while nothing overflows).
"""

from __future__ import annotations

from collections.abc import Mapping

from efficientlm.checkpoints.hf_layout import (ACTIVATIONS, HF_ACTIVATIONS, common_config,
                                               common_hf_config)
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.models.config import TransformerConfig

# round(factor * tokens / experts) stays below min_expert_capacity for any sequence length.
CAPACITY_FACTOR = 1e-9


def hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[bool, ...]:
  """Which of a stack's layers SwitchTransformers makes sparse."""
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  return tuple(step > 0 and (step == 1 or i % step == 1) for i in range(num_layers))


def _layout(enc: tuple[bool, ...], dec: tuple[bool, ...]) -> dict:
  """MoeConfig placement fields for these patterns: 'all', 'every' 2, else 'explicit'."""
  if all(enc) and all(dec):
    return {'layout': 'all'}
  if all(p == tuple(i % 2 == 1 for i in range(len(p))) for p in (enc, dec)):
    return {'layout': 'every', 'period': 2}
  return {'layout': 'explicit', 'encoder_layers': tuple(i for i, s in enumerate(enc) if s),
          'decoder_layers': tuple(i for i, s in enumerate(dec) if s)}


def config_from_hf_switch(hf: Mapping, has_lm_head: bool, where: str = 'config.json',
                          **overrides) -> TransformerConfig:
  """Our config for an HF SwitchTransformers config. `has_lm_head`: the file has lm_head.weight."""
  if hf.get('router_bias', False):
    raise ValueError(f'{where}: router_bias true is not supported (our routers have no bias).')
  if hf.get('router_dtype', 'float32') != 'float32':
    raise ValueError(f'{where}: router_dtype {hf["router_dtype"]!r} is not supported (our routers '
                     'compute in float32).')
  act = hf.get('dense_act_fn', 'relu')
  if act not in ACTIVATIONS:
    raise ValueError(f'{where}: dense_act_fn {act!r} is not supported; supported: '
                     f'{sorted(ACTIVATIONS)}.')
  tie = hf.get('tie_word_embeddings', True)
  if tie == has_lm_head:
    raise ValueError(
        f'{where}: tie_word_embeddings is {str(tie).lower()} but lm_head.weight is '
        f'{"present" if has_lm_head else "missing"}: transformers would '
        f'{"scale untied logits" if tie else "initialize lm_head at random"}.')
  common = common_config(hf)
  enc = hf_sparse_layers(common['num_encoder_layers'], hf['num_sparse_encoder_layers'])
  dec = hf_sparse_layers(common['num_decoder_layers'], hf['num_sparse_decoder_layers'])
  moe = MoeConfig(hf['num_experts'], **_layout(enc, dec), min_expert_capacity=hf['expert_capacity'],
                  train_capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                  router_jitter=hf.get('router_jitter_noise', 0.0))
  kwargs = dict(common, mlp_activations=(ACTIVATIONS[act],), logits_via_embedding=tie,
                scale_tied_logits=tie, moe=moe)
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)


def _num_sparse(pattern: tuple[bool, ...], stack: str, layout: str) -> int:
  """An S for which HF's rule gives `pattern` (the count of sparse layers when that works)."""
  for s in (sum(pattern), *range(1, len(pattern) + 2)):
    if s > 0 and hf_sparse_layers(len(pattern), s) == pattern:
      return s
  sparse = [i for i, s in enumerate(pattern) if s]
  raise ValueError(f'moe.layout = {layout!r}: its sparse {stack} layers {sparse} of '
                   f'{len(pattern)} are not a SwitchTransformers pattern (layer i sparse iff '
                   'i % step == 1, or all).')


def config_to_hf_switch(cfg: TransformerConfig, expert_capacity: int | None = None) -> dict:
  """The SwitchTransformers config.json for our MoE EncoderDecoder config.

  expert_capacity: default moe.min_expert_capacity. HF's capacity per sequence is fixed while ours
  is max(round(factor * length / E), min_expert_capacity), so they agree when the minimum wins
  or no expert overflows; pass one at least the sequence length for a dropless model.
  """
  moe, act = cfg.moe, cfg.mlp_activations
  problems = [
      ('moe.router', moe.router == 'tokens_choose', f'{moe.router!r} (Switch: tokens_choose)'),
      ('moe.num_selected_experts', moe.num_selected_experts == 1,
       f'{moe.num_selected_experts} (Switch routes top-1)'),
      ('moe.renormalize_gates', not moe.renormalize_gates, 'true (Switch scales by p_top1)'),
      ('mlp_activations', len(act) == 1 and act[0] in HF_ACTIVATIONS,
       f'{act} (Switch experts are non-gated, one of {sorted(HF_ACTIVATIONS)})'),
      ('moe.expert_mlp_dim', moe.expert_mlp_dim in (None, cfg.mlp_dim),
       f'{moe.expert_mlp_dim} != mlp_dim {cfg.mlp_dim} (Switch has one d_ff)'),
      ('scale_tied_logits', not cfg.logits_via_embedding or cfg.scale_tied_logits,
       'false with tied logits (Switch scales tied logits)')]
  for field, ok, what in problems:
    if not ok:
      raise ValueError(f'{field} = {what}: not representable as SwitchTransformers.')
  enc, dec = (_num_sparse(moe.sparse_layers(n, stack), stack, moe.layout) for n, stack in
              ((cfg.num_encoder_layers, 'encoder'), (cfg.num_decoder_layers, 'decoder')))
  if expert_capacity is None:
    expert_capacity = moe.min_expert_capacity
  return dict(
      common_hf_config(cfg), model_type='switch_transformers',
      architectures=['SwitchTransformersForConditionalGeneration'], num_experts=moe.num_experts,
      expert_capacity=expert_capacity, num_sparse_encoder_layers=enc,
      num_sparse_decoder_layers=dec, encoder_sparse_step=cfg.num_encoder_layers // enc,
      decoder_sparse_step=cfg.num_decoder_layers // dec, router_bias=False,
      router_dtype='float32', router_jitter_noise=moe.router_jitter,
      router_ignore_padding_tokens=False, dense_act_fn=HF_ACTIVATIONS[act[0]],
      tie_word_embeddings=cfg.logits_via_embedding, add_router_probs=False)
