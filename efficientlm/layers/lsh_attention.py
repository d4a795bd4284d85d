"""Reformer LSH self-attention (Kitaev, Kaiser & Levskaya 2020, "Reformer", section 2, app. A).

Shared query/key. The caller passes qk [b, L, h, d] and v [b, L, h, dv] (same head count: no
grouped KV heads, since the keys ARE the queries). Per head, with q_i the qk vector of token i:

  keys        k_j = q_j / ||q_j||                        (section 2, "shared-QK")
  logits      s_ij = q_i . k_j                           (no 1/sqrt(d) here: the caller scales
                                                          qk, as dot_product_attention expects)
  hash        h_r(x) = argmax([x R_r ; -x R_r]),  R_r ~ N(0, 1)^[d, n_buckets/2]   (round r,
              angular LSH of Andoni et al. 2015 as in section 2; bucket in [0, n_buckets))
  sort        per round, tokens sorted stably by (bucket, position); s_r(i) = i's rank
  chunk       chunks of m = chunk_length sorted tokens; query i reads the keys of its own chunk
              and of the chunk before it (none before the first chunk):
              W_r(i) = {j : floor(s_r(i)/m) - 1 <= floor(s_r(j)/m) <= floor(s_r(i)/m)}
  candidates  P_r(i) = W_r(i) AND same bucket (paper eq. 3 masks keys of other buckets), or
              P_r(i) = W_r(i) with `attend_across_buckets=True` (what trax does)
  masks       key j is dropped (MASK_VALUE) unless it is valid (key_valid) and, if causal,
              pos(j) <= pos(i) by ORIGINAL positions; the self key gets the finite SELF_VALUE
              (-1e5, paper app. A), so i attends to itself only when nothing else is visible
  per round   z_r(i) = logsumexp_{j in P_r(i)} (s_ij - log N_ij),
              o_r(i) = sum_{j in P_r(i)} exp(s_ij - log N_ij - z_r(i)) v_j
  combine     o(i) = sum_r exp(z_r(i) - logsumexp_r' z_r'(i)) o_r(i)       (app. A; trax)

Duplicate correction (`count_duplicates`, default True): N_ij = |{r : j in P_r(i)}|, the number of
rounds in which i reads j, subtracted as log N_ij (the paper's m^(r)_ij = log N_ij, app. A).
With it the combination is exactly softmax attention over the union of the rounds' candidate
sets, each key counted once; without it (trax's choice) a key found in k rounds is weighted k
times. We count N over the attended sets P_r (windows), which is what makes that identity exact.

Choices and deviations (trax: trax/layers/research/efficient_attention.py, LSHSelfAttention):
- n_buckets: `num_buckets`, or None for the paper's 2 L / m (average bucket m/2, so a bucket
  rarely overflows two chunks; section 2). Must be even. trax factorizes the hash above 128
  buckets (two smaller rotations, bucket = product code); we always use one d x n_buckets/2
  rotation per round.
- Rotations are per head and per round, shared over the batch (trax draws per head and
  example). Round r is drawn from fold_in(rng, r), so the first R rounds of num_hashes = R + 1
  are those of num_hashes = R (rounds are nested; tests rely on it).
- The PRNG key is the caller's: training (like trax) should pass a fresh key per step (e.g.
  fold_in of a named stream with the step), evaluation a fixed one per layer
  (`eval_rng(config, layer)`, from `seed`), so eval losses are reproducible.
- Padding tokens (key_valid False) hash to an extra bucket n_buckets, so they sort after all
  valid tokens and do not take chunk slots from them (as trax), and they are never read as
  keys. Their own outputs are meaningless (ignore them).
- The first chunk has no previous chunk (trax wraps around to the last chunk of the
  concatenated rounds; we do not, so with one chunk no key is read twice).
- The self logit is set to SELF_VALUE rather than s_ii - 1e5 (same weights to fp32 precision).
- Causality: a query never reads a later key, but WHICH earlier keys share its chunk depends on
  the buckets of all tokens, later ones included (they shift the sort). So, unlike dense causal
  attention, outputs at positions <= t may change when qk after t changes (values after t
  never matter). This is inherent in the chunked scheme; decoding (below) drops the chunks.
- No dropout, no reversible/recomputed backward: memory is O(b h R L m) for the logits (and
  O(b h R^2 L m) for the duplicate counts), computed in float32.

Decoding with a cache (`lsh_decode_attention`; MultiHeadAttention's decode modes, as trax's
LSHSelfAttention in 'predict' mode). The cache keeps per slot j the shared qk vector q_j
(`cached_key`), v_j (`cached_value`) and its R bucket ids h_r(q_j) (`cached_buckets`
[b, slots, h, R]), so a step hashes only its own token. Token t (its entry written first) reads

  N_tj = |{r : h_r(q_j) = h_r(q_t)}|,   U(t) = {j <= t, j valid : N_tj >= 1}
  o(t) = sum_{j in U(t)} softmax_j(s_tj + c_tj) v_j,   s_tt := SELF_VALUE,
  c_tj = 0 with count_duplicates, log N_tj without.

This is the training-time combination above with each round's candidates P_r(t) = {j <= t :
h_r(q_j) = h_r(q_t)}, the query's WHOLE bucket among earlier tokens (the paper's P_i^(r) of
section 2 before chunking): sum_r exp(z_r - logsumexp z) o_r = sum_j N_tj exp(s_tj - c'_tj) v_j
/ sum_j N_tj exp(s_tj - c'_tj) with c' the training correction (log N_tj or 0), i.e. one
softmax over U(t) with logits s_tj + log N_tj - c'_tj. So with one chunk (chunk_length = L,
same number of buckets) training-time attention equals decoding exactly; with several chunks
training reads only the part of a bucket inside the query's sorted chunk and the previous one,
which decoding cannot reproduce (it depends on the sort of later tokens). The self key gets
SELF_VALUE as in training: token t reads itself only when nothing else in U(t) is visible (the
first token), or with weight ~exp(-1e5) otherwise. With count_duplicates this is what trax's
predict mode computes: one softmax over the keys that share the query's bucket in any round,
self masked the same way.

Deviations from trax's predict mode: trax reads at most R * m * (1 + n_chunks_before) of the most
recent bucket-sharing keys and, if fewer share a bucket, fills that budget with the most recent
non-sharing ones; we read the whole bucket and nothing else (the step's logits are a masked row
over the cache, O(slots) per head, like dense decoding). trax's prefill runs the chunked
training computation on the (padded) prompt; our prefill applies the decoding rule at every
prompt position, so a prompt's logits equal those of feeding it token by token and the prompt
need not be a multiple of chunk_length (cost: [P, P] masked logits per head).
`attend_across_buckets` does not apply to decoding (trax, which trains that way, also matches
buckets at decode). Rotations are the evaluation ones, `eval_rng(config, layer)`, with
`buckets_for(slots)` buckets: num_buckets None then depends on the cache length, so set
num_buckets to decode with exactly the training-time hash of a given length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from efficientlm.errors import ConfigError
from efficientlm.layers.attention import MASK_VALUE

# The self key's logit: large negative but far above MASK_VALUE, so a token whose candidates are
# all masked still attends to itself (paper app. A: 10^5), and never NaN.
SELF_VALUE = -1e5


@dataclasses.dataclass(frozen=True)
class LshConfig:
  """Reformer LSH attention: `num_hashes` rounds of angular LSH over chunks of `chunk_length`.

  num_buckets None derives the paper's 2 * length / chunk_length at call time.
  `seed` makes the fixed evaluation rotations (`eval_rng`).
  """

  num_hashes: int = 2
  chunk_length: int = 64
  num_buckets: int | None = None
  seed: int = 0
  attend_across_buckets: bool = False  # True: trax's P_r = whole window
  count_duplicates: bool = True  # the paper's log N_ij correction

  def __post_init__(self):
    for ok, message in self._static_checks():
      if not ok:
        raise ConfigError(f'LshConfig: {message}.')

  def _static_checks(self) -> list[tuple[bool, str]]:
    return [
        (self.num_hashes >= 1, f'num_hashes = {self.num_hashes}: use at least 1 hashing round'),
        (self.chunk_length >= 1, f'chunk_length = {self.chunk_length}: must be >= 1'),
        (self.num_buckets is None or (self.num_buckets >= 2 and self.num_buckets % 2 == 0),
         f'num_buckets = {self.num_buckets}: angular LSH takes argmax over [xR; -xR], so it '
         f'needs an even number >= 2 (or None for 2 * length / chunk_length)'),
    ]

  def validate(self, length: int, causal: bool) -> None:
    """Raises ValueError naming the field and the fix if this config cannot run `length` tokens.

    `causal` is accepted so callers validate the way they call; causal masking by original
    positions works with any chunking, so it adds no constraint.
    """
    del causal
    checks = self._static_checks() + [
        (length >= 1, f'length {length} must be >= 1'),
        (length % self.chunk_length == 0,
         f'chunk_length = {self.chunk_length} must divide the length {length}: pad the inputs '
         f'to a multiple of it or choose a divisor of {length}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f'LshConfig: {message}.')

  def buckets_for(self, length: int) -> int:
    """The number of buckets used for `length` tokens (the paper's 2 L / m when None)."""
    if self.num_buckets is not None:
      return self.num_buckets
    return 2 * max(1, length // self.chunk_length)


def eval_rng(config: LshConfig, layer: int = 0) -> jax.Array:
  """Fixed hashing key of one layer at evaluation: from `config.seed`, folded with the layer."""
  return jax.random.fold_in(jax.random.key(config.seed), layer)


def random_rotations(rng: jax.Array, num_heads: int, head_dim: int, num_hashes: int,
                     num_buckets: int) -> jax.Array:
  """Gaussian rotations [heads, rounds, head_dim, num_buckets / 2]; round r from fold_in(rng, r)."""
  rounds = [jax.random.normal(jax.random.fold_in(rng, r), (num_heads, head_dim, num_buckets // 2))
            for r in range(num_hashes)]
  return jnp.stack(rounds, axis=1)


def hash_buckets(qk: jax.Array, rotations: jax.Array,
                 key_valid: jax.Array | None = None) -> jax.Array:
  """Bucket ids int32 [b, h, rounds, L]: argmax([xR; -xR]); padding gets the extra id n_buckets."""
  rotated = jnp.einsum('blhd,hrdk->bhrlk', qk.astype(jnp.float32), rotations)
  buckets = jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)
  if key_valid is not None:
    buckets = jnp.where(key_valid[:, None, None, :], buckets, 2 * rotations.shape[-1])
  return buckets


def sort_order(buckets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(perm, inverse) [..., L]: positions sorted by (bucket, position), and each position's rank.

  inverse[perm] = arange(L): x[perm][inverse] == x. Sorting the combined key bucket * L + position makes the order stable by construction.
  """
  length = buckets.shape[-1]
  perm = jnp.argsort(buckets * length + jnp.arange(length, dtype=jnp.int32), axis=-1)
  inverse = jnp.argsort(perm, axis=-1)
  return perm.astype(jnp.int32), inverse.astype(jnp.int32)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [b, h, L, ...] at index [b, h, n] -> [b, h, n, ...]."""
  idx = index.reshape(index.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, idx, axis=2)


def _with_previous_chunk(x: jax.Array) -> jax.Array:
  """[b, h, R, nc, m, ...] -> [b, h, R, nc, 2m, ...]: the previous chunk (rolled), then own."""
  return jnp.concatenate([jnp.roll(x, 1, axis=3), x], axis=4)


def lsh_attention_with_rotations(qk: jax.Array,
                                 v: jax.Array,
                                 rotations: jax.Array,
                                 config: LshConfig,
                                 *,
                                 causal: bool = False,
                                 key_valid: jax.Array | None = None) -> jax.Array:
  """LSH attention with given rotations [h, R, d, n_buckets/2] (see the module docstring).

  qk [b, L, h, d]; v [b, L, h, dv]; key_valid bool [b, L] (False: padding, never read).
  Returns [b, L, h, dv] in v's dtype.
  """
  b, length, heads, depth = qk.shape
  config.validate(length, causal)
  n_buckets = config.buckets_for(length)
  rounds, m = config.num_hashes, config.chunk_length
  if v.shape[:3] != qk.shape[:3]:
    raise ValueError(f'LSH attention shares queries and keys: v {v.shape} must match qk '
                     f'{qk.shape} in batch, length and heads (no grouped KV heads).')
  if rotations.shape != (heads, rounds, depth, n_buckets // 2):
    raise ValueError(f'rotations {rotations.shape} != (heads, num_hashes, head_dim, '
                     f'num_buckets / 2) = {(heads, rounds, depth, n_buckets // 2)}.')
  if key_valid is None:
    key_valid = jnp.ones((b, length), bool)
  n_chunks = length // m

  buckets = jax.lax.stop_gradient(hash_buckets(qk, rotations, key_valid))  # [b, h, R, L]
  perm, inverse = sort_order(buckets)
  flat = perm.reshape(b, heads, rounds * length)  # every round's sorted token ids, concatenated

  def sorted_chunks(x):  # [b, h, L, ...] -> [b, h, R, nc, m, ...] in each round's sorted order
    return _gather(x, flat).reshape(b, heads, rounds, n_chunks, m, *x.shape[3:])

  q = jnp.swapaxes(qk, 1, 2).astype(jnp.float32)  # [b, h, L, d]
  keys = q * jax.lax.rsqrt(jnp.maximum(jnp.sum(q * q, -1, keepdims=True), 1e-12))
  valid = jnp.broadcast_to(key_valid[:, None, :], (b, heads, length))

  sq = sorted_chunks(q)
  sk, sv = (_with_previous_chunk(sorted_chunks(x)) for x in (keys, jnp.swapaxes(v, 1, 2)))
  q_pos = perm.reshape(b, heads, rounds, n_chunks, m)  # original positions, sorted
  k_pos = _with_previous_chunk(q_pos)
  k_valid = _with_previous_chunk(sorted_chunks(valid))
  # The rolled-in "previous" chunk of chunk 0 is the last one: not a neighbour, drop it.
  has_previous = jnp.arange(n_chunks) > 0
  in_window = jnp.concatenate([jnp.broadcast_to(has_previous[:, None], (n_chunks, m)),
                               jnp.ones((n_chunks, m), bool)], axis=1)  # [nc, 2m]
  candidate = in_window[:, None, :]
  if not config.attend_across_buckets:
    q_bucket = jnp.take_along_axis(buckets, perm, axis=-1).reshape(q_pos.shape)
    k_bucket = _with_previous_chunk(q_bucket)
    candidate = candidate & (q_bucket[..., :, None] == k_bucket[..., None, :])

  logits = jnp.einsum('bhrcqd,bhrckd->bhrcqk', sq, sk)
  logits = jnp.where(q_pos[..., :, None] == k_pos[..., None, :], SELF_VALUE, logits)
  allowed = candidate & k_valid[..., None, :]
  if causal:
    allowed &= k_pos[..., None, :] <= q_pos[..., :, None]
  if config.count_duplicates and rounds > 1:
    logits -= jnp.log(_duplicate_counts(inverse, buckets, flat, config, n_chunks))
  logits = jnp.where(allowed, logits, MASK_VALUE)

  lse = jax.nn.logsumexp(logits, axis=-1)  # [b, h, R, nc, m]
  probs = jnp.exp(logits - lse[..., None])
  out = jnp.einsum('bhrcqk,bhrckd->bhrcqd', probs, sv.astype(jnp.float32))
  # Unsort: sorted slot s_r(i) of round r holds token i's round-r result.
  out = out.reshape(b, heads, rounds, length, -1)
  lse = lse.reshape(b, heads, rounds, length)
  out = jnp.take_along_axis(out, inverse[..., None], axis=3)
  lse = jnp.take_along_axis(lse, inverse, axis=3)
  weights = jax.nn.softmax(lse, axis=2)  # exp(z_r - logsumexp_r z)
  combined = jnp.einsum('bhrl,bhrld->blhd', weights, out)
  return combined.astype(v.dtype)


def _duplicate_counts(inverse: jax.Array, buckets: jax.Array, flat: jax.Array,
                      config: LshConfig, n_chunks: int) -> jax.Array:
  """N_ij [b, h, R, nc, m, 2m]: in how many rounds r' query i reads key j (j in P_r'(i)).

  Membership in round r': chunk_r'(j) is chunk_r'(i) or the one before it (and, unless
  attend_across_buckets, the same bucket). Only entries where j is read in round r matter
  (the others are masked), and there N_ij >= 1.
  """
  b, heads, rounds, length = inverse.shape
  m = config.chunk_length
  chunk_of = jnp.moveaxis(inverse // m, 2, 3)  # [b, h, L, R']
  bucket_of = jnp.moveaxis(buckets, 2, 3)

  def per_round(x):  # [b, h, L, R'] -> [b, h, R, nc, m, R'] for the queries of each round
    return _gather(x, flat).reshape(b, heads, rounds, n_chunks, m, rounds)

  q_chunk, q_bucket = per_round(chunk_of), per_round(bucket_of)
  k_chunk, k_bucket = _with_previous_chunk(q_chunk), _with_previous_chunk(q_bucket)
  qc, kc = q_chunk[..., :, None, :], k_chunk[..., None, :, :]
  member = (kc == qc) | (kc == qc - 1)
  if not config.attend_across_buckets:
    member &= q_bucket[..., :, None, :] == k_bucket[..., None, :, :]
  return jnp.maximum(jnp.sum(member, axis=-1), 1).astype(jnp.float32)


def lsh_attention(qk: jax.Array,
                  v: jax.Array,
                  rng: jax.Array,
                  config: LshConfig,
                  *,
                  causal: bool = False,
                  key_valid: jax.Array | None = None) -> jax.Array:
  """LSH self-attention; the hash rotations are drawn from `rng` (see the module docstring).

  qk [b, L, h, d] (shared queries/keys), v [b, L, h, dv], key_valid bool [b, L]. Training: a
  fresh `rng` per step; evaluation: `eval_rng(config, layer)`. Returns [b, L, h, dv].
  """
  config.validate(qk.shape[1], causal)
  rotations = random_rotations(rng, qk.shape[2], qk.shape[3], config.num_hashes,
                               config.buckets_for(qk.shape[1]))
  return lsh_attention_with_rotations(qk, v, rotations, config, causal=causal,
                                      key_valid=key_valid)


def decode_rotations(config: LshConfig, layer: int, num_heads: int, head_dim: int,
                     slots: int) -> jax.Array:
  """The evaluation rotations of layer `layer` for a cache of `slots` tokens (decoding)."""
  return random_rotations(eval_rng(config, layer), num_heads, head_dim, config.num_hashes,
                          config.buckets_for(slots))


def token_buckets(qk: jax.Array, rotations: jax.Array) -> jax.Array:
  """Bucket ids int32 [b, L, h, rounds] of qk [b, L, h, d] (the cache's layout)."""
  return jnp.transpose(hash_buckets(qk, rotations), (0, 3, 1, 2))


def lsh_decode_attention(qk: jax.Array, keys: jax.Array, values: jax.Array,
                         q_buckets: jax.Array, k_buckets: jax.Array, q_positions: jax.Array,
                         k_positions: jax.Array, allowed: jax.Array,
                         config: LshConfig) -> jax.Array:
  """Decoding rule of the module docstring: each query reads the keys sharing its bucket in at
  least one round, in one softmax (rounds combined as in training).

  qk [b, q, h, d] (queries); keys [b, k, h, d] (cached qk, normalized here); values
  [b, k, h, dv]; q_buckets [b, q, h, R], k_buckets [b, k, h, R]; q_positions [b|1, q],
  k_positions [b|1, k] (equal positions: the self key); allowed bool [b|1, 1, q, k] (causal
  and valid keys). Returns [b, q, h, dv] in values' dtype.
  """
  q = qk.astype(jnp.float32)
  k = keys.astype(jnp.float32)
  k = k * jax.lax.rsqrt(jnp.maximum(jnp.sum(k * k, -1, keepdims=True), 1e-12))
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  qb, kb = jnp.swapaxes(q_buckets, 1, 2), jnp.swapaxes(k_buckets, 1, 2)  # [b, h, q|k, R]
  # One [b, h, q, k] comparison per round (R is small): no [.., R] temporary of the logits' size.
  counts = sum((qb[..., :, None, r] == kb[..., None, :, r]).astype(jnp.int32)
               for r in range(q_buckets.shape[-1]))
  is_self = q_positions[:, None, :, None] == k_positions[:, None, None, :]
  logits = jnp.where(is_self, SELF_VALUE, logits)
  if not config.count_duplicates:  # training weights a key found in N rounds N times
    logits += jnp.log(jnp.maximum(counts, 1).astype(jnp.float32))
  logits = jnp.where((counts > 0) & allowed, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs, values.astype(jnp.float32))
  return out.astype(values.dtype)
