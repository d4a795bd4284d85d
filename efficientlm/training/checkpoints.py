"""Orbax checkpoints of a training run: parameters, optimizer state and the data position.

A checkpoint `MODEL_DIR/checkpoints/<step>/` holds the items `params` and `opt_state` (sharded
arrays, restorable onto any mesh), `dataset` (each process's input-pipeline position, with the
sha256 of its files) and `meta`: a sealed JSON record (integrity.seal) of what kind of checkpoint
it is ('training': every item above; 'parameters': written by upcycling or conversion, `params`
only), the items it holds, and the shape, dtype and content checksum of every array (and, for an
(IA)3 run, which holds only its vectors, the base checkpoint: training/parameter_efficient.py).

What a restore does with each kind of failure (`restore_latest`):
- The checkpoint does not fit the configured model (shapes, dtypes, parameter names): a
  CheckpointMismatchError naming the parameters and both shapes. Nothing is skipped, moved or
  written: the run directory belongs to another configuration.
- A storage error that may pass (timeouts, unavailable): retried with backoff, then a
  CheckpointReadError. Nothing is skipped or moved.
- Anything else is damage (missing or truncated files, a metadata record or data that does not
  match its checksum, non-finite values, a training checkpoint without its optimizer state):
  the step is reported, renamed `<step>.unreadable` (never deleted, never listed again, so the
  step can be written anew) and the previous step tried.

With several processes each reads its own shards and data position, so one may find damage the
others do not. Every read therefore ends with the processes agreeing on its outcome (damage
anywhere is damage everywhere, a storage error anywhere is retried everywhere), and a process
whose read failed still reaches Orbax's end-of-restore barrier (the item handlers return the
failure instead of raising): both barriers are device collectives, paired across processes by
order, so a process that skipped one would pair its next collective with another process's
barrier and garble or hang the restore.

Saves are asynchronous; `poll` reports a save once Orbax has committed it (written to a temporary
directory, then renamed: a save cut short by a crash is never listed), and a failed save raises
a CheckpointSaveError naming the path, the free space and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from efficientlm import storage
from efficientlm.errors import CheckpointMismatchError, CheckpointReadError, CheckpointSaveError
from efficientlm.training import integrity, orbax_noise
from efficientlm.training.metrics import log

# 'recurrent': the layers' state carried across training steps (document streams), when the
# model has any (models/model.py, BaseModel.carries_state).
ITEMS = ('params', 'opt_state', 'recurrent', 'dataset', 'meta')
UNREADABLE_SUFFIX = '.unreadable'
FORMAT_VERSION = 2  # 1: meta without kind, items or checksums (before integrity checks)


class UnreadableCheckpoint(Exception):
  """A checkpoint is damaged: skip it (moved aside) and use the one before it."""


# --- the data iterator item ----------------------------------------------------------------------


def _sums_name() -> str:
  return f'SHA256SUMS.process_{jax.process_index()}.json'


def _own_files(directory: epath.Path) -> list[epath.Path]:
  """The files this process's iterator wrote: those under process_<i>/, where iterators write
  (with one process, iterators that write elsewhere are accepted too)."""
  sub = directory / f'process_{jax.process_index()}'
  if not sub.exists():
    if jax.process_count() > 1:
      # The processes share `directory`: files outside process_<i>/ would be written (and
      # hashed) by several processes at once.
      raise ValueError(f'the data iterator wrote no {sub}: with several processes, each must '
                       'write its position under process_<its index>/ of the directory it is '
                       'given, as efficientlm.data.DataIterator does')
    sub = directory
  return sorted(p for p in _walk(sub) if not p.name.startswith('SHA256SUMS'))


def _walk(directory: epath.Path):
  """Files under `directory` (epath has no recursive glob for cloud storage)."""
  for path in directory.iterdir():
    if path.is_dir():
      yield from _walk(path)
    else:
      yield path


def _sha256(path: epath.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves and restores an iterator that has `save(dir)` / `restore(dir)` (efficientlm.data),
  with the sha256 of every file it wrote."""

  def save(self, directory: epath.Path, args: DataIteratorSave):
    args.iterator.save(str(directory))
    sums = {str(p.relative_to(directory)): _sha256(p) for p in _own_files(directory)}
    (directory / _sums_name()).write_text(json.dumps(sums, indent=1))

  def restore(self, directory: epath.Path, args: DataIteratorRestore):
    try:
      sums_file = directory / _sums_name()
      if sums_file.exists():  # absent in checkpoints written before the sums were
        for name, digest in json.loads(sums_file.read_text()).items():
          if not (directory / name).exists():
            raise UnreadableCheckpoint(f'data position file {directory / name} is missing')
          if _sha256(directory / name) != digest:
            raise UnreadableCheckpoint(f'data position file {directory / name} does not match '
                                       'its checksum')
      args.iterator.restore(str(directory))
    except Exception as e:  # pylint: disable=broad-except  (see _ReadFailed)
      return _ReadFailed(e)
    return args.iterator


