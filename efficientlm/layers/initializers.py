"""Initializers of T5/T5X (facts from the T5X minimal T5 layers and flaxformer)."""

from flax.linen import initializers

# Projections: unit variance over fan-in.
default_kernel_init = initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
# Attention projections use an untruncated normal; T5 folds 1/sqrt(head_dim) into the query init.
attention_kernel_init = initializers.variance_scaling(1.0, 'fan_in', 'normal')
embedding_init = initializers.normal(stddev=1.0)
relpos_init = initializers.variance_scaling(1.0, 'fan_avg', 'uniform')


def scaled(init, factor: float):
  """`init` with its output multiplied by `factor`."""
  return lambda *args: init(*args) * factor
