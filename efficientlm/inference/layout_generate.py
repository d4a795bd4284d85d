"""Decoding through the partitioned inference layouts, for `--run_mode=infer`.

Pope et al. 2022 ("Efficiently Scaling Transformer Inference", sections 3 and 4) partition a
decoder-only model over an ('x', 'y', 'z') mesh with a feed-forward layout (1D/2D weight-
stationary, weight-gathered over x / xy / xyz), an attention layout (heads, or the batch split
over z / yz / xyz for multiquery) and the block kind; the best layout differs between prefill
(many tokens per weight read) and decode (one). `LayoutGenerator` runs `decoding.search`
(greedy, sampling, beam) over `PartitionedDecoder` prefill and decode steps:

  INFERENCE_LAYOUT = '2d/batch_xyz'                     both phases (block: the model's)
  INFERENCE_LAYOUT = {'prefill': 'wg_xyz', 'decode': '2d/batch_xyz'}
  INFERENCE_LAYOUT = 'auto'       perf_model.best_layout per phase, for this mesh, batch, length

Mesh: the run's devices (jax.devices() order) reshaped to INFERENCE_MESH = (X, Y, Z) by
partitioning.create_mesh (physical order on TPU); None factors the device count into three
near-equal sizes, smallest first (8 -> (2, 2, 2), 16 -> (2, 2, 4), 4 -> (1, 2, 2)).

Two layouts: each phase has its own decoder and its own copy of the weights, stored as its layout
stores them (so weight memory doubles), and the KV cache, [layers, B, S, K, D] in the same
global order under every layout (only query/out head chunks are permuted by some layouts, never
K/V), is resharded once between prefill and the first step (a sharding constraint; XLA inserts
the collectives). One layout: one copy, no reshard.

Deviations: the prompt is causal (prefix-LM models are refused); encoder-decoder models, MoE and
the other token mixers / residual structures are refused by name (the layouts implement dense
attention + dense MLP layers only). 'auto' predicts for the nominal hardware INFERENCE_HARDWARE
('auto': the local chip's spec, tpu_v4 where there is none, e.g. on CPU); `record` writes that
prediction beside the measured median decode step of the chosen layout (MODEL_DIR/
infer_layout.json): the predicted number is for the nominal chip, the measured one for this one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from efficientlm import partitioning
from efficientlm.errors import ConfigError
from efficientlm.inference import decoding, kv_cache, quantization
from efficientlm.inference import perf_model as pm
from efficientlm.inference import sweep, sweep_measure
from efficientlm.inference.layout_plan import LayerPlan
from efficientlm.inference.layout_spec import MESH_AXES, Layout
from efficientlm.inference.partitioned_decoder import PartitionedDecoder
from efficientlm.models.config import TransformerConfig
from efficientlm.models.model import BaseModel

PHASES = ('prefill', 'decode')
RECORD = 'infer_layout.json'
# TransformerConfig fields the layout code does not implement, with the value it needs.
PLAIN_LAYERS = {'num_encoder_layers': 0, 'moe': None, 'token_mixers': ('attention',),
                'attention_window': 0, 'evolving_attention': None, 'residual': 'standard',
                'block_recurrent': None, 'sparse_ffn': None, 'sparse_qkv': None, 'ia3': False}


def default_mesh_shape(num_devices: int) -> tuple[int, int, int]:
  """The device count as three near-equal factors, smallest first."""
  shape, n, p = [1, 1, 1], num_devices, 2
  factors = []
  while n > 1:
    while n % p == 0:
      factors.append(p)
      n //= p
    p += 1
  for f in sorted(factors, reverse=True):
    shape[shape.index(min(shape))] *= f
  return tuple(sorted(shape))


def layout_mesh(shape: tuple[int, ...] | None) -> jax.sharding.Mesh:
  devices = jax.devices()
  shape = default_mesh_shape(len(devices)) if shape is None else tuple(shape)
  if len(shape) != 3 or math.prod(shape) != len(devices):
    raise ConfigError(f'INFERENCE_MESH = {shape}: give three sizes (X, Y, Z) whose product is '
                      f'the {len(devices)} devices of this run, or None for '
                      f'{default_mesh_shape(len(devices))}.')
  return partitioning.create_mesh(shape, MESH_AXES, devices)


def check_model(model: BaseModel) -> TransformerConfig:
  """The model's config if the layouts can run it; else a ConfigError naming why."""
  if kv_cache.is_encoder_decoder(model):
    raise ConfigError('INFERENCE_LAYOUT: the partitioned layouts run decoder-only models; this '
                      'is an encoder-decoder model. Set INFERENCE_LAYOUT = None.')
  if getattr(model, 'prefix_lm', False):
    raise ConfigError('INFERENCE_LAYOUT: the partitioned layouts prefill causally; this model '
                      'is a prefix LM. Set INFERENCE_LAYOUT = None.')
  cfg = model.module.config
  for field, value in PLAIN_LAYERS.items():
    if getattr(cfg, field) != value:
      raise ConfigError(f'INFERENCE_LAYOUT: the partitioned layouts implement dense attention '
                        f'and MLP layers only; this model has {field} = {getattr(cfg, field)!r} '
                        f'(they need {value!r}). Set INFERENCE_LAYOUT = None.')
  return cfg


