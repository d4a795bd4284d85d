"""The Block-Recurrent Transformer layer (Hutchins, Schlag, Wu, Dyer, Neyshabur 2022,
"Block-Recurrent Transformers", NeurIPS 2022; code: google-research/meliad, transformer/memory/).

The sequence is cut into blocks of W tokens; the layer carries S state vectors c [S, E] from one
block to the next. It replaces the self-attention sub-layer of a pre-norm decoder layer: the
caller gives x = norm(residual) and adds the output back, then runs its own MLP.

Vertical direction (tokens of block j, x [W, E]). Keys and values are shared between the two
directions; each of the four attentions has its own queries.
  Q = x W_q, Q' = x W_q', K = x W_k, V = x W_v                                [W, H, d]
  A_self  = softmax(rot(Q) rot([K_{j-1}; K])^T + M) [V_{j-1}; V]   sliding window: token t reads
            the whole previous block and tokens <= t of its own (M: -inf elsewhere, and on the
            previous block at the start of a document)
  A_cross = softmax(Q' K_c^T) V_c                     the states from the end of block j-1
  y = [A_self; A_cross] W_o                           (concatenated over heads, one projection)

Horizontal direction (states, updated at the end of block j from the same block's tokens):
  n = rmsnorm(c) + P                                  P [S, E]: learned state position embeddings
  Q_c = n W_qc, Q_c' = n W_qc', K_c = n W_kc, V_c = n W_vc                     [S, H, d]
  h = [softmax(Q_c K_c^T) V_c ; softmax(Q_c' K^T) V]  state self-attention; states -> this block
  z = h W_z
  lstm gate:   i = sigmoid(h W_i + b_i - 1), f = sigmoid(h W_f + b_f + 1);  c' = c * f + z * i
  fixed gate:  g = sigmoid(b_g);  c' = c * g + z * (1 - g)
  state MLP (paper's 'dual'; 'skip' leaves it out), gated the same way from its hidden layer:
  u = relu(rmsnorm(c') W_1), z' = u W_2,  c'' = gate(u, c', z')
The first block of a document starts from a learned initial state c_0 [S, E] and an empty window.
rot() is rotary (Su et al. 2021) at the slots of the 2W-token window (the previous block at
0..W-1, this block at W..2W-1): the same relative offsets as absolute positions, so whole
sequences read no `q_positions`; a decoding step takes its block slot from them. rmsnorm is
meliad's LayerNorm without mean or bias; float32 for softmax, gates and the states.

Whole sequences (decode None) scan the L/W blocks; gradients flow through the blocks of a call.
Training on consecutive segments of a document stream: collection 'recurrent' (per layer
`started` [b], `state` [b, S, E], `window_keys` / `window_values` [b, W, H, d]). A caller that
passes it mutable continues rows with started == 1 from it (under stop_gradient: truncated
backprop across calls, as the paper) and starts rows with started == 0 fresh; zeroing a row's
leaves resets it. Absent and immutable: every row starts fresh, nothing is written.
Decoding (collection 'cache', as layers/h3.py): `state`, `window_keys` / `window_values`
[b, 2W, H, d] (the previous block, then the current one as far as it is fed) and `length` [b];
a step whose token completes a block updates the states from it, exactly as the scan does.

Deviations from the paper and its code, and why:
- Queries and keys are not L2-normalized with a learned temperature (meliad's default); the
  1/sqrt(d) scale is folded into the query initialization, as every attention in this project.
- Positions: rotary or none (the project's models use rotary) instead of the paper's T5
  relative bias; a `bias` argument is ignored. The state attentions have no token positions.
- The states read the W tokens of the current block (the paper's description); meliad's code
  lets them read the whole 2W window. Each token reads itself and the whole previous block
  (meliad masks the token itself and reads exactly the W previous tokens).
- No projection biases (b_z; as meliad's code and T5) and no dropout. Of the paper's gate
  configurations, 'dual' (state_mlp=True) and 'skip' (False); 'single' is not offered.
- `mask` is not read in whole-sequence mode: attention is causal, so right padding cannot reach
  a real token (the stacks refuse packed and prefix-LM inputs for whole-row mixers).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.layers import initializers, ssm
from efficientlm.layers.attention import MASK_VALUE
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.position import apply_rotary

GATES = ('lstm', 'fixed')
DECODE_MODES = (None, 'init', 'prefill', 'step')
RECURRENT = 'recurrent'  # the collection that carries state across calls
_RMS_EPSILON = 1e-6
# Gates start small (meliad): weights at 0.1 of the usual variance, biases N(0, 0.1).
_gate_kernel_init = nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
_gate_bias_init = nn.initializers.normal(0.1)


@dataclasses.dataclass(frozen=True)
class BlockRecurrentConfig:
  """A block-recurrent layer; see the module docstring."""

  block_size: int = 64  # W tokens per block
  num_states: int = 64  # S state vectors
  gate: str = 'lstm'  # 'lstm' or 'fixed'
  # False: the same layer without state (sliding-window attention over blocks, the previous
  # block's keys cached): the paper's baseline.
  recurrent: bool = True
  state_mlp: bool = True  # the states' MLP and its gate ('dual'); False: 'skip'
  state_mlp_dim: int | None = None  # hidden units of the state MLP; None: 4 x emb_dim
  rotary: bool = True  # rotary positions for the token window; False: no positions
  rotary_max_wavelength: float = 10_000.0
  initial_state_stddev: float = 0.1  # of the learned initial state (meliad)

  def __post_init__(self):
    checks = [
        (self.block_size >= 1, f'block_size must be >= 1, got {self.block_size}'),
        (self.num_states >= 1, f'num_states must be >= 1, got {self.num_states}'),
        (self.gate in GATES, f'gate {self.gate!r} is not one of {GATES}'),
        (self.state_mlp_dim is None or self.state_mlp_dim >= 1,
         f'state_mlp_dim must be None (4 x emb_dim) or >= 1, got {self.state_mlp_dim}'),
        (self.rotary_max_wavelength > 0,
         f'rotary_max_wavelength must be > 0, got {self.rotary_max_wavelength}'),
        (self.initial_state_stddev >= 0,
         f'initial_state_stddev must be >= 0, got {self.initial_state_stddev}'),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'BlockRecurrentConfig: {message}.')


# --- the math, on plain arrays (shared by the scan, the decoding step and the tests) ------------
# Token and state tensors per head: [b, n, H, d]. States c [b, S, E] float32. `w`: the state
# weights (StateWeights' dict).


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T) v per head in float32: q [b, n, H, d], k, v [b, m, H, d], mask [b|1, n, m]."""
  logits = jnp.einsum('bnhd,bmhd->bhnm', q.astype(jnp.float32), k.astype(jnp.float32))
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, MASK_VALUE)
  return jnp.einsum('bhnm,bmhd->bnhd', jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))


