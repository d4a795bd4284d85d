"""Restore a checkpoint into a model that may differ from the one that wrote it (T5X semantics).

Names are matched in canonical (unscanned, T5X) form, so scanned and unscanned models and
checkpoints mix freely. For every model parameter:
  1. the first `assignment_map` pattern that fully matches its name gives the checkpoint name
     (`re.Match.expand` of the replacement, so groups carry over); a None replacement means
     "do not load it: initialize from scratch"; no matching pattern means the same name;
  2. a parameter the checkpoint lacks is initialized from scratch if `fallback_to_scratch`,
     otherwise an error lists every such parameter;
  3. shapes must agree (error names both), except that with `tile_experts` an expert weight
     [E, ...] takes E copies of a dense [...] (sparse upcycling);
  4. values are cast to the model's parameter dtype.
`strict` turns every unmatched name on either side (model parameters the checkpoint lacks,
checkpoint arrays no parameter took) into one error listing them all; parameters mapped to None
on purpose are not unmatched.

Arrays are read leaf by leaf straight into their shardings, so host memory holds one device
slice at a time and the model never exists whole on one host.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from efficientlm.checkpoints.layer_names import canonical_index, canonical_names
from efficientlm.checkpoints.source import Source, flatten, unflatten

Initializer = Callable[[Sequence[str]], Mapping[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
  """How a checkpoint maps onto the model (bound in gin as `restore.RestoreOptions`)."""

  assignment_map: Sequence[tuple[str, str | None]] = ()
  fallback_to_scratch: bool = False
  strict: bool = False
  tile_experts: bool = False

  def __post_init__(self):
    pairs = tuple(tuple(p) for p in self.assignment_map)
    for pair in pairs:
      if len(pair) != 2:
        raise ValueError(f'assignment_map entries are (pattern, replacement or None), got {pair}.')
      try:
        re.compile(pair[0])
      except re.error as e:
        raise ValueError(f'assignment_map pattern {pair[0]!r} is not a regex: {e}') from e
    object.__setattr__(self, 'assignment_map', pairs)

  def source_name(self, target: str) -> str | None:
    """The checkpoint name for a model parameter; None: initialize it from scratch."""
    for pattern, replacement in self.assignment_map:
      match = re.fullmatch(pattern, target)
      if match:
        return None if replacement is None else match.expand(replacement)
    return target


@dataclasses.dataclass
class RestoreReport:
  loaded: dict[str, str]  # model parameter (canonical) -> checkpoint name
  from_scratch: list[str]
  unused: list[str]  # checkpoint names no parameter took
  cast: dict[str, tuple[str, str]]  # checkpoint name -> (stored dtype, model dtype)
  tiled: list[str]

  def summary(self) -> str:
    lines = [f'{len(self.loaded)} parameters loaded, {len(self.tiled)} of them tiled over '
             f'experts; {len(self.from_scratch)} from scratch; {len(self.unused)} checkpoint '
             f'arrays unused; {len(self.cast)} cast']
    for title, names in (('from scratch', self.from_scratch), ('unused', self.unused)):
      if names:
        lines.append(f'  {title}: ' + ', '.join(names[:20]) + (' ...' if len(names) > 20 else ''))
    casts = sorted({f'{a}->{b}' for a, b in self.cast.values()})
    if casts:
      lines.append('  casts: ' + ', '.join(casts))
    return '\n'.join(lines)


@dataclasses.dataclass
class _Piece:
  """One layer of one model parameter and where its value comes from."""

  target: str  # canonical name
  shape: tuple[int, ...]
  source: str | None = None  # canonical checkpoint name; None: from scratch
  tile: int | None = None  # experts to tile a dense source over


def _pieces(stored: str, abstract, canonical: list[str]) -> list[_Piece]:
  shape = tuple(abstract.shape)
  if canonical == [stored]:
    return [_Piece(stored, shape)]
  return [_Piece(name, shape[1:]) for name in canonical]


def plan(source: Source, abstract_params, options: RestoreOptions
         ) -> tuple[dict[str, list[_Piece]], RestoreReport]:
  """Matches names and shapes; raises one error listing every problem."""
  flat = flatten(abstract_params)
  targets = canonical_names({k: v.shape for k, v in flat.items()})
  src_index = canonical_index({k: v.shape for k, v in source.leaves.items()})
  src_shapes = {name: source.leaves[stored].shape[0 if b is None else 1:]
                for name, (stored, b) in src_index.items()}
  plans, problems, missing, skipped = {}, [], [], []
  report = RestoreReport({}, [], [], {}, [])
  for stored, canonical in targets.items():
    pieces = _pieces(stored, flat[stored], canonical)
    for piece in pieces:
      name = options.source_name(piece.target)
      if name is None:
        skipped.append(piece.target)
        continue
      if name not in src_shapes:
        missing.append((piece.target, name))
        continue
      have = tuple(src_shapes[name])
      if have != piece.shape:
        if options.tile_experts and '/expert/' in piece.target and piece.shape[1:] == have:
          piece.tile = piece.shape[0]
          report.tiled.append(piece.target)
        else:
          problems.append(f'{piece.target}: the model wants shape {piece.shape}, checkpoint '
                          f'array {name} has {have}')
          continue
      piece.source = name
      report.loaded[piece.target] = name
      stored_dtype = np.dtype(source.leaves[src_index[name][0]].dtype)
      if stored_dtype != np.dtype(flat[stored].dtype):
        report.cast[name] = (stored_dtype.name, np.dtype(flat[stored].dtype).name)
    plans[stored] = pieces
  used = set(report.loaded.values())
  report.unused = sorted(n for n in src_shapes if n not in used)
  report.from_scratch = sorted(skipped + [target for target, _ in missing])
  missing = [t if n == t else f'{t} (<- {n})' for t, n in missing]  # as the errors list them
  if problems:
    raise ValueError(f'{source.describe()} does not fit the model: ' + _listing(problems))
  if options.strict and (missing or report.unused):
    raise ValueError(
        f'Strict restore from {source.describe()}: model parameters the checkpoint lacks: '
        + _listing(missing or ['none']) + '\ncheckpoint arrays no parameter took: '
        + _listing(report.unused or ['none']))
  if missing and not options.fallback_to_scratch:
    raise ValueError(
        f'{source.describe()} lacks {len(missing)} model parameters (set fallback_to_scratch to '
        'initialize them, or map them with assignment_map): ' + _listing(missing))
  return plans, report


def _listing(names: Sequence[str]) -> str:
  return '\n  ' + '\n  '.join(names)


def _spec(sharding, ndim: int) -> tuple:
  spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
  return spec + (None,) * (ndim - len(spec))


def _with_spec(sharding, spec) -> NamedSharding:
  return NamedSharding(sharding.mesh, PartitionSpec(*spec))


class _Loader:
  """Loads checkpoint arrays, keeping the last stacked one (consecutive layers share it)."""

  def __init__(self, source: Source):
    self.source = source
    self.index = canonical_index({k: v.shape for k, v in source.leaves.items()})
    self._cached = (None, None)

  def piece(self, name: str, shape, sharding: NamedSharding, dtype, tile: int | None
            ) -> jax.Array:
    """The checkpoint array `name` as a model piece of `shape` and `sharding`."""
    stored, b = self.index[name]
    spec = _spec(sharding, len(shape))
    if tile:
      spec = spec[1:]
    if b is None:
      value = self.source.load({stored: (_with_spec(sharding, spec), dtype)})[stored]
    else:
      key = (stored, spec, np.dtype(dtype))
      if self._cached[0] != key:
        self._cached = (None, None)  # release before loading the next
        loaded = self.source.load({stored: (_with_spec(sharding, (None,) + spec), dtype)})
        self._cached = (key, loaded[stored])
      value = _take(self._cached[1], b, _with_spec(sharding, spec))
    if tile:
      value = _tile(value, tile, sharding)
    return value


def _take(stacked, b, sharding):
  return jax.jit(lambda x: x[b], out_shardings=sharding)(stacked)


def _tile(value, experts, sharding):
  return jax.jit(lambda x: jnp.broadcast_to(x[None], (experts,) + x.shape),
                 out_shardings=sharding)(value)


def _stack(pieces, sharding):
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*pieces)


def restore(source: Source, abstract_params, options: RestoreOptions = RestoreOptions(),
            initializer: Initializer | None = None):
  """(parameters placed on the abstract tree's shardings, RestoreReport)."""
  plans, report = plan(source, abstract_params, options)
  flat = flatten(abstract_params)
  scratch_leaves = [stored for stored, pieces in plans.items()
                    if any(p.source is None for p in pieces)]
  fresh = {}
  if scratch_leaves:
    if initializer is None:
      raise ValueError('Parameters must start from scratch but no initializer was given: '
                       + ', '.join(report.from_scratch))
    fresh = dict(initializer(scratch_leaves))
  loader = _Loader(source)
  out = {}
  # Ordered by checkpoint name so that consecutive pieces reuse one loaded stacked array.
  order = sorted(plans, key=lambda s: min((p.source or '') for p in plans[s]))
  for stored in order:
    pieces, abstract = plans[stored], flat[stored]
    sharding, dtype = abstract.sharding, abstract.dtype
    if len(pieces) == 1 and pieces[0].target == stored:
      piece = pieces[0]
      out[stored] = (fresh[stored] if piece.source is None
                     else loader.piece(piece.source, piece.shape, sharding, dtype, piece.tile))
      continue
    piece_sharding = _with_spec(sharding, _spec(sharding, len(abstract.shape))[1:])
    values = [fresh[stored][b] if p.source is None
              else loader.piece(p.source, p.shape, piece_sharding, dtype, p.tile)
              for b, p in enumerate(pieces)]
    out[stored] = _stack(values, sharding)
  return unflatten(out), report


def partitioned_initializer(partitioner, init_params, rng: jax.Array) -> Initializer:
  """Initializes only the named parameters, sharded (the others are dead code to XLA). Nothing
  is traced until it is called (most restores initialize nothing)."""
  from efficientlm import partitioning  # pylint: disable=g-import-not-at-top

  def initialize(names: Sequence[str]) -> Mapping[str, jax.Array]:
    names = list(names)
    _, shardings = partitioner.abstract_params(init_params, rng)
    flat_shardings = flatten(shardings)

    def subset(key):
      flat = flatten(partitioning.unbox(init_params(key)))
      return [flat[n] for n in names]

    with partitioner.context():
      values = jax.jit(subset, out_shardings=[flat_shardings[n] for n in names])(rng)
    return dict(zip(names, values))

  return initialize
