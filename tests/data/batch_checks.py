"""Invariants of model batches, checked row by row in plain numpy."""

import numpy as np


def segments(row: np.ndarray, segment_ids: np.ndarray) -> list[np.ndarray]:
  return [row[segment_ids == s] for s in range(1, segment_ids.max() + 1)]


def assert_packed(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> None:
  """Segments are numbered 1, 2, ... left to right, positions count from 0 in each, padding
  (segment 0) is only at the end and holds token 0, and no segment is empty."""
  for row, seg, pos in zip(tokens, segment_ids, positions):
    real = seg > 0
    assert real.any()
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any(), seg
    assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1), seg
    assert seg[0] == 1
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
    assert np.all(row[~real] == 0) and np.all(pos[~real] == 0)


def assert_shifted(inputs: np.ndarray, targets: np.ndarray, segment_ids: np.ndarray) -> None:
  """Decoder inputs are the targets shifted right by one within each segment, starting at 0."""
  for inp, tgt, seg in zip(inputs, targets, segment_ids):
    for i_seg, t_seg in zip(segments(inp, seg), segments(tgt, seg)):
      np.testing.assert_array_equal(i_seg, np.concatenate([[0], t_seg[:-1]]))
