"""Training metrics: model FLOPs and MFU, a progress line with ETA, stdout + TensorBoard output."""

from __future__ import annotations

import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence

import jax

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
  """Steps per second and ETA over the last logging window; a text bar for logs."""

  def __init__(self, first_step: int, total_steps: int, width: int = 20):
    self.total, self.width = total_steps, width
    self._last_step, self._last_time = first_step, time.perf_counter()

  def update(self, step: int) -> tuple[float, str]:
    """Returns (seconds per step since the last update, the progress text)."""
    now = time.perf_counter()
    step_time = (now - self._last_time) / max(step - self._last_step, 1)
    self._last_step, self._last_time = step, now
    done = int(self.width * step / max(self.total, 1))
    bar = '=' * done + ('>' if done < self.width else '') + ' ' * (self.width - done - 1)
    eta = format_duration(step_time * (self.total - step))
    return step_time, (f'[{bar[:self.width]}] {step}/{self.total} '
                       f'{100 * step / max(self.total, 1):3.0f}% ETA {eta}')


class MetricWriter:
  """Scalars to stdout and TensorBoard event files (process 0 only; others are silent)."""

  def __init__(self, log_dir: str | pathlib.Path | None, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._writer = None
    if self.enabled and log_dir is not None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._writer = SummaryWriter(str(log_dir), flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = '',
            text: str | None = None, stdout_keys: Sequence[str] | None = None) -> None:
    """All scalars to TensorBoard; to stdout those in `stdout_keys` (default: all)."""
    if not self.enabled:
      return
    keys = scalars if stdout_keys is None else [k for k in stdout_keys if k in scalars]
    shown = '  '.join(f'{k} {_fmt(scalars[k])}' for k in keys)
    print(f'{prefix}step {step}: {shown}' + (f'  {text}' if text else ''), flush=True)
    if self._writer is not None:
      for key, value in scalars.items():
        if value is not None and math.isfinite(value):
          self._writer.add_scalar(key, value, step)

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
