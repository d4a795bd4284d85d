"""Reversible residual layers (RevNet) with activation memory independent of depth.

A reversible layer acts on a pair of residual streams (Gomez et al. 2017, Sec. 3; used for the
Transformer by Kitaev et al. 2020, "Reformer", Sec. 3) with F the pre-norm attention branch and
G the pre-norm feed-forward branch:

  forward    y1 = x1 + F(x2)          inverse   x2 = y2 - G(y1)
             y2 = x2 + G(y1)                    x1 = y1 - F(x2)

Because each layer's inputs follow from its outputs, the backward pass (a `jax.custom_vjp`,
`reversible_layers`) keeps only the stack's output pair and, layer by layer from the top,
reconstructs the inputs while it pulls the cotangents back through F and G:

  G(y1), vjp_G = vjp(G, y1);  x2 = y2 - G(y1);  dp_G, dG/dy1 = vjp_G(dy2);  dx1 = dy1 + dG/dy1
  F(x2), vjp_F = vjp(F, x2);  x1 = y1 - F(x2);  dp_F, dF/dx2 = vjp_F(dx1);  dx2 = dy2 + dF/dx2

Each branch runs twice forward per step (once in the forward pass, once in the backward) as in
RevNet; no per-layer activation is stored, so activation memory is the output pair plus one
layer's intermediates.

Stack ends (as trax's ReformerLM: Dup, ReversibleSerial, Concatenate): the stack's input x
enters duplicated, (x1, x2) = (x, x). The output is `output='mean'`: (y1 + y2) / 2, width
d_model, so it drops in where a standard stack's output goes; or `output='concat'`: [y1, y2] on
the last axis (width 2 * d_model, trax's choice; the next layer must take 2 * d_model).

Chunked feed-forward (Reformer Sec. 3, "Chunking"): G is position-wise, so it is applied to c
slices of the length axis in sequence (`chunked_apply`, a lax.scan writing each slice's result
in place, each chunk rematerialized) and the [batch, length, d_ff] hidden activation exists for
one slice at a time, forward and backward. Values equal the unchunked ones (the same
per-position arithmetic). Measured on XLA:CPU, the chunk loop's backward keeps two [batch,
length, d_model] loop buffers per layer alive, so a chunked stack's memory grows slowly with
depth (benchmarks/reversible_memory.py); without chunks it does not grow at all.

Parameters (`ReversibleStack`): layer i's F and G are unbound flax modules built by
`make_f(i)` / `make_g(i)`; each is initialized by its own `init`, and their parameter dicts are
merged into one subtree `layers_i`, e.g. layers_0/pre_self_attention_layer_norm/scale,
layers_0/self_attention/query/kernel, layers_0/pre_mlp_layer_norm/scale, layers_0/mlp/wi_0/
kernel, with the logical-partitioning boxes their init created (so sharded init and
`partitioning.param_specs` see them). In the forward pass the subtree is read unboxed and F, G
become pure functions of (params, x) via `module.apply`, which is what the custom VJP needs (a
bound flax scope cannot cross `jax.custom_vjp`; flax's lifted `nn.custom_vjp` leaves the backward
pass without the scope, so it would need this same params snapshot). Both applies receive the
merged dict; each reads only its own keys (flax ignores the others; their zero cotangents fold
away in XLA).

Deviations and limits:
- Dropout: with `deterministic=False`, layer i's F and G get the dropout keys
  fold_in(rng, 2i) and fold_in(rng, 2i + 1), so the backward pass regenerates exactly the
  forward pass's masks (required for an exact inverse). Chunks of G fold in the chunk index, so
  chunked and unchunked dropout masks differ (equal in distribution).
- Branches may use only the 'params' collection: no KV cache, no sown values (e.g. MoE
  auxiliary losses); a branch whose init creates another collection raises ValueError instead
  of having it dropped. Decoding (`ReversibleStack.decode`) needs no gradient and skips this
  core: a plain forward pass of the same pure branches, each also given and returning its layer's
  'cache' collection (a KV cache), the streams combined by the same `combine_streams`.
- F receives the stack's extra arguments (mask, bias, positions ...); their floating leaves
  (e.g. a learned relative-position bias) get cotangents, integer/bool/key leaves none. G gets
  only its input (position-wise; required for chunking).
- Reconstruction is exact in real arithmetic; in floating point x = y - F(.) rounds at the
  scale of |y|, so keep the residual stream in float32 (branches may compute in bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
# F: (params, x, args, rng | None) -> F(x), same shape as x.  G: (params, x, rng | None) -> G(x).
BranchF = Callable[[Params, jax.Array, tuple, jax.Array | None], jax.Array]
BranchG = Callable[[Params, jax.Array, jax.Array | None], jax.Array]
OUTPUTS = ('mean', 'concat')


@dataclasses.dataclass(frozen=True)
class ReversibleConfig:
  """A reversible stack: depth, feed-forward chunks, how the two streams leave the stack."""

  num_layers: int
  ff_chunks: int = 1  # Reformer's c: G runs on c slices of the length axis
  output: str = 'mean'  # 'mean': (y1 + y2) / 2; 'concat': [y1, y2] on the last axis
  # False: the same forward differentiated by plain autodiff (stores every layer's activations);
  # for debugging and as the baseline of benchmarks/reversible_memory.py.
  custom_gradient: bool = True

  def __post_init__(self):
    if self.num_layers < 1:
      raise ValueError(f'ReversibleConfig.num_layers must be >= 1, got {self.num_layers}.')
    if self.ff_chunks < 1:
      raise ValueError(f'ReversibleConfig.ff_chunks must be >= 1 (1: no chunking), got '
                       f'{self.ff_chunks}.')
    if self.output not in OUTPUTS:
      raise ValueError(f'ReversibleConfig.output {self.output!r} not in {OUTPUTS}.')

  def validate(self, length: int) -> None:
    """Checks the config against a sequence length; raises ValueError with the fix."""
    if length % self.ff_chunks:
      raise ValueError(f'ReversibleConfig.ff_chunks = {self.ff_chunks} does not divide the '
                       f'sequence length {length}; choose a divisor of {length}.')


def chunked_apply(fn: Callable[[jax.Array, jax.Array | None], jax.Array], x: jax.Array,
                  num_chunks: int, rng: jax.Array | None = None) -> jax.Array:
  """fn applied to `num_chunks` equal slices of x's length axis (axis 1) one after another.

  fn(x_chunk [b, l / c, ...], rng_chunk) must be position-wise and keep its input's shape (a
  residual branch). Each chunk is rematerialized (jax.checkpoint), so neither pass holds more
  than one chunk's intermediates; chunk k gets fold_in(rng, k).
  """
  if num_chunks == 1:
    return fn(x, rng)
  length = x.shape[1]
  if length % num_chunks:
    raise ValueError(f'{num_chunks} feed-forward chunks do not divide the length {length}; '
                     f'choose a divisor of {length}.')
  size = length // num_chunks

  def step(out, k):
    chunk_rng = None if rng is None else jax.random.fold_in(rng, k)
    y = jax.checkpoint(fn)(jax.lax.dynamic_slice_in_dim(x, k * size, size, axis=1), chunk_rng)
    return jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), k * size, axis=1), None

  # Each step overwrites its slice of the carry. Its initial value is x (never read) rather than
  # zeros: XLA:CPU kept every layer's zero-filled loop buffer alive from the program's start, so
  # memory grew with depth (benchmarks/reversible_memory.py); x is already live here.
  out, _ = jax.lax.scan(step, jax.lax.stop_gradient(x), jnp.arange(num_chunks))
  return out


def combine_streams(config: ReversibleConfig, y1: jax.Array, y2: jax.Array) -> jax.Array:
  """The stack's output from its last pair: (y1 + y2) / 2 ('mean') or [y1, y2] ('concat')."""
  if config.output == 'concat':
    return jnp.concatenate([y1, y2], axis=-1)
  return (y1 + y2) / 2


