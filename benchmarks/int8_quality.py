"""Quality of int8 weight-only quantization on a trained tiny model.

Evaluates a checkpoint of `runs/recall_tiny.gin` (`make train` writes one to runs/recall_tiny)
on the whole synthetic_recall eval split twice: with its float32 weights, and with every matmul
kernel quantized to int8 per output channel (efficientlm.inference.quantization) and
dequantized. Reports loss, recall accuracy, how often the argmax token agrees, the largest logit
difference, and the weight bytes of both.

  make train && python -m benchmarks.int8_quality [--checkpoint runs/recall_tiny]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import environment  # noqa: E402
from efficientlm import gin_config  # noqa: E402
from efficientlm.checkpoints.load import load_params  # noqa: E402
from efficientlm.inference import quantization  # noqa: E402
from efficientlm.training.data_source import make_eval_iterators  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', default='runs/recall_tiny')
  args = parser.parse_args()
  gin_config.parse(['runs/recall_tiny.gin'], ["MODEL_DIR = '/tmp/unused'"])
  model = gin_config.macro('MODEL')
  dataset = gin.query_parameter('trainer.train.eval_dataset').scoped_configurable_fn()
  iterators = make_eval_iterators(dataset, model.feature_converter)
  batches = [b for it in iterators.values() for b in it]
  spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  partitioner = gin_config.macro('PARTITIONER')
  abstract, _ = partitioner.abstract_params(model.param_initializer(spec), jax.random.key(0))
  step, params, _ = load_params(args.checkpoint, abstract)
  quantized = jax.jit(quantization.quantize_tree)(params)
  dequantized = quantization.dequantize_tree(quantized, jnp.float32)

  @jax.jit
  def evaluate(p, batch):
    logits = model.logits(p, batch)
    return model.loss_sums(p, batch), logits

  totals = {'float32': {}, 'int8': {}}
  agree = tokens = 0
  max_diff = max_logit = 0.0
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    weights = np.asarray(model._weights(batch))  # pylint: disable=protected-access
    outs = {}
    for name, p in (('float32', params), ('int8', dequantized)):
      sums, logits = jax.device_get(evaluate(p, batch))
      outs[name] = logits
      for k, v in sums.items():
        totals[name][k] = totals[name].get(k, 0.0) + float(v)
    same = np.argmax(outs['float32'], -1) == np.argmax(outs['int8'], -1)
    agree += float(np.sum(same * weights))
    tokens += float(np.sum(weights))
    max_logit = max(max_logit, float(np.max(np.abs(outs['float32']) * (weights[..., None] > 0))))
    max_diff = max(max_diff, float(np.max(np.abs(outs['float32'] - outs['int8']) *
                                          (weights[..., None] > 0))))
  results = {name: {'loss': t['cross_entropy'] / t['num_tokens'],
                    'accuracy': t['correct'] / t['num_tokens'], 'tokens': t['num_tokens']}
             for name, t in totals.items()}
  results['argmax_agreement'] = agree / tokens
  results['max_abs_logit_diff'] = max_diff
  results['max_abs_logit'] = max_logit
  results['weight_bytes'] = {'float32': quantization.weight_bytes(params),
                             'int8': quantization.weight_bytes(quantized)}
  results['relative_loss_change'] = results['int8']['loss'] / results['float32']['loss'] - 1
  config = {'checkpoint': args.checkpoint, 'step': step, 'gin': 'runs/recall_tiny.gin'}
  print(environment.write('int8_quality', config, results))
  for k, v in results.items():
    print(k, v)


if __name__ == '__main__':
  main()
