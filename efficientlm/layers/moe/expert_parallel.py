"""Dropless MoE under expert parallelism: each token-choice travels once, to its expert's device,
by a ragged all-to-all, and its output comes back by the reverse one.

MegaBlocks' dropless MoE (Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with
Mixture-of-Experts") distributed the GShard way (Lepikhin et al. 2020): experts split over the
expert mesh axis (n devices, E_l = E / n experts each), tokens over the batch axes (data x fsdp
x expert), expert hidden units over 'model' when the rules split 'expert_mlp'. One `shard_map`;
per device, with its N local tokens and k choices per token:

  1. Sort the N k choices by expert (stable). c[e] = choices for expert e; the rows for device j
     are contiguous: send[j] = sum_{e in j's experts} c[e], starting at in_off[j].
  2. Exchange counts: all_to_all of c as [n, E_l] gives recv_counts[s, e_l] (choices of source s
     for my local expert e_l); recv[s] = sum_e_l recv_counts[s, e_l]. Receivers stack sources in
     order, so source s writes at recv_off[s] = sum_{s' < s} recv[s'] of the receiver; a sender
     learns its out_off[j] (= recv_off of j at the sender's index) by an all_to_all of recv_off.
  3. ragged_all_to_all of the sorted rows into a [B, d] receive buffer (B below).
  4. The rows arrive grouped by source, then by expert: re-sort them by local expert (stable),
     run the E_l experts as one grouped matmul with group sizes sum_s recv_counts[s, :], unsort.
     With hidden units over 'model' each model shard holds a partial sum of the wo output.
  5. The reverse ragged_all_to_all (offsets and sizes with the roles swapped) returns the rows in
     the sorted order of step 1; y_t = sum_c gate[t, c] * out[t, c], psum over 'model'.

Router probabilities, top-k, and the aux losses stay outside the shard_map (elementwise and
reductions, which GSPMD partitions without moving indices); per-expert counts for 'expert_load'
are psum'd inside. Values and gradients equal the single-device dropless layer's (the backward
of a ragged all-to-all is the ragged all-to-all with the roles swapped: jax's transpose rule).

Receive buffer bound: a token's k experts are distinct, so a device gets at most min(k, E_l)
choices per token from each of n sources: B = n N min(k, E_l) rows. This is the worst case (all
peers sending all their choices to one device), so no routing overflows it and nothing is
dropped. The price: a B x d buffer, n times the balanced size, and the blocked grouped matmul
loops over its padding rows as well (a capacity-style bound with an overflow fallback would cut
both; not built).

Exchange implementations (`exchange`; 'auto' = 'ragged' on GPU/TPU, 'emulated' elsewhere):
  'ragged'    jax.lax.ragged_all_to_all. XLA:CPU lowers but cannot compile it.
  'emulated'  the same semantics from jax.lax.all_to_all of per-peer buffers padded to the
              largest possible slice S ([n, S, d]), a gather before and a scatter after. It moves
              n S d elements whatever the sizes: for CPU tests, not for speed.

The shard_map runs with check_vma=False: the blocked grouped matmul's loop carries start as
unsharded zeros, which the varying-axes type check rejects; psum's transpose is still right
(the gradient tests cover the 'model' psum).

Deviations: the counts exchanged are per (peer, local expert), [n, E_l], not only per peer, since
the receiver needs them to re-sort by expert. Expert dropout draws its mask from the Experts
module's 'dropout' stream folded with the device index, so masks differ from the single-device
path's (same distribution).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from efficientlm import partitioning
from efficientlm.layers.mlp import get_activation
from efficientlm.layers.moe import routing
from efficientlm.layers.moe.grouped_matmul import grouped_matmul

EXCHANGES = ('auto', 'ragged', 'emulated')
ACCELERATORS = ('gpu', 'cuda', 'rocm', 'tpu')


def applies(exchange: str) -> bool:
  """Whether the dropless layer should take this path: an expert axis of size > 1 in the active
  partitioner context, and an exchange other than 'gspmd'."""
  return exchange != 'gspmd' and partitioning.activation_axis_size('expert') > 1


def resolve_exchange(exchange: str) -> str:
  if exchange not in EXCHANGES:
    raise ValueError(f'Exchange {exchange!r} not in {EXCHANGES}.')
  if exchange == 'auto':
    return 'ragged' if jax.default_backend() in ACCELERATORS else 'emulated'
  return exchange


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, max_send: int | None = None):
  """jax.lax.ragged_all_to_all's semantics with one slice per peer (offsets of length n), from a
  dense all_to_all: slice j (operand[input_offsets[j]:+send_sizes[j]]) goes to peer j, and the
  slice from peer s is written into `output` at the offset s gave for this receiver
  (all_to_all(output_offsets)[s]), recv_sizes[s] rows. max_send: a static bound on any slice's
  rows (default: all of operand)."""
  cap = operand.shape[0] if max_send is None else max_send
  feature = (1,) * (operand.ndim - 1)
  i = jnp.arange(cap)
  valid = i < send_sizes[:, None]  # [n, cap]
  rows = jnp.where(valid, input_offsets[:, None] + i, 0)
  padded = jnp.where(valid.reshape(valid.shape + feature), operand[rows], 0)
  received = jax.lax.all_to_all(padded, axis_name, 0, 0)  # [n, cap, ...], axis 0 = source
  offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  target = jnp.where(i < recv_sizes[:, None], offsets[:, None] + i, output.shape[0])
  return output.at[target.reshape(-1)].set(
      received.reshape((-1,) + operand.shape[1:]).astype(output.dtype), mode='drop')


def exchange_rows(implementation: str, operand, output, input_offsets, send_sizes,
                  output_offsets, recv_sizes, *, axis_name, max_send: int):
  """The one place rows move between devices: 'ragged' or 'emulated' (same semantics)."""
  if implementation == 'ragged':
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                     recv_sizes, axis_name=axis_name)
  return emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                    recv_sizes, axis_name=axis_name, max_send=max_send)


def _exclusive_cumsum(x):
  return jnp.cumsum(x) - x


def local_experts(rows, wi, wo, scale, group_sizes, *, activations: Sequence[str],
                  implementation: str, dropout_rate: float = 0.0, rng=None):
  """The gated MLP of E_l experts on rows sorted by expert (Experts' dropless math, pure)."""
  gmm = functools.partial(grouped_matmul, group_sizes=group_sizes, implementation=implementation)
  hidden = None
  for act, w in zip(activations, wi):
    h = get_activation(act)(gmm(rows, w))
    hidden = h if hidden is None else hidden * h
  if rng is not None and dropout_rate > 0:
    keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, hidden.shape)
    hidden = jnp.where(keep, hidden / (1.0 - dropout_rate), 0).astype(hidden.dtype)
  if scale is not None:  # (IA)3: row i is scaled by the vector of the expert whose group holds it
    experts = jnp.repeat(jnp.arange(scale.shape[0]), group_sizes,
                         total_repeat_length=hidden.shape[0])
    hidden = hidden * scale[experts]
  return gmm(hidden, wo)