# ----------------------------------------------------------------------------------------------
# The pure core: F/G are functions of (params, x); the custom VJP recomputes from the outputs.


def _split_float(tree) -> tuple[list, list, Callable[[list, list], Any]]:
  """(floating leaves, other leaves, merge): only floating leaves get cotangents."""
  leaves, treedef = jax.tree.flatten(tree)
  floating = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
  floats = [x if f else None for x, f in zip(leaves, floating)]
  others = [None if f else x for x, f in zip(leaves, floating)]

  def merge(floats, others):
    return jax.tree.unflatten(treedef, [a if f else b for a, b, f in zip(floats, others, floating)])

  return floats, others, merge


def _layer_keys(rngs, i):
  return (None, None) if rngs is None else rngs[i]


def _forward(fs, gs, params, x1, x2, args, rngs):
  for i, (f, g) in enumerate(zip(fs, gs)):
    kf, kg = _layer_keys(rngs, i)
    x1 = x1 + f(params[i], x2, args, kf)
    x2 = x2 + g(params[i], x1, kg)
  return x1, x2


def reverse_layers(fs: Sequence[BranchF], gs: Sequence[BranchG], params: Sequence[Params],
                   y1: jax.Array, y2: jax.Array, args: tuple = (),
                   rngs: Sequence[tuple[jax.Array, jax.Array]] | None = None):
  """The inverse of `reversible_layers`: the input pair (x1, x2) from the output pair."""
  for i in reversed(range(len(fs))):
    kf, kg = _layer_keys(rngs, i)
    y2 = y2 - gs[i](params[i], y1, kg)
    y1 = y1 - fs[i](params[i], y2, args, kf)
  return y1, y2


