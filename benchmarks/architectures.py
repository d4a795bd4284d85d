"""The architectures that benchmarks/architectures_bench.py (speed, memory) and
benchmarks/compare_architectures.py (quality) compare: ONE list, `ARCHITECTURES`.

An architecture is a delta on a base model gin (default `models/decoder/tiny.gin`): gin files
parsed after the base, then bindings. Adding one is one line, e.g. for a mixer gin:

  Architecture('bigbird', ('models/bigbird/bigbird.gin',), note='BigBird block-sparse'),

Matched parameter counts: with `match_params=True` the row's `TransformerConfig.mlp_dim` is
re-solved so that its parameter count is the closest possible to the baseline's (the first row,
dense multi-head attention) at the same base, vocabulary and bindings. The count is affine in
mlp_dim (every layer has mlp_dim x emb_dim x (activations + 1) weights, plus biases if any), so
two evaluations give the slope and the solution exactly; the reported counts show what remains
(a few hundred parameters at most: mlp_dim moves in whole units). E.g. multi-query attention
drops (num_heads - 1) x head_dim x emb_dim x 2 key/value weights per layer; the solve gives
them back to the MLP. A row whose extra parameters are the point (MoE) sets match_params=False.
A row whose MLP width must be a multiple of something (the Scaling Transformer's sparse FFN: of
its block size) sets mlp_multiple; the solve then rounds to it, so up to mlp_multiple / 2 units
of difference remain.

Sizes of the long-context rows are for the harness's short rows (64 tokens for the synthetic
tasks, code_length for code): 16-token blocks (BigBird, LSH chunks, Block-Recurrent blocks) and
32 Perceiver AR latents. At long lengths bind e.g. BLOCK_SIZE = 512 and NUM_LATENTS = 1024:
architectures_bench --gin_bindings (its model builds ignore macros a row does not read), or
compare_architectures --row_gin_bindings (the trainer refuses such macros, so these reach only
the rows that read them; resolve's row_bindings). The
Block-Recurrent rows carry state across training steps only where the data are document streams
(a task that binds CARRY_STATE = True, compare_architectures' stdlib_code_streams); elsewhere
each row starts fresh (CARRY_STATE = False here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax

from efficientlm import errors, gin_config, partitioning

DEFAULT_BASE = 'models/decoder/tiny.gin'
_MLP_DIM = 'TransformerConfig.mlp_dim'


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A row of the comparisons: gin files and bindings applied after the base model gin."""

  name: str
  gin_files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()
  match_params: bool = True
  mlp_multiple: int = 1  # the matched mlp_dim is rounded to a multiple of this
  note: str = ''

  def __post_init__(self):
    if not self.name or not self.name.replace('_', '').replace('-', '').isalnum():
      raise ValueError(f'Architecture.name = {self.name!r}; use letters, digits, _ and - (it '
                       'names a MODEL_DIR and a table row).')
    if self.mlp_multiple < 1:
      raise ValueError(f'Architecture {self.name!r}: mlp_multiple = {self.mlp_multiple}; use 1 '
                       'or the size the MLP width must be a multiple of.')


