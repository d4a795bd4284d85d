"""Masks on hand-built inputs."""

import numpy as np

from efficientlm.layers import masks


def test_decoder_mask_causal_padding_segments():
  targets = np.array([[5, 6, 7, 8, 0]])
  segments = np.array([[1, 1, 2, 2, 0]])
  got = np.asarray(masks.make_decoder_mask(targets, segments))[0, 0]
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(got, want)


def test_prefix_lm_mask():
  targets = np.array([[5, 6, 7, 8]])
  prefix = np.array([[1, 1, 0, 0]])  # positions 0 and 1 are the prefix
  got = np.asarray(masks.make_decoder_mask(targets, causal_attention=prefix))[0, 0]
  want = np.array([[1, 1, 0, 0],
                   [1, 1, 0, 0],
                   [1, 1, 1, 0],
                   [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(got, want)


def test_attention_and_segment_masks():
  q_valid, k_valid = np.array([[1, 1, 0]]) > 0, np.array([[1, 0]]) > 0
  np.testing.assert_array_equal(masks.make_attention_mask(q_valid, k_valid)[0, 0],
                                [[1, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(
      masks.make_segment_mask(np.array([[1, 2, 2]]), np.array([[2, 1]]))[0, 0],
      [[0, 1], [1, 0], [1, 0]])
  assert masks.combine_masks(None, None) is None
