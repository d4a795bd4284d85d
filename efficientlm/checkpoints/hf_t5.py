"""Hugging Face T5-family directories (config.json + model.safetensors) -> our parameters:
T5 and T5.1.1 here, SwitchTransformers' config in hf_switch.py, the tensor names in hf_layout.py.

`load_hf` reads either model_type; `load_hf_t5` only T5.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import numpy as np

from efficientlm.checkpoints import hf_switch
from efficientlm.checkpoints.hf_layout import (ACTIVATIONS, HF_ACTIVATIONS, common_config,
                                               common_hf_config, params_from_tensors,
                                               read_directory)
from efficientlm.models.config import TransformerConfig

MODEL_TYPES = ('t5', 'switch_transformers')


def config_from_hf(hf: Mapping, has_lm_head: bool, where: str = 'config.json',
                   **overrides) -> TransformerConfig:
  """Our config for an HF T5 config. `has_lm_head`: the file holds untied output weights.

  transformers derives the activation from `feed_forward_proj` ('gated-gelu' means gelu_new)
  whatever `dense_act_fn` says. transformers 5 writes `tie_word_embeddings: true` into every T5
  config and ties lm_head only when the file lacks it, so tying is read from the weights; the
  output scaling is `scale_decoder_outputs` (older configs: tie_word_embeddings is not false).
  """
  proj = hf.get('feed_forward_proj', 'relu')
  gated = proj.startswith('gated-')
  act = 'gelu_new' if proj == 'gated-gelu' else proj.split('-')[-1]
  if act not in ACTIVATIONS:
    raise ValueError(f'{where}: unsupported HF T5 activation {act!r} (feed_forward_proj '
                     f'{proj!r}); supported: {sorted(ACTIVATIONS)}.')
  scale = hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings') is not False)
  if has_lm_head and scale:
    raise ValueError(f'{where}: scale_decoder_outputs with an untied lm_head.weight is not '
                     'supported (our models scale tied logits only).')
  kwargs = dict(common_config(hf),
                mlp_activations=(ACTIVATIONS[act], 'linear') if gated else (ACTIVATIONS[act],),
                logits_via_embedding=not has_lm_head, scale_tied_logits=scale)
  kwargs.update(overrides)
  return TransformerConfig(**kwargs)


def config_to_hf(cfg: TransformerConfig) -> dict:
  """The T5 config.json for our dense EncoderDecoder config (T5ForConditionalGeneration)."""
  act = cfg.mlp_activations
  gated = len(act) == 2
  if (len(act) not in (1, 2) or act[0] not in HF_ACTIVATIONS or gated and act[1] != 'linear'
      or gated and act[0] == 'gelu_exact'):  # T5Config turns 'gated-gelu' into gelu_new
    raise ValueError(f'mlp_activations = {act}: not representable as T5 (one activation, or a '
                     f"gated ('gelu' | 'relu' | 'silu', 'linear') pair).")
  hf_act = HF_ACTIVATIONS[act[0]]
  proj = ('gated-gelu' if hf_act == 'gelu_new' else f'gated-{hf_act}') if gated else hf_act
  tied = cfg.logits_via_embedding
  return dict(common_hf_config(cfg), model_type='t5', architectures=['T5ForConditionalGeneration'],
              feed_forward_proj=proj, dense_act_fn=hf_act, is_gated_act=gated,
              classifier_dropout=0.0, tie_word_embeddings=tied,
              scale_decoder_outputs=tied and cfg.scale_tied_logits)


def params_from_hf(t: Mapping[str, np.ndarray], cfg: TransformerConfig) -> dict:
  """Our unscanned parameter tree from HF T5 tensors (numpy, by HF name)."""
  return params_from_tensors(t, cfg, switch=False, where='HF T5 tensors')


def from_hf_tensors(hf: Mapping, tensors: Mapping[str, np.ndarray], where: str = 'HF model',
                    **config_overrides) -> tuple[TransformerConfig, dict]:
  """(config, parameters) for a T5 or SwitchTransformers config and its tensors by HF name."""
  model_type = hf.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(f'{where}: model_type {model_type!r} is not supported; expected one of '
                     f'{MODEL_TYPES}.')
  switch = model_type == 'switch_transformers'
  to_config = hf_switch.config_from_hf_switch if switch else config_from_hf
  try:
    cfg = to_config(hf, 'lm_head.weight' in tensors, where, **config_overrides)
  except KeyError as e:
    raise ValueError(f'{where}: config.json has no field {e.args[0]!r}.') from e
  return cfg, params_from_tensors(tensors, cfg, switch, where)


def load_hf(directory: str | pathlib.Path, **config_overrides) -> tuple[TransformerConfig, dict]:
  """Reads an HF T5 or SwitchTransformers directory; returns (config, numpy parameters)."""
  directory = pathlib.Path(directory)
  hf, tensors = read_directory(directory)
  return from_hf_tensors(hf, tensors, str(directory), **config_overrides)


def load_hf_t5(directory: str | pathlib.Path, **config_overrides
               ) -> tuple[TransformerConfig, dict]:
  """Reads an HF T5 directory; returns (config, parameters as numpy arrays)."""
  directory = pathlib.Path(directory)
  hf, tensors = read_directory(directory)
  if hf.get('model_type') != 't5':
    raise ValueError(f'{directory}: model_type {hf.get("model_type")!r} is not a T5 model.')
  return from_hf_tensors(hf, tensors, str(directory), **config_overrides)