# The first row is the baseline every ratio divides by.
ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture('dense', bindings=('TransformerConfig.num_kv_heads = None',), match_params=False,
                 note='multi-head attention, XLA (the baseline)'),
    Architecture('mqa', bindings=('TransformerConfig.num_kv_heads = 1',),
                 note='multi-query attention (Shazeer 2019), MLP widened to match'),
    Architecture('bigbird', ('models/bigbird/bigbird.gin',),
                 ('TransformerConfig.num_kv_heads = None', 'BIGBIRD_BLOCK = 16',
                  'bigbird.BigBirdConfig.num_random_blocks = 1'),
                 note='BigBird (Zaheer et al. 2020): 16-token blocks, window 3, 1 global and 1 '
                 'random block (64-token rows have only 4 blocks)'),
    Architecture('lsh', ('models/reformer/lsh.gin',), ('LSH_CHUNK = 16',),
                 note='Reformer LSH attention (Kitaev et al. 2020), 2 hashes, 16-token chunks'),
    Architecture('evolving', ('models/evolving/evolving.gin',),
                 ('TransformerConfig.num_kv_heads = None',),
                 note='evolving attention (Wang et al. 2021): logits convolved across layers'),
    Architecture('reversible', ('models/reformer/reversible.gin',),
                 bindings=('TransformerConfig.num_kv_heads = None',),
                 note="reversible residual layers (RevNet / Reformer sec. 3), dense's parameters"),
    Architecture('reformer', ('models/reformer/lsh.gin', 'models/reformer/reversible.gin'),
                 ('LSH_CHUNK = 16',), note='Reformer: LSH attention in reversible layers'),
    Architecture('h3', ('models/h3/h3.gin',),
                 note='H3 (Fu et al. 2023): shift SSM, diagonal SSM on K x V, read by Q; FFT'),
    Architecture('h3_hybrid', ('models/h3/hybrid.gin',),
                 ('TransformerConfig.num_kv_heads = None',),
                 note='H3 and dense attention layers alternating (the paper\'s hybrid)'),
    Architecture('s4d', ('models/h3/s4d.gin',),
                 note='plain diagonal SSM (S4D): no shift, no multiplicative structure'),
    Architecture('gss', ('models/gss/gss.gin',),
                 note='GSS (Mehta et al. 2023): GELU-gated diagonal SSM on emb/4 channels'),
    Architecture('gss_hybrid', ('models/gss/hybrid.gin',),
                 ('TransformerConfig.num_kv_heads = None', 'GSS_ATTENTION_WINDOW = 16'),
                 note='GSS and local attention (16-token window) alternating'),
    Architecture('scaling', ('models/scaling/scaling.gin',),
                 ('TransformerConfig.num_kv_heads = None', 'SPARSE_FFN_BLOCK_SIZE = 32',
                  'SPARSE_FFN_CONTROLLER_RANK = 16', 'SPARSE_QKV_MODULES = 4'), mlp_multiple=32,
                 note='Scaling Transformer (Jaszczur et al. 2021): sparse FFN (1 of each 32 '
                 'units, rank-16 controller) and sparse QKV (4 modules)'),
    Architecture('terraformer', ('models/terraformer/terraformer.gin',),
                 ('LSH_CHUNK = 16', 'SPARSE_FFN_BLOCK_SIZE = 32', 'SPARSE_FFN_CONTROLLER_RANK = 16',
                  'SPARSE_QKV_MODULES = 4'), mlp_multiple=32,
                 note='Terraformer: scaling\'s sparse FFN and QKV, LSH attention (16-token '
                 'chunks), reversible layers'),
    Architecture('block_window', ('models/block_recurrent/block_recurrent.gin',
                                  'models/block_recurrent/window.gin'),
                 ('TransformerConfig.num_kv_heads = None', 'BLOCK_SIZE = 16',
                  'CARRY_STATE = False'),
                 note='Block-Recurrent paper\'s sliding-window baseline: 16-token blocks reading '
                 'the previous block; previous block carried on streams'),
    Architecture('block_recurrent', ('models/block_recurrent/block_recurrent.gin',),
                 ('TransformerConfig.num_kv_heads = None', 'BLOCK_SIZE = 16', 'NUM_STATES = 16',
                  'CARRY_STATE = False'), match_params=False,
                 note='Block-Recurrent Transformer (Hutchins et al. 2022): block_window then a '
                 'recurrent layer (16 states, LSTM gates, state MLP), state carried on streams; '
                 'its state weights are extra parameters (not matched: no MLP width gives them '
                 'back)'),
    Architecture('perceiver_ar', ('models/perceiver_ar/perceiver_ar.gin',),
                 ('TransformerConfig.num_kv_heads = None', 'NUM_LATENTS = 32'),
                 note='Perceiver AR (Hawthorne et al. 2022): the last 32 positions cross-attend to '
                 'the row, then latent self-attention; loss on those 32 only'),
)
BASELINE = ARCHITECTURES[0].name


def select(names: Sequence[str] | None) -> list[Architecture]:
  """The named architectures in ARCHITECTURES order, the baseline always first (ratios need it)."""
  known = {a.name: a for a in ARCHITECTURES}
  unknown = [n for n in names or () if n not in known]
  if unknown:
    raise ValueError(f'Unknown architectures {unknown}; known: {list(known)} (add a row to '
                     'benchmarks/architectures.py:ARCHITECTURES).')
  wanted = set(names or known) | {BASELINE}
  return [a for a in ARCHITECTURES if a.name in wanted]


