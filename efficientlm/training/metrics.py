"""Training metrics: model FLOPs and MFU, short progress lines with ETA on stdout, every scalar to
TensorBoard and metrics.jsonl, start-up phases with their durations."""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence

import jax

from efficientlm import storage
from efficientlm.models.config import TransformerConfig

# Peak dense bfloat16 FLOP/s per device, from the vendors' data sheets, by device_kind substring.
PEAK_FLOPS = (
    ('TPU v6', 918e12),
    ('TPU v5p', 459e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v4', 275e12),
    ('TPU v3', 123e12),
    ('H200', 989e12),
    ('H100', 989e12),
    ('A100', 312e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device, or None where unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None


def _layer_matmul_params(cfg: TransformerConfig, cross_attention: bool) -> int:
  kv_heads = cfg.num_kv_heads or cfg.num_heads
  attention = cfg.emb_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * kv_heads)
  mlp = cfg.emb_dim * cfg.mlp_dim * (len(cfg.mlp_activations) + 1)
  return attention * (2 if cross_attention else 1) + mlp


def flops_per_example(cfg: TransformerConfig, lengths: Mapping[str, int],
                      encoder_decoder: bool) -> float:
  """Training FLOPs (forward + backward) of one example, as in PaLM's MFU (Chowdhery et al.
  2022, appendix B): 6 per matmul parameter per token, plus 12 * layers * heads * head_dim *
  attended length per token for the attention scores and mixing. Embedding lookups are free;
  the output projection counts. Padding counts: this is the work of the step as laid out."""
  attn_width = cfg.num_heads * cfg.head_dim
  targets = lengths['targets']
  if encoder_decoder:
    inputs = lengths['inputs']
    encoder = inputs * (6 * cfg.num_encoder_layers * _layer_matmul_params(cfg, False) +
                        12 * cfg.num_encoder_layers * attn_width * inputs)
    decoder_params = cfg.num_decoder_layers * _layer_matmul_params(cfg, True)
    decoder_attn = 12 * cfg.num_decoder_layers * attn_width * (targets + inputs)
  else:
    encoder = 0.0
    decoder_params = cfg.num_decoder_layers * _layer_matmul_params(cfg, False)
    decoder_attn = 12 * cfg.num_decoder_layers * attn_width * targets
  logits = cfg.emb_dim * cfg.vocab_size
  return float(encoder + targets * (6 * (decoder_params + logits) + decoder_attn))


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s')


class Progress:
  """Seconds per step over the last logging window, and the progress text (percent and ETA)."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._last_step, self._last_time = first_step, time.perf_counter()

  def update(self, step: int) -> tuple[float, str]:
    """Returns (seconds per step since the last update, the progress text)."""
    now = time.perf_counter()
    step_time = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_step, self._last_time = step, now
    eta = format_duration(step_time * (self.total - step))
    return step_time, f'{step}/{self.total} {100 * step / max(self.total, 1):.0f}% ETA {eta}'


def train_line(step: int, values: Mapping[str, float | None], progress: str) -> str:
  """The short stdout line of a training step: loss, accuracy, speed, progress (MFU where the
  device's peak is known). Everything else goes to TensorBoard and metrics.jsonl."""
  parts = [f'loss {_fmt(values["loss"])}']
  if 'accuracy' in values:
    parts.append(f'accuracy {values["accuracy"]:.4f}')
  parts += [f'{values["step_time_s"]:.3g} s/step', f'{_count(values["tokens_per_s"])} tokens/s']
  if values.get('mfu') is not None:
    parts.append(f'MFU {100 * values["mfu"]:.1f}%')
  return f'step {step}: ' + '  '.join(parts) + f'  {progress}'


def moe_line(values: Mapping[str, float | None]) -> str | None:
  """The router statistics of an MoE model, on a second line (None for dense models)."""
  if 'moe/load_balancing_loss' not in values:
    return None
  return (f'  moe: balance {values["moe/load_balancing_loss"]:.4f}  z-loss '
          f'{values["moe/router_z_loss"]:.4f}  dropped {100 * values["moe/fraction_dropped"]:.1f}%'
          f'  load {100 * values["moe/expert_load_min"]:.1f}-'
          f'{100 * values["moe/expert_load_max"]:.1f}%  entropy '
          f'{values["moe/expert_load_entropy"]:.3f}' +
          (f' of {values["moe/expert_load_entropy_max"]:.3f}'
           if 'moe/expert_load_entropy_max' in values else ''))


def eval_lines(step: int, results: Mapping[str, float]) -> list[str]:
  """One line per eval task: `eval step N task: loss ... accuracy ... perplexity ...`, and for
  a task with answer choices its rank-classification accuracy."""
  tasks = sorted({key.rsplit('/', 1)[0] for key in results})
  return [f'eval step {step} {task}: loss {_fmt(results[f"{task}/loss"])}  accuracy '
          f'{results[f"{task}/accuracy"]:.4f}  perplexity {results[f"{task}/perplexity"]:.5g}  '
          f'({_count(results[f"{task}/num_tokens"])} tokens)' + _rank_part(results, task)
          for task in tasks]


def _rank_part(results: Mapping[str, float], task: str) -> str:
  if f'{task}/rank_accuracy' not in results:
    return ''
  return (f'  rank accuracy {results[f"{task}/rank_accuracy"]:.4f} '
          f'({results[f"{task}/num_examples"]:.0f} examples)')


def _count(value: float) -> str:
  return f'{value / 1e6:.2f}M' if value >= 1e6 else f'{value / 1e3:.1f}k' if value >= 1e4 else \
      f'{value:.0f}'


@contextlib.contextmanager
def phase(name: str):
  """A start-up phase on stdout: `name ...` as it begins and `name: 12.3 s` when it ends."""
  log(f'{name} ...')
  start = time.perf_counter()
  yield
  log(f'{name}: {time.perf_counter() - start:.1f} s')


class MetricWriter:
  """Scalars to TensorBoard event files and `metrics.jsonl` in `log_dir` (one JSON object per
  write: step, wall time, scalars), and the given lines to stdout. Process 0 only; the others
  are silent."""

  def __init__(self, log_dir: str | pathlib.Path | None, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    self._jsonl = None
    if self.enabled and log_dir is not None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(str(log_dir), flush_secs=30)
      self._jsonl = storage.as_path(log_dir) / 'metrics.jsonl'

  def write(self, step: int, scalars: Mapping[str, float | None],
            lines: Sequence[str | None] = ()) -> None:
    if not self.enabled:
      return
    for line in lines:
      if line is not None:
        print(line, flush=True)
    if self._writer is not None:
      for key, value in scalars.items():
        if value is not None and math.isfinite(value):
          self._writer.add_scalar(key, value, step)
    if self._jsonl is not None:
      record = {'step': step, 'time': round(time.time(), 3),
                **{k: v if v is None or math.isfinite(v) else str(v) for k, v in scalars.items()}}
      try:
        with self._jsonl.open('a') as f:
          f.write(json.dumps(record) + '\n')
      except OSError as e:  # a full disk: the checkpoint save reports it; metrics are secondary
        log(f'Cannot append to {self._jsonl} ({e}); metrics go to TensorBoard and stdout only.')
        self._jsonl = None

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    """Flushes and closes the event files; if they cannot be written (a full disk), says so in
    one line and abandons them, so that neither an error here nor tensorboardX's own exit hook
    and writer thread bury the error that stopped the run."""
    writer, self._writer = self._writer, None
    if writer is None:
      return
    try:
      writer.close()
    except OSError as e:
      log(f'TensorBoard events in {writer.logdir} could not be written ({e}); the last '
          'scalars are missing there.')
      for file_writer in (writer.all_writers or {}).values():
        events = file_writer.event_writer
        events._closed = True  # pylint: disable=protected-access  (no retry at exit)
        events._worker.stop()  # pylint: disable=protected-access


def _fmt(value: float | None) -> str:
  if value is None:
    return 'n/a'
  if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
    return f'{value:.3e}'
  return f'{value:.4f}'


def log(message: str) -> None:
  """A line on stdout from process 0."""
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)