def window_attention(q: jax.Array, q_slots: jax.Array, keys: jax.Array, values: jax.Array,
                     previous_valid: jax.Array, config: BlockRecurrentConfig) -> jax.Array:
  """Tokens at window slots q_slots [b|1, n] (W..2W-1) read the window keys/values [b, 2W, H, d]:
  slots <= their own, the previous block's (0..W-1) only where previous_valid [b]."""
  width = keys.shape[1]
  slots = jnp.arange(width)
  if config.rotary:
    q = apply_rotary(q, q_slots, config.rotary_max_wavelength)
    keys = apply_rotary(keys, slots[None], config.rotary_max_wavelength)
  mask = jnp.logical_and(slots[None, None, :] <= q_slots[:, :, None],
                         jnp.logical_or(previous_valid[:, None, None],
                                        slots[None, None, :] >= config.block_size))
  return attend(q, keys, values, mask)


def _dense(x: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  return jnp.asarray(x, dtype) @ jnp.asarray(kernel, dtype)


def _rmsnorm(x: jax.Array, scale: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + _RMS_EPSILON) * scale


def state_qkv(w: dict, c: jax.Array, num_heads: int, dtype) -> dict:
  """The states' queries (self, to tokens) and their keys/values, [b, S, H, d] each."""
  n = _rmsnorm(c, w['attention_norm_scale']) + w['position_embedding'].astype(jnp.float32)
  out = {}
  for name in ('query', 'query_to_tokens', 'key', 'value'):
    y = _dense(n, w[name], dtype)
    out[name] = y.reshape(y.shape[:-1] + (num_heads, -1))
  return out


def _gate(w: dict, prefix: str, h: jax.Array, state: jax.Array, z: jax.Array, gate: str,
          dtype) -> jax.Array:
  """c * f + z * i (lstm; gates from h) or c * g + z * (1 - g) (fixed), in float32."""
  z = z.astype(jnp.float32)
  if gate == 'lstm':
    i = jax.nn.sigmoid(_dense(h, w[prefix + 'input_gate_kernel'], dtype).astype(jnp.float32) +
                       w[prefix + 'input_gate_bias'] - 1.0)
    f = jax.nn.sigmoid(_dense(h, w[prefix + 'forget_gate_kernel'], dtype).astype(jnp.float32) +
                       w[prefix + 'forget_gate_bias'] + 1.0)
    return state * f + z * i
  g = jax.nn.sigmoid(w[prefix + 'gate_bias'].astype(jnp.float32))
  return state * g + z * (1.0 - g)


def state_update(w: dict, c: jax.Array, s: dict, block_keys: jax.Array, block_values: jax.Array,
                 config: BlockRecurrentConfig, dtype) -> jax.Array:
  """The states after a block: c [b, S, E], s = state_qkv(c), the block's token keys/values
  [b, W, H, d] (unrotated) -> c'' [b, S, E] float32."""
  b, num_states = c.shape[:2]
  h = jnp.concatenate([attend(s['query'], s['key'], s['value']),
                       attend(s['query_to_tokens'], block_keys, block_values)], axis=2)
  h = h.reshape(b, num_states, -1)
  c = _gate(w, '', h, c, _dense(h, w['projection'], dtype), config.gate, dtype)
  if not config.state_mlp:
    return c
  u = jax.nn.relu(_dense(_rmsnorm(c, w['mlp_norm_scale']), w['mlp_wi'], dtype))
  return _gate(w, 'mlp_', u, c, _dense(u, w['mlp_wo'], dtype), config.gate, dtype)


def scan_blocks(w: dict | None, q: jax.Array, q_states: jax.Array | None, k: jax.Array,
                v: jax.Array, c0: jax.Array | None, previous: tuple[jax.Array, jax.Array],
                previous_valid: jax.Array, config: BlockRecurrentConfig, num_heads: int, dtype,
                update_until: jax.Array | None = None):
  """The blocks of q, k, v [b, L, H, d] (L = n W) in order. Returns (attention outputs
  [b, L, H or 2H, d] in `dtype`: [A_self; A_cross] per token, final states, last block's keys
  and values). `update_until` [b]: rows keep their states once a block ends past it (prefill)."""
  b, length = q.shape[:2]
  block = config.block_size
  blocks = length // block

  def split(x):
    return None if x is None else jnp.swapaxes(x.reshape((b, blocks, block) + x.shape[2:]), 0, 1)

  q_slots = (block + jnp.arange(block))[None]

  def body(carry, xs):
    c, prev_k, prev_v, prev_valid = carry
    qj, q2j, kj, vj, j = xs
    keys, values = jnp.concatenate([prev_k, kj], 1), jnp.concatenate([prev_v, vj], 1)
    out = window_attention(qj, q_slots, keys, values, prev_valid, config)
    if config.recurrent:
      s = state_qkv(w, c, num_heads, dtype)
      out = jnp.concatenate([out, attend(q2j, s['key'], s['value'])], axis=2)
      c_next = state_update(w, c, s, kj, vj, config, dtype)
      if update_until is not None:
        c_next = jnp.where(((j + 1) * block <= update_until)[:, None, None], c_next, c)
      c = c_next
    return (c, kj, vj, jnp.ones_like(prev_valid)), out.astype(dtype)

  xs = (split(q), split(q_states), split(k), split(v), jnp.arange(blocks))
  (c, last_k, last_v, _), out = jax.lax.scan(body, (c0,) + tuple(previous) + (previous_valid,), xs)
  out = jnp.swapaxes(out, 0, 1)
  return out.reshape((b, length) + out.shape[3:]), c, last_k, last_v


# --- modules --------------------------------------------------------------------------------------


class StateWeights(nn.Module):
  """The horizontal direction's parameters, returned as arrays (the scan body is plain jnp)."""

  config: BlockRecurrentConfig
  num_heads: int
  head_dim: int
  emb_dim: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> dict:
    cfg, e, inner = self.config, self.emb_dim, self.num_heads * self.head_dim
    mlp = cfg.state_mlp_dim or 4 * e

    def param(name, init, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

    query_init = initializers.scaled(initializers.attention_kernel_init, self.head_dim**-0.5)
    w = {
        'initial_state': param('initial_state', nn.initializers.normal(cfg.initial_state_stddev),
                               (cfg.num_states, e), (None, 'embed')),
        'position_embedding': param('position_embedding', nn.initializers.normal(1.0),
                                    (cfg.num_states, e), (None, 'embed')),
        'attention_norm_scale': param('attention_norm_scale', nn.initializers.ones, (e,),
                                      ('embed',)),
        'projection': param('projection', initializers.default_kernel_init, (2 * inner, e),
                            ('joined_kv', 'embed')),
    }
    for name in ('query', 'query_to_tokens', 'key', 'value'):
      init = query_init if name.startswith('query') else initializers.attention_kernel_init
      w[name] = param(name, init, (e, inner), ('embed', 'joined_kv'))
    gates = [('', 2 * inner, 'joined_kv')]
    if cfg.state_mlp:
      w['mlp_norm_scale'] = param('mlp_norm_scale', nn.initializers.ones, (e,), ('embed',))
      w['mlp_wi'] = param('mlp_wi', initializers.default_kernel_init, (e, mlp), ('embed', 'mlp'))
      w['mlp_wo'] = param('mlp_wo', initializers.default_kernel_init, (mlp, e), ('mlp', 'embed'))
      gates.append(('mlp_', mlp, 'mlp'))
    for prefix, fan_in, axis in gates:
      if cfg.gate == 'lstm':
        for which in ('input', 'forget'):
          w[f'{prefix}{which}_gate_kernel'] = param(f'{prefix}{which}_gate_kernel',
                                                    _gate_kernel_init, (fan_in, e),
                                                    (axis, 'embed'))
          w[f'{prefix}{which}_gate_bias'] = param(f'{prefix}{which}_gate_bias', _gate_bias_init,
                                                  (e,), ('embed',))
      else:
        w[f'{prefix}gate_bias'] = param(f'{prefix}gate_bias', _gate_bias_init, (e,), ('embed',))
    return w


class BlockRecurrent(nn.Module):
  """Called like MultiHeadAttention (self-attention arguments). `decode`: None (whole sequences,
  L a multiple of block_size), 'init' (create the cache), 'prefill' (right-padded prompts,
  lengths from `mask`) or 'step' (one token per row at q_positions [b, 1])."""

  config: BlockRecurrentConfig
  num_heads: int
  head_dim: int
  decode: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, bias=None, q_positions=None,
               kv_positions=None, deterministic=True):
    del inputs_kv, bias, kv_positions, deterministic  # self-mixing; no relative bias, no dropout
    cfg = self.config
    if self.decode not in DECODE_MODES:
      raise ValueError(f'BlockRecurrent: decode = {self.decode!r}; choose from {DECODE_MODES}.')
    emb = inputs_q.shape[-1]
    length = inputs_q.shape[1]
    if self.decode is None and self.is_initializing() and length % cfg.block_size:
      # Parameter shapes do not depend on the length: whatever length a caller initializes
      # with (inference and upcycling use short dummies), initialize on a padded row.
      inputs_q = jnp.pad(inputs_q, ((0, 0), (0, -length % cfg.block_size), (0, 0)))

    def project(name, init=initializers.attention_kernel_init):
      y = DenseGeneral((self.num_heads, self.head_dim), ('embed', 'joined_kv'), kernel_init=init,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)(inputs_q)
      return partitioning.constrain(y, ('batch', 'length', 'heads', 'kv'))

    query_init = initializers.scaled(initializers.attention_kernel_init, self.head_dim**-0.5)
    q, k, v = project('query', query_init), project('key'), project('value')
    q_states, w = None, None
    if cfg.recurrent:
      q_states = project('query_to_states', query_init)
      w = StateWeights(cfg, self.num_heads, self.head_dim, emb, self.param_dtype,
                       name='states')()
    if self.decode == 'step':
      y = self._step(w, q, q_states, k, v, q_positions, emb)
    elif self.decode is None:
      y = self._sequence(w, q, q_states, k, v)
    else:
      y = self._prefill(w, q, q_states, k, v, mask, emb)
    out = DenseGeneral(emb, ('joined_kv', 'embed'), axis=(-2, -1),
                       kernel_init=initializers.attention_kernel_init, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='out')(y)
    return partitioning.constrain(out[:, :length], ('batch', 'length', 'embed'))

  def _initial_states(self, w, batch):
    return jnp.broadcast_to(w['initial_state'].astype(jnp.float32),
                            (batch,) + w['initial_state'].shape)

  def _sequence(self, w, q, q_states, k, v):
    """Whole sequences, continuing from the 'recurrent' collection when given (docstring)."""
    cfg = self.config
    b, length = q.shape[:2]
    if length % cfg.block_size:
      raise ValueError(f'BlockRecurrent: the sequence length {length} is not a multiple of '
                       f'block_size {cfg.block_size}; pad or cut sequences (segments) to a '
                       'multiple of BlockRecurrentConfig.block_size, or choose a block_size '
                       'that divides it.')
    window_shape = (b, cfg.block_size) + k.shape[2:]
    use = self.is_mutable_collection(RECURRENT) or self.has_variable(RECURRENT, 'started')
    c0 = self._initial_states(w, b) if cfg.recurrent else None
    previous = (jnp.zeros(window_shape, k.dtype), jnp.zeros(window_shape, v.dtype))
    started = jnp.zeros((b,), bool)
    if use:
      variables = {
          'started': self.variable(RECURRENT, 'started', jnp.zeros, (b,), jnp.float32),
          'window_keys': self.variable(RECURRENT, 'window_keys', jnp.zeros, window_shape,
                                       k.dtype),
          'window_values': self.variable(RECURRENT, 'window_values', jnp.zeros, window_shape,
                                         v.dtype)}
      if cfg.recurrent:
        variables['state'] = self.variable(RECURRENT, 'state', jnp.zeros, c0.shape, jnp.float32)
      # Truncated backprop across calls: the stored window and state are constants here.
      started = variables['started'].value > 0
      previous = tuple(
          jnp.where(started[:, None, None, None],
                    jax.lax.stop_gradient(variables[name].value).astype(x.dtype), 0)
          for name, x in (('window_keys', k), ('window_values', v)))
      if cfg.recurrent:
        c0 = jnp.where(started[:, None, None], jax.lax.stop_gradient(variables['state'].value),
                       c0)
    y, c, last_k, last_v = scan_blocks(w, q, q_states, k, v, c0, previous, started, cfg,
                                       self.num_heads, self.dtype)
    if use and self.is_mutable_collection(RECURRENT) and not self.is_initializing():
      variables['started'].value = jnp.ones((b,), jnp.float32)
      variables['window_keys'].value, variables['window_values'].value = last_k, last_v
      if cfg.recurrent:
        variables['state'].value = c
    return y

  def _cache(self, name, shape, dtype):
    if self.decode != 'init' and not self.has_variable('cache', name):
      raise ValueError(f"{self.name}: decode={self.decode!r} needs a decoding cache; create it "
                       "with decode='init' (efficientlm.inference.kv_cache.init_cache) first.")
    return self.variable('cache', name, jnp.zeros, shape, dtype)

  def _cache_variables(self, b, k, v, emb):
    cfg = self.config
    window = (b, 2 * cfg.block_size) + k.shape[2:]
    cache = {'window_keys': self._cache('window_keys', window, k.dtype),
             'window_values': self._cache('window_values', window, v.dtype),
             'length': self._cache('length', (b,), jnp.int32)}
    if cfg.recurrent:
      cache['state'] = self._cache('state', (b, cfg.num_states, emb), jnp.float32)
    return cache

  def _prefill(self, w, q, q_states, k, v, mask, emb):
    """'init' and 'prefill': the scan over the prompt padded to whole blocks; 'prefill' leaves
    each row's cache as after its own prompt (ssm.prompt_lengths(mask) tokens)."""
    cfg, block = self.config, self.config.block_size
    b, length = q.shape[:2]
    cache = self._cache_variables(b, k, v, emb)
    padded = -(-length // block) * block

    def pad(x):
      return None if x is None else jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0)))

    lengths = ssm.prompt_lengths(mask) if self.decode == 'prefill' else None
    window_shape = (b, block) + k.shape[2:]
    c0 = self._initial_states(w, b) if cfg.recurrent else None
    previous = (jnp.zeros(window_shape, k.dtype), jnp.zeros(window_shape, v.dtype))
    y, c, _, _ = scan_blocks(w, pad(q), pad(q_states), pad(k), pad(v), c0, previous,
                             jnp.zeros((b,), bool), cfg, self.num_heads, self.dtype,
                             update_until=lengths)
    if self.decode == 'prefill':
      # The window: the last complete block (zeros if none), then the partial block after it.
      start = (lengths // block) * block
      slot_position = start[:, None] - block + jnp.arange(2 * block)[None]  # token of each slot
      keep = ((slot_position >= 0) & (slot_position < lengths[:, None]))[:, :, None, None]
      for name, x in (('window_keys', k), ('window_values', v)):
        x = jnp.pad(pad(x), ((0, 0), (block, block), (0, 0), (0, 0)))
        window = jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, 2 * block))(x, start)
        cache[name].value = jnp.where(keep, window, 0).astype(cache[name].value.dtype)
      cache['length'].value = lengths
      if cfg.recurrent:
        cache['state'].value = c
    return y[:, :length]

  def _step(self, w, q, q_states, k, v, q_positions, emb):
    """One token per row: window attention at its slot, cross-attention to the states; a token
    that completes its block updates the states from it and shifts the window."""
    cfg, block = self.config, self.config.block_size
    b, length = q.shape[:2]
    if length != 1:
      raise ValueError(f"BlockRecurrent: decode='step' takes one token per row, got {length}.")
    cache = self._cache_variables(b, k, v, emb)
    position = (cache['length'].value if q_positions is None else
                jnp.asarray(q_positions)[:, 0].astype(jnp.int32))
    t, block_index = position % block, position // block
    here = (jnp.arange(2 * block)[None] == (block + t)[:, None])[:, :, None, None]
    keys = jnp.where(here, k.astype(cache['window_keys'].value.dtype), cache['window_keys'].value)
    values = jnp.where(here, v.astype(cache['window_values'].value.dtype),
                       cache['window_values'].value)
    y = window_attention(q, (block + t)[:, None], keys, values, block_index >= 1, cfg)
    completes = t == block - 1
    if cfg.recurrent:
      # A document's first block reads the learned initial state (also right after 'init').
      c = jnp.where((block_index == 0)[:, None, None], self._initial_states(w, b),
                    cache['state'].value)
      s = state_qkv(w, c, self.num_heads, self.dtype)
      y = jnp.concatenate([y, attend(q_states, s['key'], s['value'])], axis=2)
      updated = jax.lax.cond(
          jnp.any(completes),
          lambda: state_update(w, c, s, keys[:, block:], values[:, block:], cfg, self.dtype),
          lambda: c)
      cache['state'].value = jnp.where(completes[:, None, None], updated, c)
    shift = completes[:, None, None, None]
    for name, x in (('window_keys', keys), ('window_values', values)):
      cache[name].value = jnp.where(
          shift, jnp.concatenate([x[:, block:], jnp.zeros_like(x[:, block:])], 1), x)
    cache['length'].value = position + 1
    return y.astype(self.dtype)


def parameter_count(config: BlockRecurrentConfig, emb_dim: int, num_heads: int,
                    head_dim: int) -> int:
  """Weights of one layer: token projections (q, q to states, k, v, out) and the state cell."""
  inner = num_heads * head_dim
  if not config.recurrent:
    return 4 * emb_dim * inner
  mlp = config.state_mlp_dim or 4 * emb_dim
  gate = (lambda fan_in: 2 * (fan_in * emb_dim + emb_dim)) if config.gate == 'lstm' else (
      lambda fan_in: emb_dim)
  tokens = 4 * emb_dim * inner + 2 * inner * emb_dim
  states = (2 * config.num_states * emb_dim + emb_dim + 4 * emb_dim * inner +
            2 * inner * emb_dim + gate(2 * inner))
  if config.state_mlp:
    states += emb_dim + 2 * emb_dim * mlp + gate(mlp)
  return tokens + states