def _weight_dtype(cfg: TransformerConfig, int8: bool) -> str:
  return 'int8' if int8 else jnp.dtype(cfg.param_dtype).name


def _hardware(name: str) -> tuple[str, str]:
  """(nominal hardware, note)."""
  if name != 'auto':
    pm.get_hardware(name)  # names the known ones if unknown
    return name, 'given'
  local = sweep_measure.auto_hardware()
  if local is None:
    return 'tpu_v4', (f'no spec for {jax.devices()[0].device_kind}: predicted for tpu_v4; '
                      'measured times are of this device')
  return local, 'the local device'


def _runs(cfg, layout: Layout, mesh, batch: int) -> str:
  """'' if the layout code accepts the layout for this model, mesh and batch, else why not."""
  try:
    LayerPlan.create(cfg, layout, mesh).check_batch(batch)
  except ValueError as e:
    return str(e)
  return ''


@dataclasses.dataclass(frozen=True)
class Choice:
  """The layout of one phase and the analytical model's time for one pass of it."""

  phase: str
  layout: Layout
  batch: int  # sequences in the pass (prompts x beams for decode)
  length: int  # tokens per sequence in the pass
  context: int  # cached tokens read
  predicted_s: float | None
  chosen_by: str  # 'perf_model' or 'INFERENCE_LAYOUT'


