"""Feature converters: task features ('inputs', 'targets', ...) -> the model's batch features.

  'enc_dec'    seqio.EncDecFeatureConverter: encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens, decoder_loss_weights (+ packed: encoder/decoder_segment_ids,
               encoder/decoder_positions)
  'decoder'    WeightedLMFeatureConverter: decoder_input_tokens, decoder_target_tokens,
               decoder_loss_weights (+ packed: decoder_segment_ids, decoder_positions)
  'prefix_lm'  seqio.PrefixLMFeatureConverter: the decoder features plus decoder_causal_attention
               (inputs and targets concatenated; loss on the targets only)

`convert` applies one and makes every loss weight float32 (seqio's are int32). A task with answer
choices (choices.py) becomes one element per example, each choice a row of these features.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from efficientlm.data.tensorflow_cpu import tf  # first: TF quietly, with GPUs hidden
import seqio

from efficientlm.data import choices


LOSS_WEIGHTS = 'targets_loss_weights'
# seqio's packer keeps each feature's non-zero prefix, so weights are packed as integers
# round(w * _WEIGHT_SCALE) + 1, never 0 inside a sequence, and decoded after packing.
_WEIGHT_SCALE = 1024


class WeightedLMFeatureConverter(seqio.LMFeatureConverter):
  """Decoder-only LM features whose loss weights are the task's 'targets_loss_weights' when it
  has them (the synthetic tasks: weight only the answers), else 1 at every non-pad target.

  Weights are kept to 1/1024 through packing; binary weights are exact. Unpacked, it passes
  `passthrough_features` through (seqio's LMFeatureConverter does not).
  """

  MODEL_FEATURES = {**seqio.LMFeatureConverter.MODEL_FEATURES,
                    'decoder_loss_weights': seqio.FeatureConverter.FeatureSpec(dtype=tf.float32)}

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    lengths = dict(task_feature_lengths)
    weighted = LOSS_WEIGHTS in ds.element_spec
    if weighted:
      lengths[LOSS_WEIGHTS] = lengths['targets']
      ds = ds.map(_encode_weights, num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._pack_or_pad(ds, lengths)
    return ds.map(functools.partial(self._model_features, weighted=weighted),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def _model_features(self, features, weighted: bool):
    out = dict(self._convert_example(features))
    if weighted:
      encoded = tf.maximum(features[LOSS_WEIGHTS] - 1, 0)  # padding (0) -> weight 0
      out['decoder_loss_weights'] = tf.cast(encoded, tf.float32) / _WEIGHT_SCALE
    else:
      out['decoder_loss_weights'] = tf.cast(out['decoder_loss_weights'], tf.float32)
    out.update({k: features[k] for k in self._passthrough_features})
    return out

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    lengths.update({k: task_feature_lengths[k] for k in self._passthrough_features})
    return lengths


def _encode_weights(features):
  weights = features[LOSS_WEIGHTS][:tf.size(features['targets'])]  # the Task trimmed targets
  return {**features,
          LOSS_WEIGHTS: tf.cast(tf.round(weights * _WEIGHT_SCALE), tf.int32) + 1}


FEATURE_CONVERTERS: dict[str, type[seqio.FeatureConverter]] = {
    'enc_dec': seqio.EncDecFeatureConverter,
    'decoder': WeightedLMFeatureConverter,
    'prefix_lm': seqio.PrefixLMFeatureConverter,
}


def _converter_class(name: str) -> type[seqio.FeatureConverter]:
  if name not in FEATURE_CONVERTERS:
    raise ValueError(f'Unknown feature converter {name!r}; choose one of '
                     f'{sorted(FEATURE_CONVERTERS)}.')
  return FEATURE_CONVERTERS[name]


def make_feature_converter(name: str, pack: bool = True) -> seqio.FeatureConverter:
  return _converter_class(name)(pack=pack)


def convert(ds: tf.data.Dataset, name: str, task_feature_lengths: Mapping[str, int],
            pack: bool = True) -> tf.data.Dataset:
  """Model features of a task dataset: int32 tokens and ids, float32 loss weights."""
  if choices.has_choices(ds):
    ds = choices.convert(ds, _converter_class(name), name, task_feature_lengths, pack)
  else:
    ds = make_feature_converter(name, pack)(ds, task_feature_lengths=task_feature_lengths)
  return ds.map(lambda ex: {k: tf.cast(v, tf.float32) if k.endswith('loss_weights') else v
                            for k, v in ex.items()})