def reversible_layers(fs: Sequence[BranchF], gs: Sequence[BranchG], params: Sequence[Params],
                      x1: jax.Array, x2: jax.Array, args: tuple = (),
                      rngs: Sequence[tuple[jax.Array, jax.Array]] | None = None,
                      custom_gradient: bool = True) -> tuple[jax.Array, jax.Array]:
  """(y1, y2) after len(fs) reversible layers: y1 = x1 + F_i(x2), y2 = x2 + G_i(y1).

  params[i] is layer i's parameter tree (given to both fs[i] and gs[i]); `args` go to every F;
  rngs[i] = (F key, G key) or rngs None. With `custom_gradient` the VJP recomputes the layers'
  inputs from the outputs (module docstring) instead of storing them.
  """
  if not len(fs) == len(gs) == len(params):
    raise ValueError(f'Got {len(fs)} F, {len(gs)} G and {len(params)} parameter trees; one '
                     'of each per layer.')
  params = list(params)
  if not custom_gradient:
    return _forward(fs, gs, params, x1, x2, args, rngs)
  floats, others, merge = _split_float((args, rngs))

  @jax.custom_vjp
  def run(params, x1, x2, floats, others):
    return _forward(fs, gs, params, x1, x2, *merge(floats, others))

  def fwd(params, x1, x2, floats, others):
    y1, y2 = run(params, x1, x2, floats, others)
    return (y1, y2), (params, y1, y2, floats, others)

  def bwd(residuals, cotangents):
    params, y1, y2, floats, others = residuals
    dy1, dy2 = cotangents
    _, rngs = merge(floats, others)
    dparams = [None] * len(fs)
    dfloats = jax.tree.map(jnp.zeros_like, floats)
    for i in reversed(range(len(fs))):
      kf, kg = _layer_keys(rngs, i)
      # The lambdas run inside jax.vjp at once, so capturing the loop's i, kf, kg is safe.
      g_out, g_vjp = jax.vjp(lambda p, x: gs[i](p, x, kg), params[i], y1)  # noqa: B023
      x2 = y2 - g_out
      dp_g, dx = g_vjp(dy2)
      dy1 = dy1 + dx
      f_out, f_vjp = jax.vjp(
          lambda p, x, fl: fs[i](p, x, merge(fl, others)[0], kf),  # noqa: B023
          params[i], x2, floats)
      x1 = y1 - f_out
      dp_f, dx, dfl = f_vjp(dy1)
      dy2 = dy2 + dx
      dfloats = jax.tree.map(jnp.add, dfloats, dfl)
      # The reconstruction chain needs only forward passes of F and G, so a scheduler could run
      # it for all layers ahead of the cotangents and keep every layer's activations alive. The
      # barrier finishes layer i before layer i - 1 starts (a guard: XLA:CPU did not reorder).
      y1, y2, dy1, dy2, dparams[i], dfloats = jax.lax.optimization_barrier(
          (x1, x2, dy1, dy2, jax.tree.map(jnp.add, dp_f, dp_g), dfloats))
    # The pair's cotangents are now those of the stack's inputs; non-float args get none.
    return dparams, dy1, dy2, dfloats, None

  run.defvjp(fwd, bwd)
  return run(params, x1, x2, floats, others)


# ----------------------------------------------------------------------------------------------
# Flax: per-layer modules whose parameters live under layers_i, applied as pure functions.


def _only_params(variables: dict, what: str) -> Params:
  extra = sorted(set(variables) - {'params'})
  if extra:
    raise ValueError(f'{what} creates variable collections {extra}; a reversible branch may '
                     "hold only 'params' (no KV cache, no sown values such as MoE losses).")
  return variables.get('params', {})


@contextlib.contextmanager
def _outside_modules():
  """Modules constructed inside stay unbound (parent None) although a module is being called.

  Flax attaches a module built inside another's compact method to it as a child; the branch
  modules must instead stay free for `module.apply`. Flax tracks the enclosing module on a
  context stack (its own partitioning helpers read it too); a None on top means "no parent".
  """
  stack = nn.module._context.module_stack  # pylint: disable=protected-access
  stack.append(None)
  try:
    yield
  finally:
    stack.pop()


def _build(factory: Callable[[int], nn.Module], i: int, what: str) -> nn.Module:
  with _outside_modules():
    module = factory(i)
  if not isinstance(module, nn.Module) or module.parent is not None:
    raise ValueError(f'{what}({i}) must build a new flax module (unbound); got {module!r}.')
  return module