def choose_layouts(cfg: TransformerConfig, layout: str | Mapping[str, str], mesh, *,
                   batch: int, beams: int, prompt_tokens: int, weight_dtype: str,
                   hardware: str) -> dict[str, Choice]:
  """{'prefill': Choice, 'decode': Choice} for INFERENCE_LAYOUT `layout` (see module doc)."""
  try:
    spec = pm.ModelSpec.from_transformer_config(cfg)
  except ValueError as e:
    raise ConfigError(f'INFERENCE_LAYOUT: {e}') from None
  shape = dict(mesh.shape)
  act_bytes = jnp.dtype(cfg.activation_dtype).itemsize
  passes = {'prefill': (batch, prompt_tokens, 0), 'decode': (batch * beams, 1, prompt_tokens)}
  if isinstance(layout, str):
    layout = {phase: layout for phase in PHASES}
  if not isinstance(layout, Mapping) or set(layout) != set(PHASES):
    raise ConfigError(f"INFERENCE_LAYOUT = {layout!r}: give None, 'auto', a layout name such as "
                      "'2d/batch_xyz/serial', or {'prefill': name, 'decode': name}.")
  choices = {}
  for phase in PHASES:
    rows, length, context = passes[phase]
    pass_args = dict(batch=rows, length=length if phase == 'prefill' else None,
                     context=context, weight_dtype=weight_dtype, act_bytes=act_bytes)
    if layout[phase] == 'auto':
      runnable = [c for c in pm.candidate_layouts(spec) if not _runs(cfg, c, mesh, rows)]
      if not runnable:
        raise ConfigError(f'INFERENCE_LAYOUT = auto: no layout runs this model on mesh {shape} '
                          f'with batch {rows}; change INFERENCE_MESH or BATCH_SIZE.')
      try:
        best, prediction = pm.best_layout(spec, hardware, shape, phase, candidates=runnable,
                                          **pass_args)
      except ValueError as e:  # none fits the nominal hardware's memory
        raise ConfigError(f'INFERENCE_LAYOUT = auto ({phase}) on {hardware}: {e}') from None
      choices[phase] = Choice(phase, best, rows, length, context, prediction.time, 'perf_model')
      continue
    try:
      if not isinstance(layout[phase], str) or layout[phase] == 'all':
        raise ValueError("name one layout, e.g. '2d/batch_xyz/serial', or 'auto'.")
      (parsed,) = sweep.parse_layouts(layout[phase], spec)
    except ValueError as e:
      raise ConfigError(f'INFERENCE_LAYOUT {layout[phase]!r} ({phase}): {e}') from None
    reason = _runs(cfg, parsed, mesh, rows)
    if reason:
      raise ConfigError(f'INFERENCE_LAYOUT {layout[phase]!r} ({phase}): {reason} Change '
                        'INFERENCE_LAYOUT, INFERENCE_MESH or BATCH_SIZE.')
    try:
      seconds = pm.predict(spec, hardware, shape, parsed, phase, **pass_args).time
    except ValueError:  # a layout the analytical model does not cover; it still runs
      seconds = None
    choices[phase] = Choice(phase, parsed, rows, length, context, seconds, 'INFERENCE_LAYOUT')
  return choices


@functools.partial(jax.jit, static_argnames=('prefill', 'decode', 'options', 'cache_length'))
def _generate(prefill: PartitionedDecoder, decode: PartitionedDecoder, prefill_params,
              decode_params, prompts, rng, options: decoding.DecodeOptions, cache_length: int):
  tokens, lengths = decoding.bos_prompt(prompts)
  cache = prefill.init_cache(prompts.shape[0], cache_length)
  logits, cache = prefill.prefill(prefill_params, cache, tokens, lengths)
  logits = decoding.last_logits(logits, lengths)
  if options.method == 'beam':  # beams share the prompt's cache ([layers, B, ...])
    k = options.num_beams
    cache = decoding.repeat_rows(cache, k, axis=1)
    logits, lengths = decoding.repeat_rows((logits, lengths), k)
  # The one reshard between two layouts (a no-op for one).
  cache = jax.lax.with_sharding_constraint(cache, decode.cache_sharding())

  def step(cache, tokens, positions):
    return decode.decode_step(decode_params, cache, tokens, positions)
  return decoding.search(step, logits, cache, lengths, options, rng, cache_batch_axis=1)


