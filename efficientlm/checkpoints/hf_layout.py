"""What Hugging Face T5-family files (T5, T5.1.1, SwitchTransformers) and our parameter trees share:
one table of tensor names used in both directions, the config fields common to both models, and
reading a directory.

Layout facts: torch Linear weights are [out, in], our kernels [in, out]; HF's
`relative_attention_bias.weight` is [buckets, heads] and lives in layer 0 of each stack; neither
model scales attention logits (the scale is folded into the query weights). Switch names an MLP
`layer.{j}.mlp` where T5 says `layer.{j}.DenseReluDense`, and a sparse one holds
`mlp.router.classifier.weight` [E, d] and `mlp.experts.expert_{e}.{wi,wo}.weight`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import numpy as np

from efficientlm.models.config import TransformerConfig

# HF activation name -> ours, and back (gelu_new is the tanh approximation T5.1.1 uses).
ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu', 'gelu': 'gelu_exact',
               'relu': 'relu', 'silu': 'silu'}
HF_ACTIVATIONS = {'gelu': 'gelu_new', 'gelu_exact': 'gelu', 'relu': 'relu', 'silu': 'silu'}

COPY, LINEAR, EXPERTS = 'copy', 'linear', 'experts'  # how a tensor maps (see tensor_table)
_ATTENTION = (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))


def read_directory(directory: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, tensors by HF name) of a save_pretrained directory."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  for name in ('config.json', 'model.safetensors'):
    if not (directory / name).exists():
      raise FileNotFoundError(f'{directory / name} not found: expected a Hugging Face T5 '
                              'directory written by save_pretrained (safetensors).')
  hf = json.loads((directory / 'config.json').read_text())
  return hf, load_file(str(directory / 'model.safetensors'))


def common_config(hf: Mapping) -> dict:
  """TransformerConfig fields that T5 and Switch configs spell alike."""
  return dict(
      vocab_size=hf['vocab_size'], emb_dim=hf['d_model'], num_heads=hf['num_heads'],
      head_dim=hf['d_kv'], mlp_dim=hf['d_ff'], num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
      layer_norm_epsilon=hf.get('layer_norm_epsilon', 1e-6),
      relative_attention_num_buckets=hf.get('relative_attention_num_buckets', 32),
      relative_attention_max_distance=hf.get('relative_attention_max_distance', 128),
      dropout_rate=0.0)


def common_hf_config(cfg: TransformerConfig) -> dict:
  """The inverse of common_config, plus the token ids every T5 config carries."""
  return dict(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, num_heads=cfg.num_heads, d_kv=cfg.head_dim,
      d_ff=cfg.mlp_dim, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, layer_norm_epsilon=cfg.layer_norm_epsilon,
      relative_attention_num_buckets=cfg.relative_attention_num_buckets,
      relative_attention_max_distance=cfg.relative_attention_max_distance,
      dropout_rate=cfg.dropout_rate, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
      decoder_start_token_id=0, initializer_factor=1.0, use_cache=True)


def input_embedding(t: Mapping[str, np.ndarray], where: str) -> np.ndarray:
  """The one input embedding our EncoderDecoder has, from an HF file's tensors.

  Each HF stack embeds with its own `{encoder,decoder}.embed_tokens.weight` and only ties it to
  `shared.weight` when the file leaves it out (or, in transformers 5, when
  tie_word_embeddings is true and the values are equal). transformers 5 saves Switch models with
  tie_word_embeddings false as three independent tables, `shared.weight` then unused.
  """
  shared = t['shared.weight']
  enc = t.get('encoder.embed_tokens.weight', shared)
  dec = t.get('decoder.embed_tokens.weight', shared)
  if not np.array_equal(enc, dec):
    raise ValueError(
        f'{where}: encoder.embed_tokens.weight and decoder.embed_tokens.weight differ (each stack '
        'has its own input embedding, as transformers 5 saves Switch models with '
        'tie_word_embeddings false); our EncoderDecoder has one token_embedder for both.')
  return enc


def _mlp_names(cfg: TransformerConfig) -> list[str]:
  n = len(cfg.mlp_activations)
  return (['wi'] if n == 1 else [f'wi_{i}' for i in range(n)]) + ['wo']


Row = tuple[tuple[str, ...], tuple[str, ...], str]


def tensor_table(cfg: TransformerConfig, switch: bool) -> list[Row]:
  """(our path, HF names, kind) for every parameter of an unscanned EncoderDecoder.

  kind: COPY (same array), LINEAR (transposed) or EXPERTS (our [E, in, out] is the HF weights of
  experts 0..E-1, each transposed).
  """
  rows = [(('token_embedder', 'embedding'), ('shared.weight',), COPY)]
  stacks = (('encoder', cfg.num_encoder_layers,
             (('pre_attention_layer_norm', 'attention', 'SelfAttention'),)),
            ('decoder', cfg.num_decoder_layers,
             (('pre_self_attention_layer_norm', 'self_attention', 'SelfAttention'),
              ('pre_cross_attention_layer_norm', 'encoder_decoder_attention',
               'EncDecAttention'))))
  for stack, num_layers, attentions in stacks:
    sparse = cfg.moe.sparse_layers(num_layers, stack) if cfg.moe else (False,) * num_layers
    for i in range(num_layers):
      ours, hf = (stack, f'layers_{i}'), f'{stack}.block.{i}.layer'
      for j, (norm, attention, theirs) in enumerate(attentions):
        rows.append((ours + (norm, 'scale'), (f'{hf}.{j}.layer_norm.weight',), COPY))
        rows += [(ours + (attention, a, 'kernel'), (f'{hf}.{j}.{theirs}.{b}.weight',), LINEAR)
                 for a, b in _ATTENTION]
      j = len(attentions)
      rows.append((ours + ('pre_mlp_layer_norm', 'scale'), (f'{hf}.{j}.layer_norm.weight',), COPY))
      mlp = f'{hf}.{j}.mlp' if switch else f'{hf}.{j}.DenseReluDense'
      if sparse[i]:
        rows.append((ours + ('mlp', 'router', 'router_weights', 'w', 'kernel'),
                     (f'{mlp}.router.classifier.weight',), LINEAR))
        rows += [(ours + ('mlp', 'expert', w, 'kernel'), tuple(
            f'{mlp}.experts.expert_{e}.{w}.weight' for e in range(cfg.moe.num_experts)), EXPERTS)
                 for w in _mlp_names(cfg)]
      else:
        rows += [(ours + ('mlp', w, 'kernel'), (f'{mlp}.{w}.weight',), LINEAR)
                 for w in _mlp_names(cfg)]
    bias = f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
    rows.append(((stack, 'relpos_bias', 'rel_embedding'), (bias,), LINEAR))
    rows.append(((stack, f'{stack}_norm', 'scale'), (f'{stack}.final_layer_norm.weight',), COPY))
  if not cfg.logits_via_embedding:
    rows.append((('decoder', 'logits_dense', 'kernel'), ('lm_head.weight',), LINEAR))
  return rows


def params_from_tensors(t: Mapping[str, np.ndarray], cfg: TransformerConfig, switch: bool,
                        where: str) -> dict:
  """Our unscanned parameter tree (numpy) from HF tensors by name."""
  params: dict = {}
  for path, names, kind in tensor_table(cfg, switch):
    missing = [n for n in names if n not in t]
    if missing:
      raise ValueError(f'{where}: tensor {missing[0]} is missing for this config.')
    if kind == EXPERTS:
      value = np.stack([t[n].T for n in names])
    else:
      value = t[names[0]].T if kind == LINEAR else t[names[0]]
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  embedding = input_embedding(t, where)
  if cfg.logits_via_embedding and not np.array_equal(embedding, t['shared.weight']):
    raise ValueError(f'{where}: the stacks embed with {{encoder,decoder}}.embed_tokens.weight but '
                     'the tied logits use a different shared.weight; our model ties both.')
  params['token_embedder']['embedding'] = embedding
  return params


def tensors_from_params(params: Mapping, cfg: TransformerConfig, switch: bool
                        ) -> dict[str, np.ndarray]:
  """HF tensors by name from our unscanned parameter tree (numpy leaves)."""
  out = {}
  for path, names, kind in tensor_table(cfg, switch):
    value = params
    for depth, key in enumerate(path):
      if key not in value:
        raise ValueError(f'params has no {"/".join(path[:depth + 1])} (needed for '
                         f'{names[0]}): do the parameters belong to this config?')
      value = value[key]
    if kind == EXPERTS:
      out.update({n: value[e].T for e, n in enumerate(names)})
    else:
      out[names[0]] = value.T if kind == LINEAR else value
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