class ArrayHandler(ocp.StandardCheckpointHandler):
  """Orbax's handler for a tree of arrays, returning a failed restore (see _ReadFailed)."""

  def restore(self, directory: epath.Path, args=None):
    try:
      return super().restore(directory, args=args)
    except Exception as e:  # pylint: disable=broad-except
      return _ReadFailed(e)


@ocp.args.register_with_handler(ArrayHandler, for_save=True)
@dataclasses.dataclass
class ArraysSave(ocp.args.StandardSave):
  pass


@ocp.args.register_with_handler(ArrayHandler, for_restore=True)
@dataclasses.dataclass
class ArraysRestore(ocp.args.StandardRestore):
  pass


@dataclasses.dataclass
class _ReadFailed:
  """What the item handlers return instead of raising: Orbax's restore then still reaches its
  closing barrier on this process, as it does on the others (see the module docstring)."""
  error: Exception


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: Any


def _savable(iterator) -> bool:
  return hasattr(iterator, 'save') and hasattr(iterator, 'restore')


# Outcomes of one read, worst last: every process takes the worst one any process had.
_OK, _STORAGE, _DAMAGED = 0, 1, 2


def _agree(outcome: int) -> tuple[int, list[int]]:
  """(the worst outcome over all processes, the processes that had it). A collective: with
  several processes, every one must call it at the same point."""
  if jax.process_count() == 1:
    return outcome, [0]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  seen = np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)
  worst = int(seen.max())
  return worst, np.flatnonzero(seen == worst).tolist()


# --- telling damage from storage trouble -------------------------------------------------------

# Status codes tensorstore puts at the start of its error messages, and errnos, for failures
# that say nothing about the checkpoint's bytes.
_TRANSIENT_STATUS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'RESOURCE_EXHAUSTED', 'ABORTED',
                     'CANCELLED', 'UNAUTHENTICATED', 'PERMISSION_DENIED')
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                    errno.ECONNABORTED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES,
                    errno.EPERM, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR}


def is_storage_error(error: BaseException) -> bool:
  """Whether `error` is the storage's (timeouts, network, permissions: it may pass on a retry and
  says nothing about the checkpoint), as opposed to missing or damaged files."""
  for e in _chain(error):
    if isinstance(e, (TimeoutError, ConnectionError)):
      return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
      return True
    if any(str(e).lstrip().startswith(code) for code in _TRANSIENT_STATUS):
      return True
  return False


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _brief(error: BaseException, limit: int = 400) -> str:
  """One line: the innermost cause's type and text (Orbax wraps storage errors in messages that
  name its own methods), its middle cut (storage errors put the path first and the operating
  system's reason last)."""
  root = list(_chain(error))[-1]
  text = ' '.join(str(root).split()).rstrip('.')
  if len(text) > limit:
    text = f'{text[:limit // 2]} ... {text[-limit // 2:]}'
  return f'{type(root).__name__}: {text}'


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any | None
  recurrent: Any | None = None
  meta: dict[str, Any] | None = None  # the checkpoint's meta record (e.g. an (IA)3 run's base)