class ReversibleStack(nn.Module):
  """`config.num_layers` reversible layers over x [batch, length, d_model].

  make_f(i) / make_g(i) build layer i's F and G (called with no enclosing module, so whatever
  modules they construct stay unbound: `lambda i: MyBranch(cfg)` is enough). F is called
  as F(x, *args) with the stack's extra arguments, G as G(x); both return x's shape, and any
  dropout in them draws from the 'dropout' rng stream. Returns [batch, length, d_model]
  ('mean') or [batch, length, 2 * d_model] ('concat').

  `decode` (inference with a cache): the branches may also read and write the 'cache'
  collection (a KV cache); layer i's sits in the variable `layers_i` of that collection, i.e.
  where a standard layer i's cache would be. The layers then run as a plain forward pass (no
  gradient is taken: no custom VJP) with G unchunked (chunking only saves training memory).
  """

  config: ReversibleConfig
  make_f: Callable[[int], nn.Module]
  make_g: Callable[[int], nn.Module]
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *args) -> jax.Array:
    cfg = self.config
    if not self.decode:  # a decoding step is one token: G runs unchunked there
      cfg.validate(x.shape[1])
    f_modules = [_build(self.make_f, i, 'make_f') for i in range(cfg.num_layers)]
    g_modules = [_build(self.make_g, i, 'make_g') for i in range(cfg.num_layers)]
    if self.decode:  # flax's param() would trace the init (to check shapes) in decode modes
      params = [self._trained_params(f'layers_{i}') for i in range(cfg.num_layers)]
    else:
      params = [self.param(f'layers_{i}', self._init_layer, f_modules[i], g_modules[i], x, args)
                for i in range(cfg.num_layers)]

    def dropout(rng):  # the branches' training randomness: dropout, LSH's hash rotations
      return None if rng is None else {'dropout': rng, 'lsh': jax.random.fold_in(rng, 1)}

    def branch_f(module):
      return lambda p, x, args, rng: module.apply({'params': p}, x, *args, rngs=dropout(rng))

    def branch_g(module):
      return lambda p, x, rng: chunked_apply(
          lambda xc, r: module.apply({'params': p}, xc, rngs=dropout(r)), x, cfg.ff_chunks, rng)

    rngs = None
    if not self.deterministic:
      key = self.make_rng('dropout')
      rngs = [(jax.random.fold_in(key, 2 * i), jax.random.fold_in(key, 2 * i + 1))
              for i in range(cfg.num_layers)]
    if self.decode:
      return self._decode(f_modules, g_modules, params, x, args, rngs, dropout)
    y1, y2 = reversible_layers([branch_f(m) for m in f_modules], [branch_g(m) for m in g_modules],
                               params, x, x, args, rngs, cfg.custom_gradient)
    return combine_streams(cfg, y1, y2)

  def _decode(self, f_modules, g_modules, params, x, args, rngs, dropout):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) layer by layer, each branch applied with layer i's
    cache. F gets the whole stored dict and returns it with its own entries updated (flax
    passes unread entries through), then G the same, so neither loses the other's."""
    x1 = x2 = x
    for i, (f, g) in enumerate(zip(f_modules, g_modules)):
      name = f'layers_{i}'
      cache = self.get_variable('cache', name) if self.has_variable('cache', name) else {}
      kf, kg = _layer_keys(rngs, i)

      def run(module, inputs, rng, cache, p=params[i]):
        variables = {'params': p, **({'cache': cache} if cache else {})}
        out, state = module.apply(variables, *inputs, rngs=dropout(rng), mutable=['cache'])
        return out, state.get('cache', {})

      out, cache = run(f, (x2, *args), kf, cache)
      x1 = x1 + out
      out, cache = run(g, (x1,), kg, cache)
      x2 = x2 + out
      if cache:
        self.put_variable('cache', name, cache)
    return combine_streams(self.config, x1, x2)

  def _trained_params(self, name: str) -> Params:
    if not self.has_variable('params', name):
      raise ValueError(f'Decoding a reversible stack needs its parameters ({name} is missing): '
                       'initialize or restore the model first, then decode with them.')
    return nn.meta.unbox(self.get_variable('params', name))

  @staticmethod
  def _init_layer(rng: jax.Array, f: nn.Module, g: nn.Module, x: jax.Array, args: tuple) -> dict:
    """Layer i's parameters: F's and G's own init (boxes kept), merged into one dict."""
    f_rng, g_rng = jax.random.split(rng)
    # mutable=True: also whatever the branch sows ('intermediates' included), to refuse it.
    f_params = _only_params(f.init({'params': f_rng, 'dropout': f_rng, 'lsh': f_rng}, x, *args,
                                   mutable=True),
                            'make_f')
    g_params = _only_params(g.init({'params': g_rng, 'dropout': g_rng}, x, mutable=True),
                            'make_g')
    clash = sorted(set(f_params) & set(g_params))
    if clash:
      raise ValueError(f'F and G both name sub-modules {clash}; give the branches distinct '
                       'sub-module names (e.g. self_attention / mlp).')
    return {**f_params, **g_params}