class LayoutGenerator:
  """`generate(prompts [B, P], rng) -> Decoded` through the chosen layouts (see module doc).
  Built before the checkpoint is read (so a bad layout stops the run at once); `place(params)`
  then stores the weights as each layout keeps them."""

  def __init__(self, model: BaseModel, layout: str | Mapping[str, str], *,
               options: decoding.DecodeOptions, batch: int, prompt_length: int,
               mesh_shape: tuple[int, ...] | None = None, hardware: str = 'auto',
               int8: bool = False):
    cfg = check_model(model)
    self.options, self.batch, self.int8 = options, batch, int8
    self.mesh = layout_mesh(mesh_shape)
    self.hardware, self.hardware_note = _hardware(hardware)
    self.prompt_tokens = prompt_length + 1  # BOS
    self.cache_length = self.prompt_tokens + options.max_decode_length
    beams = options.num_beams if options.method == 'beam' else 1
    self.choices = choose_layouts(cfg, layout, self.mesh, batch=batch, beams=beams,
                                  prompt_tokens=self.prompt_tokens,
                                  weight_dtype=_weight_dtype(cfg, int8), hardware=self.hardware)
    self.decoders, self.params = {}, {}
    for phase in PHASES:
      chosen = self.choices[phase].layout
      same = [p for p in self.decoders if self.decoders[p].layout == chosen]
      self.decoders[phase] = (self.decoders[same[0]] if same else
                              PartitionedDecoder(cfg, chosen, self.mesh))

  def place(self, params: Any) -> None:
    """Stores the model's params (float or quantize_tree'd) as each layout keeps them; one copy
    when both phases use the same layout."""
    prefill, decode = self.decoders['prefill'], self.decoders['decode']
    self.params['prefill'] = prefill.shard_params(params)
    self.params['decode'] = (self.params['prefill'] if decode is prefill else
                             decode.shard_params(params))
    copies = 1 if decode is prefill else 2
    logging.info('infer: layouts %s on mesh %s, %d weight copies of %d bytes',
                 {p: c.layout.name for p, c in self.choices.items()}, dict(self.mesh.shape),
                 copies, quantization.weight_bytes(self.params['decode']))

  def generate(self, prompts: np.ndarray, rng: jax.Array) -> decoding.Decoded:
    if prompts.shape != (self.batch, self.prompt_tokens - 1):
      raise ValueError(f'LayoutGenerator was built for prompts [{self.batch}, '
                       f'{self.prompt_tokens - 1}], got {prompts.shape}.')
    return _generate(self.decoders['prefill'], self.decoders['decode'], self.params['prefill'],
                     self.params['decode'], jnp.asarray(prompts, jnp.int32), rng, self.options,
                     self.cache_length)

  def time_decode_step(self, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one decode step (all layers, embedding and logits) of the decode
    layout, over a cache holding the prompt."""
    decoder, rows = self.decoders['decode'], self.choices['decode'].batch
    cache = decoder.init_cache(rows, self.cache_length)
    tokens = jnp.zeros((rows,), jnp.int32)
    positions = jnp.full((rows,), self.prompt_tokens, jnp.int32)
    times = []
    for i in range(warmup + repeats):
      start = time.perf_counter()
      logits, cache = decoder.decode_step(self.params['decode'], cache, tokens, positions)
      jax.block_until_ready(logits)
      if i >= warmup:
        times.append(time.perf_counter() - start)
    return float(np.median(times))

  def record(self, model_dir: str, repeats: int) -> dict:
    """Writes MODEL_DIR/infer_layout.json: per phase the layout, the analytical model's time for
    one pass and (decode, `repeats` > 0) the measured median step; logs it. Returns it."""
    device = jax.devices()[0]
    out = {'mesh': dict(self.mesh.shape), 'device': f'{device.platform}:{device.device_kind}',
           'hardware': self.hardware, 'hardware_note': self.hardware_note,
           'weight_dtype': _weight_dtype(self.decoders['decode'].config, self.int8),
           'cache_length': self.cache_length, 'decode_method': self.options.method,
           'phases': {}}
    for phase, c in self.choices.items():
      out['phases'][phase] = {'layout': c.layout.name, 'chosen_by': c.chosen_by,
                              'batch': c.batch, 'length': c.length, 'context': c.context,
                              'predicted_s': c.predicted_s}
    if repeats > 0:
      out['phases']['decode'].update(measured_step_s=self.time_decode_step(repeats),
                                     measured_repeats=repeats)
    path = pathlib.Path(model_dir) / RECORD
    path.write_text(json.dumps(out, indent=1) + '\n')
    for phase, row in out['phases'].items():
      measured = row.get('measured_step_s')
      print(f'infer: {phase} layout {row["layout"]} ({row["chosen_by"]}): predicted '
            f'{_ms(row["predicted_s"])} on {self.hardware}'
            + (f', measured {_ms(measured)} on {out["device"]}' if measured else ''), flush=True)
    return out


def _ms(seconds: float | None) -> str:
  return 'n/a' if seconds is None else f'{seconds * 1e3:.3g} ms'