class Checkpointer:
  """Keeps the last `keep` checkpoints plus every step divisible by `keep_period`.

  `read_retries` attempts (backoff 1, 2, 4 ... s) are made on storage errors that may pass."""

  def __init__(self, directory: str | epath.Path, keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True, read_retries: int = 3):
    orbax_noise.install()
    self.directory = storage.as_path(directory)
    self.read_retries = read_retries
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period,
                                           enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=ITEMS,
        item_handlers={'params': ArrayHandler(), 'opt_state': ArrayHandler(),
                       'recurrent': ArrayHandler(), 'dataset': DataIteratorHandler()})
    self._pending: int | None = None  # the step being saved in the background
    self._failed = False  # a save failed and was reported

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  # --- saving ------------------------------------------------------------------------------------

  def save(self, step: int, params, opt_state=None, iterator=None, wait: bool = False,
           meta: dict | None = None, recurrent=None) -> bool:
    """Starts saving `step` unless it already exists (a resumed run re-reaching its start step).
    `wait` blocks until it is committed. Raises CheckpointSaveError if this or the previous save
    failed."""
    self.finish()  # one save in flight; also surfaces the previous one's errors
    if step in self.manager.all_steps():
      return False
    orbax_noise.new_operation()
    arrays = {'params': params} if opt_state is None else {'params': params,
                                                           'opt_state': opt_state}
    if recurrent is not None:
      arrays['recurrent'] = recurrent
    table, _ = integrity.describe(arrays)
    items = {name: ArraysSave(tree) for name, tree in arrays.items()}
    if iterator is not None and _savable(iterator):
      items['dataset'] = DataIteratorSave(iterator)
    record = integrity.seal({
        'step': step, 'process_count': jax.process_count(), 'format_version': FORMAT_VERSION,
        'kind': 'parameters' if opt_state is None else 'training',
        'items': sorted(items), 'arrays': table, **(meta or {})})
    items['meta'] = ocp.args.JsonSave(record)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except  (synchronous part of the save)
      raise self._save_error(step, e) from e
    self._pending = step
    if wait:
      self.finish()
    return True

  def poll(self) -> int | None:
    """The step whose background save has just committed, if any (without blocking)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      return self.finish()
    return None

  def finish(self) -> int | None:
    """Blocks until the save in flight, if any, has committed (and says so); returns its step."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step, e) from e
    if step is not None:
      log(f'saved checkpoint {step}')
    return step

  def _save_error(self, step, error) -> CheckpointSaveError:
    self._failed = True
    self.manager.reload()
    good = [s for s in self.steps() if s != step]
    target = self.directory / str(step) if step is not None else self.directory
    space = ''
    if not storage.is_url(self.directory):
      free = shutil.disk_usage(self.directory).free
      space = f' Free space there: {free / 2**20:.1f} MiB.'
    return CheckpointSaveError(
        f'Saving checkpoint {target} failed ({_brief(error)}).{space} The last good checkpoint '
        f'is {self.directory / str(good[-1]) if good else "none"}; a restart resumes from it. '
        'Free some space (or fix the storage) and run the same command again.')

  # --- restoring ---------------------------------------------------------------------------------

  def restore_latest(self, abstract_params, abstract_opt_state, iterator=None,
                     abstract_recurrent=None) -> Restored | None:
    """The newest readable checkpoint restored onto the shardings of the abstract trees, or None
    if there is none. Damaged steps are reported, moved aside and the previous one tried; a
    checkpoint of another configuration raises CheckpointMismatchError, a storage error that
    outlasts the retries CheckpointReadError."""
    orbax_noise.new_operation()
    for step in reversed(self.steps()):
      # Every process raises UnreadableCheckpoint at the same point or not at all: reads agree
      # on their outcome (_read), the other checks see the same metadata and global arrays.
      try:
        return self._restore(step, abstract_params, abstract_opt_state, iterator,
                             abstract_recurrent)
      except UnreadableCheckpoint as e:
        damage = e
      older = [s for s in self.steps() if s < step]
      moved = self._move_aside(step)
      log(f'Checkpoint {self.directory / str(step)} is unreadable: {damage}. Moved it to {moved} '
          '(kept, never deleted; it is no longer used). ' +
          (f'Falling back to step {older[-1]}.' if older else
           'No older checkpoint: starting from scratch.'))
    return None

  def _restore(self, step, abstract_params, abstract_opt_state, iterator,
               abstract_recurrent=None) -> Restored:
    step_dir = self.directory / str(step)
    meta = self._read_meta(step_dir)
    kind = meta['kind']
    if kind == 'training' and 'opt_state' not in meta['items']:
      raise UnreadableCheckpoint('a training checkpoint without optimizer state')
    for item in meta['items']:
      if not (step_dir / item).exists():
        raise UnreadableCheckpoint(f'its item {item!r} is missing')
    trees = {'params': abstract_params}
    if kind == 'training':
      trees['opt_state'] = abstract_opt_state
      # A stateful model resumes its streams' state; without it the state starts fresh.
      if abstract_recurrent is not None and 'recurrent' in meta['items']:
        trees['recurrent'] = abstract_recurrent
    self._check_fits(step_dir, meta, trees)

    items = {name: ArraysRestore(tree) for name, tree in trees.items()}
    restored = self._read(step_dir, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**items)))
    arrays = {name: restored[name] for name in trees}
    table, finite = integrity.describe(arrays)
    if meta['arrays'] is not None:
      bad = [name for name, entry in table.items()
             if entry['checksum'] != meta['arrays'].get(name, {}).get('checksum')]
      if bad:
        raise UnreadableCheckpoint(f'{len(bad)} array(s) do not match their checksums '
                                   f'({", ".join(bad[:4])}{" ..." if len(bad) > 4 else ""})')
    if not finite:
      raise UnreadableCheckpoint('it holds non-finite values')
    # The data position last, once the arrays are known good: a damaged step never moves the
    # caller's iterator (its files are checked before the iterator restores from them).
    if iterator is not None and _savable(iterator) and kind == 'training':
      if 'dataset' not in meta['items']:
        raise UnreadableCheckpoint('it has no data iterator position to resume from')
      self._read(step_dir, lambda: self.manager.restore(
          step, args=ocp.args.Composite(dataset=DataIteratorRestore(iterator))))
    if kind == 'parameters':
      log(f'Checkpoint {step_dir} has parameters only (upcycled or converted): the optimizer '
          'state starts fresh and the data from the beginning.')
    return Restored(step, arrays['params'], arrays.get('opt_state'), arrays.get('recurrent'),
                    meta)

  def _read(self, step_dir, fn: Callable[[], Any]):
    """fn() with retries on storage errors; other errors mean the checkpoint is damaged. With
    several processes, all take the worst outcome any of them had (a collective each attempt)."""
    for attempt in range(self.read_retries + 1):
      value, error = None, None
      try:
        value = fn()
        failed = [v for v in (value.values() if isinstance(value, ocp.args.Composite) else [value])
                  if isinstance(v, _ReadFailed)]
        if failed:
          raise failed[0].error
      except Exception as e:  # pylint: disable=broad-except
        error = e
      local = (_OK if error is None else
               _STORAGE if not isinstance(error, UnreadableCheckpoint) and is_storage_error(error)
               else _DAMAGED)
      if local != _OK and jax.process_count() > 1:  # log() shows process 0 only
        print(f'process {jax.process_index()}: reading checkpoint {step_dir} failed: '
              f'{_brief(error)}', flush=True)
      outcome, where = _agree(local)
      if outcome == _OK:
        return value
      if outcome == _DAMAGED:
        if local == _DAMAGED:
          if isinstance(error, UnreadableCheckpoint):
            raise error
          raise UnreadableCheckpoint(_brief(error)) from error
        raise UnreadableCheckpoint(f'process(es) {where} found it damaged (see their output)')
      reason = _brief(error) if error is not None else f'on process(es) {where}'
      if attempt == self.read_retries:
        raise CheckpointReadError(
            f'Checkpoint {step_dir} could not be read after {attempt + 1} attempts '
            f'({reason}). This looks like a storage problem, not a damaged checkpoint, so '
            'nothing was skipped or moved; check the storage and run the same command '
            'again.') from error
      delay = 2.0 ** attempt
      log(f'Reading checkpoint {step_dir} failed ({reason}); retrying in {delay:.0f} s.')
      time.sleep(delay)
    raise AssertionError('unreachable')

  def _read_meta(self, step_dir: epath.Path) -> dict[str, Any]:
    """The checkpoint's record: kind, items and, where recorded, the arrays' shapes, dtypes and
    checksums (None for checkpoints written before they were recorded)."""
    path = step_dir / 'meta' / 'metadata'
    try:
      record = self._read(step_dir, lambda: json.loads(path.read_text()))
      payload = integrity.unseal(record)
    except UnreadableCheckpoint:
      raise
    except (ValueError, TypeError, AttributeError) as e:
      raise UnreadableCheckpoint(f'its metadata record {path} is damaged ({_brief(e)})') from e
    if payload is not None:
      return payload
    # Written before format 2: infer the kind as the trainer used to.
    kind = 'parameters' if ('upcycled_from' in record or 'converted_from' in record or
                            not (step_dir / 'opt_state').exists()) else 'training'
    items = [i for i in ITEMS if i != 'meta' and (step_dir / i).exists()]
    if kind == 'training' and 'opt_state' not in items:
      items.append('opt_state')  # so the check above calls it damaged
    return {**record, 'kind': kind, 'items': items, 'arrays': None}

  def _check_fits(self, step_dir, meta, trees) -> None:
    """Raises CheckpointMismatchError if the checkpoint's arrays are not the model's."""
    expected = {}
    for name, tree in trees.items():
      expected.update({f'{name}/{k}': v for k, v in integrity.signature(tree).items()})
    if meta['arrays'] is not None:
      found = {k: (tuple(v['shape']), v['dtype']) for k, v in meta['arrays'].items()
               if k.split('/', 1)[0] in trees}
    else:  # Orbax's own metadata; damage to it reads as damage
      found = {}
      for name in trees:
        tree = self._read(step_dir, lambda n=name: ocp.PyTreeCheckpointHandler().metadata(
            step_dir / n))
        tree = getattr(getattr(tree, 'item_metadata', tree), 'tree', tree)
        found.update({f'{name}/{k}': v for k, v in integrity.signature(tree).items()})
    problems = integrity.mismatches(expected, found)
    if not problems:
      return
    # The parameters say what changed; their optimizer state follows them.
    shown = [p for p in problems if p.startswith('params/')] or problems
    hidden = len(problems) - len(shown[:12])
    listing = '\n  '.join(shown[:12]) + (f'\n  ... and {hidden} more (optimizer state included)'
                                         if hidden else '')
    raise CheckpointMismatchError(
        f'Checkpoint {step_dir} was written by a different model configuration; '
        f'{len(problems)} array(s) differ:\n  {listing}\n'
        'Nothing was changed in the run directory. To train this configuration, start a new '
        'MODEL_DIR; to start it from these parameters, use a new MODEL_DIR with '
        f'--gin.RESTORE_PATH="\'{step_dir}\'" (and restore.RestoreOptions for the changed '
        'names); to continue this run, restore its original configuration (config.gin there).')

  def _move_aside(self, step: int) -> epath.Path:
    """Renames a damaged step so it is never listed again (and may be written anew)."""
    source = self.directory / str(step)
    target = self.directory / f'{step}{UNREADABLE_SUFFIX}'
    n = 1
    while target.exists():
      n += 1
      target = self.directory / f'{step}{UNREADABLE_SUFFIX}.{n}'
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'efficientlm_move_aside_{step}')
    self.manager.reload()
    return target

  # --- the rest ----------------------------------------------------------------------------------

  def wait(self):
    self.finish()

  def close(self):
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # else: the failed save, already reported
        raise