def gin_arguments(arch: Architecture, base: str, bindings: Sequence[str] = (),
                  run_gins: Sequence[str] = ()) -> tuple[list[str], list[str]]:
  """(gin files, bindings) of the row: the base, the row's delta, then `run_gins` (a run gin,
  for the trainer) and `bindings` (shared settings such as the vocabulary, applied last)."""
  return [base, *arch.gin_files, *run_gins], [*arch.bindings, *bindings]


def build_model(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """The MODEL macro of the parsed gin files (gin is cleared first)."""
  gin_config.parse(gin_files, bindings)
  return gin_config.macro('MODEL')


def count_params(model, length: int | None = None) -> int:
  """Parameters of `model`, from abstract shapes (nothing allocated; by default 512 tokens so
  that block-sparse and chunked layers have several blocks, or more where the model needs them:
  Perceiver AR's latents, a larger block; the count does not depend on the length)."""
  if length is None:
    cfg = model.module.config
    length = max(512, getattr(getattr(model.module, 'perceiver', None), 'num_latents', 0))
    for size in (cfg.block_recurrent and cfg.block_recurrent.block_size,
                 cfg.lsh and cfg.lsh.chunk_length):
      length = math.lcm(length, size or 1)
  batch = model.dummy_batch(1, {'inputs': length, 'targets': length})
  abstract = jax.eval_shape(lambda: partitioning.unbox(model.init(jax.random.key(0), batch)))
  # Only 'params': a stateful model's init also returns its 'recurrent' state (block-recurrent
  # layers' windows and states), sized by the batch and block, not parameters.
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract['params']))


@dataclasses.dataclass(frozen=True)
class Resolved:
  """An architecture made concrete at one base and set of bindings."""

  arch: Architecture
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]  # including the matched mlp_dim, if any
  num_params: int
  baseline_params: int

  @property
  def param_ratio(self) -> float:
    return self.num_params / self.baseline_params


def macro_bindings_used(gin_files: Sequence[str], bindings: Sequence[str],
                        optional: Sequence[str]) -> list[str]:
  """The `optional` bindings that apply to these gin files: a `NAME = v` of a macro that no file
  defines or uses is dropped (the trainer refuses such bindings, as likely misspellings), others
  kept. E.g. BLOCK_SIZE = 128 applies to the Block-Recurrent rows only."""
  gin_config.parse(gin_files, bindings)
  kept = []
  for binding in optional:
    try:
      gin_config.check_command_line_macros([binding])
    except errors.ConfigError:
      continue
    kept.append(binding)
  return kept


def resolve(archs: Sequence[Architecture], base: str = DEFAULT_BASE,
            bindings: Sequence[str] = (), run_gins: Sequence[str] = (),
            parse_only: Sequence[str] = (),
            row_bindings: Sequence[str] = ()) -> list[Resolved]:
  """Each row's gin arguments and parameter count, mlp_dim matched to the first row's count.
  `parse_only`: bindings the gin files need to parse (a required MODEL_DIR), not the row's.
  `row_bindings`: macro bindings applied (after `bindings`) to the rows whose gin files define
  or use the macro only (macro_bindings_used)."""

  def model_of(files, extra):
    return build_model(files, [*extra, *parse_only])

  def arguments(arch):
    files, extra = gin_arguments(arch, base, bindings, run_gins)
    if row_bindings:
      extra = [*extra, *macro_bindings_used(files, [*extra, *parse_only], row_bindings)]
    return files, extra

  files, extra = arguments(archs[0])
  target = count_params(model_of(files, extra))
  rows = []
  for arch in archs:
    files, extra = arguments(arch)
    model = model_of(files, extra)
    count = count_params(model)
    if arch.match_params and count != target:
      width = model.module.config.mlp_dim
      step = 64
      slope = (count_params(model_of(files, [*extra, f'{_MLP_DIM} = {width + step}']))
               - count) / step
      if slope <= 0:
        raise ValueError(f'Architecture {arch.name!r}: its parameter count does not grow with '
                         f'{_MLP_DIM}, so it cannot be matched; set match_params=False.')
      multiple = arch.mlp_multiple
      width = max(multiple, multiple * round((width + (target - count) / slope) / multiple))
      extra = [*extra, f'{_MLP_DIM} = {width}']
      count = count_params(model_of(files, extra))
    rows.append(Resolved(arch, tuple(files), tuple(extra), count, target))
  return rows
