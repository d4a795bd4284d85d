"""Hugging Face T5 / T5.1.1 checkpoints (config.json + model.safetensors) -> our parameters.

Name and layout facts: torch Linear weights are [out, in], our kernels [in, out]; HF's
`relative_attention_bias.weight` is [buckets, heads] and lives in layer 0 of each stack; HF T5
does not scale attention logits either (the scale is folded into the query weights).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np

from efficientlm.models.config import TransformerConfig

_ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact',
                'relu': 'relu', 'silu': 'silu'}


def config_from_hf(hf: Mapping, has_lm_head: bool, **overrides) -> TransformerConfig:
  """Our config for an HF T5 config. `has_lm_head`: the file holds untied output weights.

  transformers 5 writes `tie_word_embeddings: true` into every T5 config, so whether logits are
  tied is read from the weights present, and the output scaling from `scale_decoder_outputs`
  (older configs: scaling iff tied).
  """
  act = hf.get('dense_act_fn') or hf['feed_forward_proj'].split('-')[-1]
  if act not in _ACTIVATIONS:
    raise ValueError(f'Unsupported HF T5 activation {act!r}; supported: {sorted(_ACTIVATIONS)}.')
  gated = hf.get('is_gated_act', hf['feed_forward_proj'].startswith('gated-'))
  kwargs = dict(
      vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
      head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      mlp_activations=(_ACTIVATIONS[act], 'linear') if gated else (_ACTIVATIONS[act],),
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      logits_via_embedding=not has_lm_head,
      scale_tied_logits=hf.get('scale_decoder_outputs', not has_lm_head),
      dropout_rate=0.0)
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)


def _attention(t: Mapping[str, np.ndarray], prefix: str) -> dict:
  return {ours: {'kernel': t[f'{prefix}.{theirs}.weight'].T}
          for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))}


def _mlp(t: Mapping[str, np.ndarray], prefix: str, cfg: TransformerConfig) -> dict:
  names = ['wi'] if len(cfg.mlp_activations) == 1 else [
      f'wi_{i}' for i in range(len(cfg.mlp_activations))]
  return {n: {'kernel': t[f'{prefix}.DenseReluDense.{n}.weight'].T} for n in names + ['wo']}


def params_from_hf(t: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict:
  """Our unscanned parameter tree from HF tensors (numpy, by HF name)."""

  def norm(name):
    return {'scale': t[name]}

  enc, dec = {}, {}
  for i in range(cfg.num_encoder_layers):
    p = f'encoder.block.{i}.layer'
    enc[f'layers_{i}'] = {
        'pre_attention_layer_norm': norm(f'{p}.0.layer_norm.weight'),
        'attention': _attention(t, f'{p}.0.SelfAttention'),
        'pre_mlp_layer_norm': norm(f'{p}.1.layer_norm.weight'),
        'mlp': _mlp(t, f'{p}.1', cfg)}
  for i in range(cfg.num_decoder_layers):
    p = f'decoder.block.{i}.layer'
    dec[f'layers_{i}'] = {
        'pre_self_attention_layer_norm': norm(f'{p}.0.layer_norm.weight'),
        'self_attention': _attention(t, f'{p}.0.SelfAttention'),
        'pre_cross_attention_layer_norm': norm(f'{p}.1.layer_norm.weight'),
        'encoder_decoder_attention': _attention(t, f'{p}.1.EncDecAttention'),
        'pre_mlp_layer_norm': norm(f'{p}.2.layer_norm.weight'),
        'mlp': _mlp(t, f'{p}.2', cfg)}
  for stack, tree in (('encoder', enc), ('decoder', dec)):
    tree['relpos_bias'] = {'rel_embedding': t[
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'].T}
  enc['encoder_norm'] = norm('encoder.final_layer_norm.weight')
  dec['decoder_norm'] = norm('decoder.final_layer_norm.weight')
  if not cfg.logits_via_embedding:
    dec['logits_dense'] = {'kernel': t['lm_head.weight'].T}
  return {'token_embedder': {'embedding': t['shared.weight']}, 'encoder': enc, 'decoder': dec}


def load_hf_t5(directory: str | pathlib.Path, **config_overrides
               ) -> tuple[TransformerConfig, dict]:
  """Reads an HF T5 directory; returns (config, parameters as numpy arrays)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  for name in ('config.json', 'model.safetensors'):
    if not (directory / name).exists():
      raise FileNotFoundError(f'{directory / name} not found: expected a Hugging Face T5 '
                              'directory written by save_pretrained (safetensors).')
  hf = json.loads((directory / 'config.json').read_text())
  if hf.get('model_type') != 't5':
    raise ValueError(f'{directory}: model_type {hf.get("model_type")!r} is not a T5 model.')
  tensors = load_file(str(directory / 'model.safetensors'))
  cfg = config_from_hf(hf, 'lm_head.weight' in tensors, **config_overrides)
  try:
    params = params_from_hf(tensors, cfg)
  except KeyError as e:
    raise ValueError(f'{directory}: tensor {e.args[0]} is missing for this T5 config.') from e
  return cfg, params
