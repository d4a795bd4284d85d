"""Which kernels a pruning run touches, in which order, and in which model layout.

Units are the transformer layers, in the order the forward pass reaches them: the encoder's
`layers_0 ... layers_{n-1}`, then the decoder's (T5), then the output projection
`decoder/logits_dense` when INCLUDE_LOGITS is set. Each unit's kernels are pruned together from
one Hessian capture with the units before it already pruned (SparseGPT's sequential scheme,
section 3 / Algorithm 1 of Frantar & Alistarh 2023, applied per layer as the authors' code does).
Kinds: 'attention' (every linear layer of the layer's token mixers: self- and cross-attention
query/key/value/out, or another mixer's projections), 'mlp' (wi*, wo), 'experts' (MoE expert
kernels, pruned per expert); never the MoE router, the embeddings, norms or position biases.

The pruning runs on the unscanned layout without remat (`work_model`), where every layer's
linear inputs can be recorded; a scanned model (scan_layers=True) is read into that layout by
the usual restore (names are compared unscanned) and its result stacked back (`to_model_layout`).
"""

from __future__ import annotations

import dataclasses
import re

import jax

from efficientlm.compression.hessians import kernel_kind
from efficientlm.compression.spec import PruneSpec
from efficientlm.errors import ConfigError
from efficientlm.models.layer_stacking import stack_layers
from efficientlm.models.transformer import layer_pattern, pattern_period

LAYER_KINDS = ('attention', 'mlp', 'experts')
_UNIT = re.compile(r'^((?:.*/)?(encoder|decoder)/layers_(\d+))/')


@dataclasses.dataclass(frozen=True)
class Unit:
  name: str  # parameter path prefix: 'decoder/layers_3', or 'decoder/logits_dense'
  kernels: tuple[str, ...]  # the parameter names to prune


def work_model(model):
  """The same model unscanned and without remat (the parameter names are the canonical ones)."""
  cfg = model.module.config
  if getattr(cfg, 'residual', 'standard') != 'standard':
    raise ConfigError(f"Pruning does not support residual = {cfg.residual!r}: the reversible "
                      'stack runs its layers inside a custom gradient, where their inputs cannot '
                      "be recorded. Prune a model with residual = 'standard'.")
  cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy='none')
  return dataclasses.replace(model, module=model.module.clone(config=cfg))


def make_plan(shapes: dict[str, tuple[int, ...]], spec: PruneSpec, kinds, include_logits: bool,
              logits_via_embedding: bool) -> list[Unit]:
  """Units in forward order, with the selected kernels; checks n:m against every input dim."""
  unknown = sorted(set(kinds) - set(LAYER_KINDS))
  if unknown or not kinds:
    raise ConfigError(f'PRUNE_LAYER_KINDS = {tuple(kinds)}: choose a non-empty subset of '
                      f'{LAYER_KINDS}.')
  units: dict[tuple[int, int, str], list[str]] = {}
  for name, shape in shapes.items():
    if not name.endswith('/kernel') or '/router/' in name or len(shape) < 2:
      continue
    match = _UNIT.match(name)
    if match is not None and kernel_kind(name) in kinds:
      key = (0 if match[2] == 'encoder' else 1, int(match[3]), match[1])
    elif include_logits and kernel_kind(name) == 'logits':
      key = (2, 0, name[:-len('/kernel')])
    else:
      continue
    spec.check_kernel(name, shape[-2])
    units.setdefault(key, []).append(name)
  if include_logits and logits_via_embedding:
    raise ConfigError('INCLUDE_LOGITS = True, but this model computes its logits with the '
                      'embedding table (logits_via_embedding), which pruning leaves alone; set '
                      'INCLUDE_LOGITS = False.')
  if not units:
    raise ConfigError(f'No kernel of the kinds {tuple(kinds)} was found under encoder/layers_i '
                      'or decoder/layers_i: nothing to prune.')
  return [Unit(key[2], tuple(sorted(names))) for key, names in sorted(units.items())]


def to_model_layout(params, model, abstract):
  """`params` (unscanned) in the layout of `model`, placed on `abstract`'s shardings."""
  cfg = model.module.config

  def layout(tree):
    tree = dict(tree)
    if cfg.scan_layers:
      for stack, count in (('encoder', cfg.num_encoder_layers),
                           ('decoder', cfg.num_decoder_layers)):
        if stack in tree and count:
          tree[stack] = stack_layers(tree[stack], pattern_period(layer_pattern(cfg, count, stack)))
    return tree

  shaped = jax.eval_shape(layout, params)
  if jax.tree.structure(shaped) != jax.tree.structure(abstract) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(shaped), jax.tree.leaves(abstract))):
    raise ConfigError("The pruned parameters do not stack back into this scanned model's layout; "
                      'prune it with SCAN_LAYERS = False (the checkpoint restores into either).')
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return jax.jit(lambda t: jax.tree.map(lambda x, a: x.astype(a.dtype), layout(t), abstract),
                 out_shardings=shardings)(params)
