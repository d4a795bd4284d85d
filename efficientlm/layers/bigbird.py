"""BigBird block-sparse self-attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer
Sequences"), the ITC variant: some of the sequence's own blocks are global.

The sequence of length L is cut into nb = L / B blocks of B tokens (the paper's "blockified"
attention, App. D). Query block i reads the key blocks
  S_i = G u W_i u R_i
  G   = {0, ..., g - 1}                  the global blocks (the first g blocks; ITC, Sec. 2)
  W_i = {j : |i - j| <= w}               the sliding window, w blocks each side
  R_i = r blocks drawn uniformly without replacement from the blocks not in G u W_i
and the global query blocks i < g read every key block. Within the visible keys it is ordinary
softmax attention per query token t (query head h, KV head h // (heads / kv_heads)):
  out_t = sum_{j in K_t} softmax_j(scale q_t . k_j + bias(j - t)) v_j,
  K_t = {tokens of the blocks S_{block(t)}} n {valid keys} (n {j <= t} if causal),
bias being the T5 relative-position bias table[h, bucket(j - t)] (Raffel et al. 2020) when given.

Causal (decoder-only) variant, not in the paper, which is bidirectional: every block set is cut
to the past, S_i n {j <= i}; random blocks are drawn among the past blocks not yet read (early
blocks get fewer where fewer are left), a global query block reads only its past, and the
token-level causal mask applies inside the diagonal block. So no output depends on a later token.

Where this deviates from the authors' code (google-research/bigbird core/attention.py):
- the global blocks are the first g blocks (their ITC code makes the first and the last block
  global); the window does not wrap around;
- random blocks are drawn per (seed, layer, KV head) by `kernels.block_sparse.bigbird_block_mask`
  (numpy, static): a checkpoint reproduces its pattern, layers and KV heads differ. The query
  heads of one KV group share their KV head's pattern (so grouped K/V are gathered once);
- the authors' "plan" that restricts random blocks of long sequences to a prefix is not done;
- a query that sees no key (all its visible keys are padding) outputs 0, not NaN.

Implementations (`bigbird_attention(implementation=...)`):
- 'xla': per KV head, a static list of the visible key blocks of each query block is gathered
  into [b, kv_heads, nb, V, B, d] (V = the most blocks any query block reads, shorter lists
  padded with masked slots), and the logits [b, kv_heads, group, nb, B, V * B] are computed in
  float32, with the causal, padding and bias terms built for the gathered blocks only. Memory is
  O(L V B) per head, never [L, L]. The bidirectional global query blocks (g B rows that read all
  L keys) are computed densely apart: O(g B L).
- 'pallas': `kernels.flash_attention` with the same block mask (one kernel call per KV head,
  block_q = block_k = B), which skips the unread blocks; padding goes in as segment ids.
Decoding with a KV cache is not supported here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from efficientlm.errors import ConfigError
from efficientlm.kernels.block_sparse import bigbird_block_mask
from efficientlm.kernels.flash_attention import RelativeBias, flash_attention
from efficientlm.layers.position import relative_position_bucket

IMPLEMENTATIONS = ('xla', 'pallas')


@dataclasses.dataclass(frozen=True)
class BigBirdConfig:
  """The BigBird pattern, in blocks of `block_size` tokens (defaults: BigBird-ITC base, but with
  one global block at the start instead of the first and the last).

  num_window_blocks: key blocks read on each side of the query's own block (w; 1 gives the
    paper's 3-block window). num_global_blocks: the first blocks, read by all and (bidirectional)
    reading all. num_random_blocks: extra key blocks per query block, drawn from seed, the layer
    index and the KV head.
  """

  block_size: int = 64
  num_window_blocks: int = 1
  num_global_blocks: int = 1
  num_random_blocks: int = 3
  seed: int = 0

  def __post_init__(self):
    checks = [
        (self.block_size >= 1, f'block_size must be >= 1, got {self.block_size}'),
        (self.num_window_blocks >= 0,
         f'num_window_blocks must be >= 0 (0: only the own block), got {self.num_window_blocks}'),
        (self.num_global_blocks >= 0,
         f'num_global_blocks must be >= 0, got {self.num_global_blocks}'),
        (self.num_random_blocks >= 0,
         f'num_random_blocks must be >= 0, got {self.num_random_blocks}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f'BigBirdConfig: {message}.')

  def min_blocks(self, causal: bool) -> int:
    """Fewest blocks for which a (middle / last) query block has room for its random blocks."""
    window = self.num_window_blocks * (1 if causal else 2) + 1
    return self.num_global_blocks + window + self.num_random_blocks

  def validate(self, length: int, causal: bool) -> int:
    """Raises ValueError naming the field and the fix if `length` cannot take the pattern;
    returns the number of blocks."""
    bs = self.block_size
    if length < 1 or length % bs:
      padded = -(-max(length, 1) // bs) * bs
      raise ConfigError(f'BigBirdConfig.block_size={bs} does not divide the sequence length '
                       f'{length}: pad the sequence to a multiple of it (e.g. {padded}) or choose '
                       f'a block_size that divides {length}.')
    blocks, need = length // bs, self.min_blocks(causal)
    if blocks < need:
      window = 'num_window_blocks + 1' if causal else '2 * num_window_blocks + 1'
      raise ConfigError(
          f'BigBirdConfig: length {length} has {blocks} blocks of block_size={bs}, but the '
          f'{"causal" if causal else "bidirectional"} pattern needs at least {need} '
          f'(num_global_blocks + {window} + num_random_blocks = {self.num_global_blocks} + '
          f'{need - self.num_global_blocks - self.num_random_blocks} + '
          f'{self.num_random_blocks}) so that random blocks are distinct from the window and '
          f'global ones; use longer sequences, a smaller block_size, fewer num_window_blocks / '
          f'num_global_blocks / num_random_blocks, or dense attention.')
    return blocks


@dataclasses.dataclass(frozen=True)
class BigBirdLayout:
  """The static pattern of one layer, per KV head, in the two forms the implementations take.

  block_mask: bool [kv_heads, nb, nb], query block i reads key block j (the kernels' form).
  indices, valid: int32 / bool [kv_heads, nb - dense_rows, V]: the key blocks each query block
    dense_rows.. reads, in increasing order, padded to V slots with masked (valid False) ones.
  dense_rows: leading query blocks that read every key (bidirectional global blocks), computed
    densely apart; 0 when causal (a causal global block reads its past, within V).
  """

  block_mask: np.ndarray
  indices: np.ndarray
  valid: np.ndarray
  dense_rows: int


@functools.lru_cache(maxsize=256)
def bigbird_layout(length: int, config: BigBirdConfig, *, causal: bool, layer_index: int,
                   num_kv_heads: int) -> BigBirdLayout:
  """The layout of layer `layer_index`; KV head h's random blocks come from (seed, layer, h)."""
  nb = config.validate(length, causal)
  masks = np.stack([
      bigbird_block_mask(nb, nb, window_blocks=config.num_window_blocks,
                         num_global=config.num_global_blocks,
                         num_random=config.num_random_blocks,
                         seed=(config.seed, layer_index, head), causal=causal)
      for head in range(num_kv_heads)])
  dense_rows = 0 if causal else config.num_global_blocks
  rows = masks[:, dense_rows:]
  slots = int(rows.sum(-1).max())
  indices = np.zeros(rows.shape[:2] + (slots,), np.int32)
  valid = np.zeros(indices.shape, bool)
  for head in range(num_kv_heads):
    for row in range(rows.shape[1]):
      read = np.flatnonzero(rows[head, row])
      indices[head, row, :read.size] = read
      valid[head, row, :read.size] = True
  for array in (masks, indices, valid):
    array.flags.writeable = False  # cached: shared by every caller
  return BigBirdLayout(masks, indices, valid, dense_rows)


def bigbird_dense_mask(length: int, config: BigBirdConfig, *, causal: bool, layer_index: int,
                       num_kv_heads: int) -> np.ndarray:
  """Bool [kv_heads, L, L], token level: query t may read key j (the pattern, and j <= t if
  causal). For references and tests; O(L^2), not for long sequences."""
  layout = bigbird_layout(length, config, causal=causal, layer_index=layer_index,
                          num_kv_heads=num_kv_heads)
  blocks = np.arange(length) // config.block_size
  mask = layout.block_mask[:, blocks[:, None], blocks[None, :]]
  if causal:
    mask = mask & np.tri(length, dtype=bool)
  return mask


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Float32 softmax over the last axis where `mask`; rows with nothing visible give 0."""
  logits = jnp.where(mask, logits, -jnp.inf)
  # Softmax is shift-invariant: the max only guards exp; a fully masked row has max -inf.
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0.0, 1.0, denom)


def _bias(rb: RelativeBias, relative: jax.Array, kv_heads: int) -> jax.Array:
  """T5 bias [kv_heads, group, *relative.shape[1:]] from key - query positions [kv_heads, ...]."""
  buckets = relative_position_bucket(relative, rb.bidirectional, rb.num_buckets, rb.max_distance)
  table = rb.table.astype(jnp.float32).reshape(kv_heads, -1, rb.num_buckets)
  return jax.vmap(lambda t, bucket: jnp.take(t, bucket, axis=1))(table, buckets)


def _dense_rows(q, k, v, rows: int, kv_valid, rb, scale: float):
  """The bidirectional global query tokens [0, rows) read every (valid) key: [b, rows, H, d]."""
  b, length, heads, depth = q.shape
  kv_heads = k.shape[2]
  qg = q[:, :rows].reshape(b, rows, kv_heads, heads // kv_heads, depth)
  logits = jnp.einsum('bqhgd,bkhd->bhgqk', qg, k, preferred_element_type=jnp.float32) * scale
  if rb is not None:
    relative = jnp.arange(length)[None, :] - jnp.arange(rows)[:, None]
    logits = logits + _bias(rb, jnp.broadcast_to(relative, (kv_heads, rows, length)), kv_heads)
  mask = jnp.ones((1, 1, 1, 1, length), bool)
  if kv_valid is not None:
    mask = kv_valid[:, None, None, None, :]
  weights = _masked_softmax(logits, mask).astype(v.dtype)
  out = jnp.einsum('bhgqk,bkhd->bqhgd', weights, v, preferred_element_type=jnp.float32)
  return out.reshape(b, rows, heads, depth)


def _xla(q, k, v, layout: BigBirdLayout, bs: int, causal: bool, kv_valid, rb, scale: float):
  b, length, heads, depth = q.shape
  kv_heads = k.shape[2]
  group, nb = heads // kv_heads, length // bs
  first = layout.dense_rows
  rows, slots = layout.indices.shape[1:]
  indices = jnp.asarray(layout.indices)
  head = np.arange(kv_heads)[:, None, None]

  def gather(x):  # [b, L, kv_heads, d] -> [b, kv_heads, rows, slots * bs, d]
    blocked = x.reshape(b, nb, bs, kv_heads, depth).transpose(0, 3, 1, 2, 4)
    return blocked[:, head, indices].reshape(b, kv_heads, rows, slots * bs, depth)

  qb = q.reshape(b, nb, bs, kv_heads, group, depth)[:, first:].transpose(0, 3, 4, 1, 2, 5)
  logits = jnp.einsum('bhgrqd,bhrkd->bhgrqk', qb, gather(k),
                      preferred_element_type=jnp.float32) * scale
  # Token positions of the gathered keys and of the queries: [kv_heads, rows, bs, slots * bs].
  k_pos = (indices[..., None] * bs + jnp.arange(bs)).reshape(kv_heads, rows, 1, slots * bs)
  q_pos = ((jnp.arange(rows) + first)[:, None] * bs + jnp.arange(bs))[None, :, :, None]
  mask = jnp.repeat(jnp.asarray(layout.valid), bs, axis=-1)[:, :, None, :]
  if causal:
    mask = mask & (k_pos <= q_pos)
  mask = mask[None, :, None]  # [1, kv_heads, 1, rows, bs|1, slots * bs]
  if kv_valid is not None:
    key_ok = kv_valid.reshape(b, nb, bs)[:, indices].reshape(b, kv_heads, 1, rows, 1, -1)
    mask = mask & key_ok
  if rb is not None:
    logits = logits + _bias(rb, jnp.broadcast_to(k_pos - q_pos, (kv_heads, rows, bs,
                                                                  slots * bs)), kv_heads)[None]
  weights = _masked_softmax(logits, mask).astype(v.dtype)
  out = jnp.einsum('bhgrqk,bhrkd->brqhgd', weights, gather(v),
                   preferred_element_type=jnp.float32).reshape(b, rows * bs, heads, depth)
  if first:
    out = jnp.concatenate([_dense_rows(q, k, v, first * bs, kv_valid, rb, scale), out], axis=1)
  return out.astype(q.dtype)


def _pallas(q, k, v, layout: BigBirdLayout, bs: int, causal: bool, kv_valid, rb, scale: float):
  """The flash kernels with each KV head's block mask (the kernel takes one mask for all heads,
  so one call per KV head and its query group)."""
  b, length, heads, _ = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  segment_ids = None
  if kv_valid is not None:  # every query id 1, valid keys 1, padding keys 0
    segment_ids = (jnp.ones((b, length), jnp.int32), kv_valid.astype(jnp.int32))
  outs = []
  for h in range(kv_heads):
    heads_h = slice(h * group, (h + 1) * group)
    rb_h = None if rb is None else dataclasses.replace(rb, table=rb.table[heads_h])
    outs.append(flash_attention(q[:, :, heads_h], k[:, :, h:h + 1], v[:, :, h:h + 1],
                                causal=causal, segment_ids=segment_ids, scale=scale,
                                implementation='pallas', block_q=bs, block_k=bs,
                                relative_bias=rb_h, block_mask=layout.block_mask[h]))
  return jnp.concatenate(outs, axis=2)


def _check(query, key, value, config, kv_valid, bias_table, implementation):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'bigbird_attention implementation={implementation!r}; choose from '
                     f'{IMPLEMENTATIONS}.')
  if query.ndim != 4 or key.shape != value.shape or key.ndim != 4:
    raise ValueError(f'bigbird_attention takes query [b, L, heads, d] and key, value [b, L, '
                     f'kv_heads, d]; got {query.shape}, {key.shape}, {value.shape}.')
  b, length, heads, depth = query.shape
  if key.shape[:2] != (b, length) or key.shape[3] != depth:
    raise ValueError(f'bigbird_attention is self-attention: key/value {key.shape} must share '
                     f'batch, length and head_dim with the query {query.shape}.')
  if heads % key.shape[2]:
    raise ValueError(f'{heads} query heads are not divisible by {key.shape[2]} KV heads.')
  if kv_valid is not None and tuple(kv_valid.shape) != (b, length):
    raise ValueError(f'kv_valid must be bool [batch, length] = {(b, length)}, got '
                     f'{tuple(kv_valid.shape)}.')
  if bias_table is not None:
    if not isinstance(bias_table, RelativeBias):
      raise TypeError(f'bias_table must be a kernels.flash_attention.RelativeBias, got '
                      f'{type(bias_table).__name__}.')
    if bias_table.table.shape != (heads, bias_table.num_buckets):
      raise ValueError(f'bias_table.table must be [heads={heads}, num_buckets='
                       f'{bias_table.num_buckets}], got {bias_table.table.shape}.')
  bs = config.block_size
  if implementation == 'pallas' and (bs < 16 or bs & (bs - 1)):
    raise ConfigError(f"BigBirdConfig.block_size={bs}: implementation='pallas' tiles the kernels "
                     f'with block_q = block_k = block_size, which must be a power of 2 >= 16 '
                     f"(e.g. 64); change block_size or use implementation='xla'.")


def bigbird_attention(query: jax.Array,
                      key: jax.Array,
                      value: jax.Array,
                      *,
                      config: BigBirdConfig,
                      causal: bool,
                      layer_index: int,
                      kv_valid: jax.Array | None = None,
                      bias_table: RelativeBias | None = None,
                      scale: float | None = None,
                      implementation: str = 'xla') -> jax.Array:
  """BigBird self-attention; returns [b, L, heads, d] in query.dtype.

  query [b, L, heads, d]; key, value [b, L, kv_heads, d], heads divisible by kv_heads (query head
  h reads KV head h // (heads / kv_heads) and that KV head's pattern).
  config: the pattern; `config.validate(L, causal)` must pass. layer_index: picks the layer's
    random blocks (with config.seed and the KV head).
  kv_valid: bool [b, L], False for padding keys (never read); a query whose visible keys are
    all padding outputs 0.
  bias_table: T5 relative-position bias, table [heads, buckets] plus its bucketing; query t and
    key j at positions t and j, bias table[h, bucket(j - t)], built for the visible blocks only.
  scale: logits multiplier; None means 1 (callers fold 1/sqrt(d) into the query, as T5 does).
  implementation: 'xla' (gathered blocks) or 'pallas' (block-sparse flash kernels; interpret
    mode off GPU/TPU).
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  kv_valid = None if kv_valid is None else jnp.asarray(kv_valid, bool)
  _check(query, key, value, config, kv_valid, bias_table, implementation)
  layout = bigbird_layout(query.shape[1], config, causal=causal, layer_index=layer_index,
                          num_kv_heads=key.shape[2])
  scale = 1.0 if scale is None else float(scale)
  run = _pallas if implementation == 'pallas' else _xla
  return run(query, key, value, layout, config.block_size, causal, kv_valid, bias_table, scale)
