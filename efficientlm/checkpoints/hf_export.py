"""Our EncoderDecoder parameters -> a Hugging Face directory (config.json + model.safetensors) that
T5ForConditionalGeneration (dense models) or SwitchTransformersForConditionalGeneration (MoE
models) loads; hf_t5.load_hf reads it back.

The file holds what transformers 5 writes: `shared.weight`, `lm_head.weight` only for untied
logits, and for untied Switch models also `{encoder,decoder}.embed_tokens.weight` (transformers 5
then gives each stack its own table; ours are all the one token embedding). Tensors are float32
unless every floating-point leaf is bfloat16, then bfloat16.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from efficientlm import partitioning
from efficientlm.checkpoints import hf_switch, hf_t5
from efficientlm.checkpoints.hf_layout import tensors_from_params
from efficientlm.models.config import TransformerConfig
from efficientlm.models.layer_stacking import unstack_layers


def _check_encoder_decoder(cfg: TransformerConfig) -> None:
  problems = [
      ('num_encoder_layers', cfg.num_encoder_layers > 0, '0 (a decoder-only model)'),
      ('position_embedding', cfg.position_embedding == 'relative',
       f'{cfg.position_embedding!r} (T5 has relative position biases)'),
      ('num_kv_heads', cfg.num_kv_heads in (None, cfg.num_heads),
       f'{cfg.num_kv_heads} (T5 attention is multi-head)'),
      ('scale_attention_logits', not cfg.scale_attention_logits,
       'true (T5 folds the scale into the query weights)')]
  for field, ok, what in problems:
    if not ok:
      raise ValueError(f'{field} = {what}: not representable as a Hugging Face T5 model.')


def _has_scanned_layers(tree: Mapping) -> bool:
  return any(k == 'layers' or isinstance(v, Mapping) and _has_scanned_layers(v)
             for k, v in tree.items())


def _numpy_tree(params: Mapping) -> dict:
  """Unboxed, unscanned numpy tree (jax or numpy leaves, scanned or not)."""
  params = jax.tree.map(np.asarray, partitioning.unbox(params))
  return unstack_layers(params) if _has_scanned_layers(params) else params


def save_hf(directory: str | pathlib.Path, cfg: TransformerConfig, params: Mapping,
            expert_capacity: int | None = None) -> pathlib.Path:
  """Writes `params` of an EncoderDecoder with config `cfg` as a Hugging Face directory.

  MoE models become SwitchTransformers (see hf_switch.config_to_hf_switch for expert_capacity);
  anything HF cannot represent raises ValueError naming the config field.
  """
  _check_encoder_decoder(cfg)
  switch = cfg.moe is not None
  hf = hf_switch.config_to_hf_switch(cfg, expert_capacity) if switch else hf_t5.config_to_hf(cfg)
  params = _numpy_tree(params)
  floats = [x.dtype for x in jax.tree.leaves(params) if not np.issubdtype(x.dtype, np.integer)]
  bf16 = bool(floats) and all(d == ml_dtypes.bfloat16 for d in floats)
  dtype = ml_dtypes.bfloat16 if bf16 else np.float32
  hf['dtype'] = 'bfloat16' if bf16 else 'float32'
  tensors = tensors_from_params(params, cfg, switch)
  if switch and not cfg.logits_via_embedding:
    for stack in ('encoder', 'decoder'):
      tensors[f'{stack}.embed_tokens.weight'] = tensors['shared.weight']
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.astype(dtype) for k, v in tensors.items()}, str(directory / 'model.safetensors'),
            metadata={'format': 'pt'})
  (directory / 'config.json').write_text(json.dumps(hf, indent=2, sort_keys=True) + '\n')
  return directory