def _axes(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _name(axes: tuple[str, ...]):
  return axes[0] if len(axes) == 1 else axes


def receive_bound(local_tokens: int, k: int, n: int, local_num_experts: int) -> int:
  """Rows of the receive buffer: the worst case n N min(k, E_l) (see the module docstring)."""
  return n * local_tokens * min(k, local_num_experts)


def dropless(x, wi, wo, scale, rng, *, probs, k: int, renormalize_gates: bool = False,
             activations: Sequence[str], grouped_matmul_implementation: str = 'auto',
             dropout_rate: float = 0.0, exchange: str = 'auto', with_send_sizes: bool = False):
  """x [G, T, d] groups, probs [G, T, E] router probabilities (float32), wi: list of [E, d, F],
  wo [E, F, d], scale [E, F] or None -> (y [G, T, d], counts [E] of all devices' choices per
  expert, expert_index [G, T, k] of the top-k) and, with `with_send_sizes`, send sizes [devices,
  n] in mesh order (rows each device sent to each expert-axis peer, itself included).

  Must run inside a Partitioner.context whose mesh has an expert axis."""
  active = partitioning.active_mesh_and_rules()
  if active is None:
    raise ValueError('Expert-parallel dropless dispatch needs a Partitioner.context with an '
                     'expert mesh axis; outside one, use the single-device dropless path.')
  mesh, rules = active
  spec = functools.partial(partitioning.logical_to_spec, rules=rules, mesh=mesh)
  batch_axes = _axes(spec(('batch',))[0])
  expert_axes = _axes(spec(('expert',))[0])
  mlp_axes = tuple(a for a in _axes(spec(('expert_mlp',))[0]) if a not in batch_axes)
  n = math.prod(mesh.shape[a] for a in expert_axes)
  num_experts = wo.shape[0]
  if n <= 1 or num_experts % n:
    raise ValueError(f'{num_experts} experts cannot be split over expert mesh axes {expert_axes} '
                     f'of size {n}; choose an expert count divisible by {n}.')
  impl = resolve_exchange(exchange)
  gmm_impl = grouped_matmul_implementation
  if gmm_impl == 'auto':  # inside the shard_map experts are local: no GSPMD over experts
    gmm_impl = 'ragged_dot' if jax.default_backend() == 'tpu' else 'blocked'
  all_axes = tuple(mesh.axis_names)

  def body(x, probs, wi, wo, scale, rng):
    g_l, t, d = x.shape
    choice = routing.top_k_assignment(probs, k, renormalize_gates)
    expert_index, gates = choice.expert_index, choice.gates
    e_l = wo.shape[0]
    tokens = x.reshape(g_l * t, d)
    choices = tokens.shape[0] * k
    expert_of = expert_index.reshape(choices)
    order = jnp.argsort(expert_of, stable=True)
    token_of = order // k
    counts = jnp.bincount(expert_of, length=num_experts).astype(jnp.int32)  # [E]
    send = counts.reshape(n, e_l).sum(1)
    in_off = _exclusive_cumsum(send)
    axis = _name(expert_axes)
    recv_counts = jax.lax.all_to_all(counts.reshape(n, e_l), axis, 0, 0, tiled=True)
    recv = recv_counts.sum(1)
    recv_off = _exclusive_cumsum(recv)
    out_off = jax.lax.all_to_all(recv_off, axis, 0, 0, tiled=True)
    max_slice = tokens.shape[0] * min(k, e_l)
    bound = receive_bound(tokens.shape[0], k, n, e_l)
    move = functools.partial(exchange_rows, impl, axis_name=axis, max_send=max_slice)
    rows = move(tokens[token_of], jnp.zeros((bound, d), tokens.dtype), in_off, send, out_off,
                recv)
    # Local expert of each received row (source s, then expert order); padding rows sort last.
    r = jnp.arange(bound)
    source = jnp.searchsorted(recv_off + recv, r, side='right')
    within = r - recv_off[jnp.minimum(source, n - 1)]
    ends = jnp.cumsum(recv_counts, axis=1)[jnp.minimum(source, n - 1)]  # [bound, e_l]
    local = jnp.where(source < n, jnp.sum(ends <= within[:, None], axis=1), e_l)
    perm = jnp.argsort(local, stable=True)
    if rng is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(all_axes))
    out = local_experts(rows[perm], wi, wo, scale, recv_counts.sum(0), activations=activations,
                        implementation=gmm_impl, dropout_rate=dropout_rate, rng=rng)
    out = jnp.zeros_like(out).at[perm].set(out)
    back_off = jax.lax.all_to_all(in_off, axis, 0, 0, tiled=True)
    back = move(out, jnp.zeros((choices, out.shape[-1]), out.dtype), recv_off, recv, back_off,
                send)
    weighted = back * gates.reshape(choices)[order][:, None].astype(back.dtype)
    y = jnp.zeros((tokens.shape[0], back.shape[-1]), back.dtype).at[token_of].add(weighted)
    if mlp_axes:  # each model shard summed only its hidden units
      y = jax.lax.psum(y, _name(mlp_axes))
    if batch_axes:
      counts = jax.lax.psum(counts, _name(batch_axes))
    return y.reshape(g_l, t, -1), counts, expert_index, send[None]

  rows_spec = P(_name(batch_axes) if batch_axes else None)
  expert_spec = _name(expert_axes)
  mlp_spec = _name(mlp_axes) if mlp_axes else None
  wi_spec = [P(expert_spec, None, mlp_spec)] * len(wi)
  scale_spec = None if scale is None else P(expert_spec, mlp_spec)
  send_spec = P(all_axes)
  fn = jax.shard_map(body, mesh=mesh,
                     in_specs=(rows_spec, rows_spec, wi_spec, P(expert_spec, mlp_spec, None),
                               scale_spec, P()),
                     out_specs=(rows_spec, P(), rows_spec, send_spec), check_vma=False)
  y, counts, expert_index, send = fn(x, probs, list(wi), wo, scale, rng)
  return (y, counts, expert_index, send) if with_send_sizes else (y, counts, expert_index)


def make_dispatch(**kw) -> Callable:
  """`dropless` with the routing and options bound: the callable Experts runs with its kernels."""
  return functools.partial(dropless, **kw)
