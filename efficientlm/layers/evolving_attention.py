"""Evolving attention: each layer's attention logits mix with the previous layer's, then pass
through a residual 2-D convolution over the (query, key) plane (Wang et al., "Evolving Attention
with Residual Convolutions", ICML 2021, arXiv:2102.12895, Sec. 3).

Per example, A_i [heads, q, k] are layer i's pre-softmax logits (q k^T + bias, the query already
scaled as in attention.py). The paper's two steps, labelled here (E1) and (E2):

  (E1) residual over layers:  A_in^i = alpha * A^{i-1} + (1 - alpha) * A_i
  (E2) residual convolution:  A^i    = beta * CNN(A_in^i) + (1 - beta) * A_in^i
       attention:            softmax(A^i) V,   and A^i is what layer i + 1 receives as A^{i-1}.

CNN is one 2-D convolution with heads as channels (heads -> heads, kernel K x K, with a bias)
followed by ReLU. The first layer has no A^{i-1}: it attends with its own logits and passes them
on unchanged (no mixing, no convolution). alpha = 0.5, beta = 1.0 and K = 3 are the defaults of
the authors' released EA-AA-ResNet code (github.com/pkuyym/EvolvingAttention,
EAResnet50/official/resnet/resnet_model.py: ReLU, 3x3 'same' kernel, variance-scaling kernel
init, zero bias); the paper tunes alpha and beta per task. That code names the two weights the
other way round (its `beta` weighs the previous map, its `alpha` the convolution); here they
follow the paper's (E1)/(E2). Provenance: the stored copy of the paper reached only its abstract
here, so (E1)/(E2) and the defaults were read from that reference code, whose form matches them;
the paper's own equation numbers are not quoted.

Deviations (ours, for masked and causal language models; the released code has neither):
- Masks. Masked entries (future keys, padding, other segments) hold MASK_VALUE or arbitrary
  scores; a convolution would read them into valid neighbours. Both inputs of (E1) are zeroed
  where `mask` is False before mixing, the convolution reads only those zeros there, and its
  output is zeroed there again; softmax then sees MASK_VALUE at every masked entry. The map
  passed on holds 0 (not MASK_VALUE) at masked entries, so the next layer's (E1) stays finite.
  With right padding this equals running the unpadded sequence: zeroed padding entries look
  like the convolution's own zero border.
- Causal stacks. A K x K kernel reads only (q', k') with q-K+1 <= q' <= q and k-K+1 <= k' <= k
  (zero padding (K-1, 0) on both axes; the self tap is the kernel's last row and column). By
  induction over layers a valid entry (q', k' <= q') depends only on tokens <= q', and masked
  (future) entries are zeros, so position q never reads a later token. 'same' padding would
  read row q+1 and leak token q+1 into position q. Bidirectional stacks use 'same' padding
  (odd K), as the reference code does.
- Decoding one token at a time is not covered here (causal mode needs q_len == k_len): a step
  would need the previous K - 1 rows of every layer's A_in cached.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm.inference import quantization
from efficientlm.layers.attention import MASK_VALUE

ACTIVATIONS = ('relu', 'linear')
Evolve = Callable[[jax.Array, jax.Array | None, jax.Array | None], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class EvolvingAttentionConfig:
  """Evolving attention of one stack; see the module docstring for (E1) and (E2).

  alpha: weight of the previous layer's map in (E1); 0 ignores it.
  beta: weight of the convolution branch in (E2); 0 skips it.
  kernel_size: K of the K x K convolution over (query, key).
  activation: after the convolution: 'relu' (the paper's) or 'linear'.
  convolve_first_layer: also apply (E2) to the first layer's own logits (the reference code
    does not; the parameters exist in every layer either way, so scanned stacks stay uniform).
  """

  alpha: float = 0.5
  beta: float = 1.0
  kernel_size: int = 3
  activation: str = 'relu'
  convolve_first_layer: bool = False

  def __post_init__(self):
    self.validate()

  def validate(self, num_heads: int | None = None) -> None:
    """Raises ValueError naming the bad field and the fix."""
    checks = [
        (0.0 <= self.alpha <= 1.0, f'alpha {self.alpha} not in [0, 1]; it weighs the previous '
         "layer's logits in A_in = alpha * A_prev + (1 - alpha) * A"),
        (0.0 <= self.beta <= 1.0, f'beta {self.beta} not in [0, 1]; it weighs the convolution '
         'in beta * CNN(A_in) + (1 - beta) * A_in'),
        (isinstance(self.kernel_size, int) and self.kernel_size >= 1 and self.kernel_size % 2,
         f"kernel_size {self.kernel_size} must be a positive odd int (e.g. 3) so 'same' padding "
         'is centred'),
        (self.activation in ACTIVATIONS, f'activation {self.activation!r} not in {ACTIVATIONS}'),
        (num_heads is None or num_heads >= 1, f'num_heads must be >= 1, got {num_heads}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'EvolvingAttentionConfig: {message}.')


def attention_logits(query: jax.Array, key: jax.Array, bias: jax.Array | None = None,
                     float32_logits: bool = True) -> jax.Array:
  """A = q k^T + bias as [b, heads, q, k], query head h reading KV head h // (heads // kv_heads).

  query [b, q, heads, d]; key [b, k, kv_heads, d]; bias [b|1, heads|1, q, k]. No scaling (the
  caller scales the query), as in attention.dot_product_attention.
  """
  b, q_len, heads, depth = query.shape
  kv_heads = key.shape[2]
  if key.shape[0] != b or key.shape[3] != depth or heads % kv_heads:
    raise ValueError(f'Incompatible attention shapes: query {query.shape}, key {key.shape} '
                     '(query heads must be a multiple of KV heads).')
  grouped_q = query.reshape(b, q_len, kv_heads, heads // kv_heads, depth)
  if float32_logits:
    grouped_q, key = grouped_q.astype(jnp.float32), key.astype(jnp.float32)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', grouped_q, key).reshape(b, heads, q_len, -1)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  return logits


def attend(logits: jax.Array, value: jax.Array, mask: jax.Array | None = None,
           dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None) -> jax.Array:
  """softmax(logits, masked) V: logits [b, heads, q, k], value [b, k, kv_heads, d] ->
  [b, q, heads, d]; the softmax in float32, as attention.dot_product_attention does it."""
  b, heads, q_len, _ = logits.shape
  kv_heads, depth = value.shape[2], value.shape[3]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.asarray(MASK_VALUE, logits.dtype))
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0).astype(value.dtype)
  weights = weights.reshape(b, kv_heads, heads // kv_heads, q_len, -1)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', weights, value)
  return out.reshape(b, q_len, heads, depth)


class EvolvingLogits(nn.Module):
  """(E1) + (E2) on one layer's logits: (logits to softmax, logits to pass to the next layer).

  logits, previous: float [b, heads, q, k] (previous None in the first layer); mask: bool
  [b|1, 1|heads, q, k], True where attention is allowed. `has_previous`, a traced 0 or 1 with
  `previous` given (zeros in the first layer), selects between the two cases in one program:
  the form a scanned stack needs, where every layer is the same traced function. The first output holds MASK_VALUE at
  masked entries, the second 0 there (see the module docstring). `causal` picks the causal
  kernel footprint (q_len must equal k_len); the mask given is used as is (a prefix-LM mask
  stays bidirectional in its prefix), and without one future keys are masked.
  Parameters: conv kernel [K, K, heads, heads] (rows index query offsets, columns key offsets,
  then input and output head) and bias [heads]; tiny, so replicated (the 'conv_*' logical
  axes, which every partitioning rule set maps to no mesh axis).
  """

  config: EvolvingAttentionConfig
  num_heads: int
  causal: bool = False
  kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal')
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, logits: jax.Array, previous: jax.Array | None = None,
               mask: jax.Array | None = None,
               has_previous: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    cfg.validate(self.num_heads)
    if logits.ndim != 4 or logits.shape[1] != self.num_heads:
      raise ValueError(f'EvolvingLogits expects logits [batch, {self.num_heads} heads, q, k], '
                       f'got {logits.shape}.')
    if previous is not None and previous.shape != logits.shape:
      raise ValueError(f"The previous layer's logits {previous.shape} do not match this layer's "
                       f'{logits.shape}: evolving attention needs the same heads and lengths in '
                       'every layer of the stack.')
    q_len, k_len = logits.shape[2:]
    if self.causal and q_len != k_len:
      raise ValueError(f'Causal evolving attention needs q_len == k_len (self-attention over '
                       f'the whole sequence), got {q_len} and {k_len}; decoding steps are not '
                       'supported.')
    if self.causal and mask is None:  # the causal footprint relies on future keys being masked
      mask = jnp.tril(jnp.ones((q_len, k_len), bool))[None, None]
    k = cfg.kernel_size
    # Created in every layer, used or not, so all layers have the same parameter tree.
    replicated = ('conv_query', 'conv_key', 'conv_heads_in', 'conv_heads_out')
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, replicated),
                        (k, k, self.num_heads, self.num_heads), self.param_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ('conv_heads_out',)),
                      (self.num_heads,), self.param_dtype)

    def zero_masked(x):
      x = x.astype(jnp.float32)
      return x if mask is None else jnp.where(mask, x, 0.0)

    mixed = zero_masked(logits)
    if has_previous is None:
      alpha, beta = cfg.alpha, cfg.beta
    else:  # a traced 0/1: as previous=None (0) or as given (1), in one program
      if previous is None:
        raise ValueError('EvolvingLogits: has_previous needs the previous logits (zeros if none).')
      weight = jnp.asarray(has_previous, jnp.float32)
      alpha = cfg.alpha * weight
      beta = cfg.beta if cfg.convolve_first_layer else cfg.beta * weight
    if previous is not None:  # (E1)
      mixed = alpha * zero_masked(previous) + (1.0 - alpha) * mixed
    if previous is not None or cfg.convolve_first_layer:  # (E2)
      mixed = beta * self._cnn(mixed, kernel, bias) + (1.0 - beta) * mixed
      mixed = zero_masked(mixed)  # the bias and border taps must not revive masked entries
    to_softmax = mixed if mask is None else jnp.where(mask, mixed, MASK_VALUE)
    return to_softmax, mixed

  def _cnn(self, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    k = self.config.kernel_size
    # Causal: pad only before, on both axes, so out[q, j] reads x[q-K+1..q, j-K+1..j].
    padding = [(k - 1, 0)] * 2 if self.causal else [(k // 2, k // 2)] * 2
    kernel = quantization.as_float(kernel, jnp.float32)  # int8 when quantize_tree'd
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1),
                                     padding=padding,
                                     dimension_numbers=('NCHW', 'HWIO', 'NCHW'))
    y = y + bias.astype(jnp.float32)[None, :, None, None]
    return jax.nn.relu(y) if self.config.activation == 'relu' else y


def evolving_dot_product_attention(query: jax.Array,
                                   key: jax.Array,
                                   value: jax.Array,
                                   evolve: Evolve,
                                   previous_logits: jax.Array | None = None,
                                   mask: jax.Array | None = None,
                                   bias: jax.Array | None = None,
                                   dropout_rate: float = 0.0,
                                   dropout_rng: jax.Array | None = None,
                                   float32_logits: bool = True) -> tuple[jax.Array, jax.Array]:
  """Attention whose logits pass through `evolve` (an EvolvingLogits, bound in the caller).

  Shapes as attention.dot_product_attention: query [b, q, heads, d], key/value [b, k, kv_heads,
  d], mask bool [b|1, 1|heads, q, k], bias [b|1, heads|1, q, k]. Returns (output [b, q, heads,
  d], logits [b, heads, q, k] float32 to give the next layer as `previous_logits`).
  """
  if key.shape != value.shape:
    raise ValueError(f'key {key.shape} and value {value.shape} shapes differ.')
  logits = attention_logits(query, key, bias, float32_logits)
  to_softmax, passed_on = evolve(logits, previous_logits, mask)
  out = attend(to_softmax, value, mask, dropout_rate, dropout_rng)
  return out, passed_on
