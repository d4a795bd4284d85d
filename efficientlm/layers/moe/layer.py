"""The Mixture-of-Experts feed-forward layer, in four named steps: route, dispatch, experts,
combine. Two dispatch implementations:

  'dropping'  GShard/T5X: one-hot dispatch and combine tensors [G, T, E, C] and einsums; tokens
              over an expert's capacity C are dropped (their output is 0; the residual carries
              them). Expert inputs are [E, G, C, d]: sharding experts over the 'expert' mesh axis
              and groups over the batch axes makes the dispatch einsum an all-to-all.
  'dropless'  MegaBlocks style: every token-choice is kept; choices are sorted by expert, the
              experts run as grouped matmuls over the ragged groups (grouped_matmul.py: a
              blocked loop, or jax.lax.ragged_dot), and the results are unsorted and combined.
              Under an expert mesh axis the choices travel to their experts' devices by a
              ragged all-to-all inside a shard_map (expert_parallel.py).

Parameter names follow T5X/flaxformer: mlp/router/router_weights/w/kernel [d, E] and
mlp/expert/{wi_0, wi_1, wo}/kernel with a leading expert axis. Router losses and statistics are
sown into the 'moe' collection (see efficientlm.models.moe_losses). With `ia3`, each expert's
hidden activations are scaled by its own learned vector, mlp/expert/ia3_scale [E, expert_mlp]
(layers/ia3.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from efficientlm import partitioning
from efficientlm.inference import quantization
from efficientlm.layers import ia3
from efficientlm.layers.dense import DenseGeneral
from efficientlm.layers.mlp import get_activation
from efficientlm.layers.moe import expert_parallel, routing
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.moe.grouped_matmul import grouped_matmul

# Switch: small router init ("reduce the initialization scale by 10x").
ROUTER_INIT = nn.initializers.truncated_normal(stddev=0.02)
EXPERT_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=-2,
                                               out_axis=-1, batch_axis=(0,))
MOE_COLLECTION = 'moe'


class RouterWeights(nn.Module):
  num_experts: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Router logits in float32 whatever the activation dtype.
    return DenseGeneral(self.num_experts, ('embed', 'unmodeled'), kernel_init=ROUTER_INIT,
                        dtype=jnp.float32, name='w')(x)


class Router(nn.Module):
  num_experts: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return RouterWeights(self.num_experts, name='router_weights')(x)


class ExpertKernel(nn.Module):
  """One expert weight stacked over experts: [E, in, out]."""

  shape: tuple[int, int, int]
  axes: tuple[str, str, str]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', nn.with_logical_partitioning(EXPERT_INIT, self.axes), self.shape,
                      self.param_dtype)


class Experts(nn.Module):
  """E copies of the (gated) MLP, applied by einsum over dispatched slots or by ragged_dot."""

  num_experts: int
  intermediate_dim: int
  activations: Sequence[str]
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  grouped_matmul: str = 'auto'  # the dropless path's implementation (grouped_matmul.py)
  ia3: bool = False  # (IA)3's l_ff per expert: parameter `ia3_scale` [E, intermediate_dim]

  def _kernels(self, d: int, keep_int8: bool = False):
    """wi (one per activation) and wo in self.dtype; with `keep_int8`, int8 QuantizedWeights
    as they are (the single-device dropless path multiplies by them tile by tile)."""
    names = ['wi'] if len(self.activations) == 1 else [
        f'wi_{i}' for i in range(len(self.activations))]
    wi = [ExpertKernel((self.num_experts, d, self.intermediate_dim),
                       ('expert', 'embed', 'expert_mlp'), self.param_dtype, name=n)()
          for n in names]
    wo = ExpertKernel((self.num_experts, self.intermediate_dim, d),
                      ('expert', 'expert_mlp', 'embed'), self.param_dtype, name='wo')()
    # int8 expert kernels (QuantizedWeight) are converted here, one layer's at a time, unless kept.
    def read(w):
      if keep_int8 and quantization.is_quantized(w):
        return w
      return quantization.as_float(w, self.dtype)

    return [read(w) for w in wi], read(wo)

  def _hidden(self, projections, deterministic):
    hidden = None
    for act, h in zip(self.activations, projections):
      h = get_activation(act)(h)
      hidden = h if hidden is None else hidden * h
    return nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               group_sizes: jax.Array | None = None,
               sharded_dispatch: Callable | None = None) -> jax.Array:
    """x: [E, G, C, d] dispatched slots, or, with `group_sizes` [E], [N, d] rows sorted by
    expert (the dropless path), or, with `sharded_dispatch` (expert_parallel.make_dispatch), the
    [G, T, d] groups, which that callable moves to the experts' devices and back."""
    dropless_local = group_sizes is not None and sharded_dispatch is None
    wi, wo = self._kernels(x.shape[-1], keep_int8=dropless_local)
    scale = None
    if self.ia3:
      scale = ia3.scale_vector(self, ia3.FF_SCALE, (self.num_experts, self.intermediate_dim),
                               ('expert', 'expert_mlp')).astype(self.dtype)
    x = jnp.asarray(x, self.dtype)
    if sharded_dispatch is not None:
      rng = None if deterministic or self.dropout_rate == 0 else self.make_rng('dropout')
      return sharded_dispatch(x, wi, wo, scale, rng)
    if group_sizes is None:
      # Groups x capacity as one dim: each expert is one batched 2D matmul (XLA:CPU runs kernel
      # gradients contracting two dims about 2x slower).
      e, g, c, d = x.shape
      x = x.reshape(e, g * c, d)
      hidden = self._hidden([jnp.einsum('etd,edf->etf', x, w) for w in wi], deterministic)
      if scale is not None:
        hidden = hidden * scale[:, None, :]
      hidden = partitioning.constrain(hidden.reshape(e, g, c, -1),
                                      ('expert', 'batch', None, 'expert_mlp'))
      return jnp.einsum('etf,efd->etd', hidden.reshape(e, g * c, -1), wo).reshape(e, g, c, d)
    gmm = functools.partial(grouped_matmul, group_sizes=group_sizes,
                            implementation=self.grouped_matmul)
    hidden = self._hidden([gmm(x, w) for w in wi], deterministic)
    if scale is not None:  # row i belongs to the expert whose group holds it
      experts = jnp.repeat(jnp.arange(self.num_experts), group_sizes,
                           total_repeat_length=hidden.shape[0])
      hidden = hidden * scale[experts]
    return gmm(hidden, wo)


class MoeLayer(nn.Module):
  """Replaces a Transformer layer's MLP. x: [batch, length, d] -> same."""

  config: MoeConfig
  intermediate_dim: int
  activations: Sequence[str] = ('gelu', 'linear')
  causal: bool = False  # in a causal decoder (experts-choose would look ahead)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  ia3: bool = False  # (IA)3 vectors in the experts (Experts.ia3)

  def _groups(self, x: jax.Array) -> jax.Array:
    """[B, L, d] -> [G, T, d]: one group per sequence, or the fewest groups of at most
    max_group_size tokens that split the batch's tokens evenly (T5X's grouping)."""
    limit = self.config.max_group_size
    if limit is None:
      return x
    tokens = x.shape[0] * x.shape[1]
    groups = next(g for g in range(-(-tokens // limit), tokens + 1) if tokens % g == 0)
    return x.reshape(groups, tokens // groups, x.shape[-1])

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.config
    if cfg.router == 'experts_choose' and self.causal:
      raise ValueError('Experts-choose routing lets a token\'s route depend on later tokens of its '
                       'group; it cannot be used in a causal decoder. Use router '
                       "'tokens_choose' there.")
    batch, length, d = x.shape
    groups = partitioning.constrain(self._groups(x), ('batch', None, 'embed'))

    # 1. route (float32), with Switch's jitter on the router input while training.
    router_in = groups
    if cfg.router_jitter > 0 and not deterministic:
      router_in = routing.jitter(groups, self.make_rng('jitter'), cfg.router_jitter)
    logits = Router(cfg.num_experts, name='router')(router_in)
    experts = Experts(cfg.num_experts, self.intermediate_dim, tuple(self.activations),
                      cfg.expert_dropout_rate, self.dtype, self.param_dtype, cfg.grouped_matmul,
                      ia3=self.ia3, name='expert')
    if cfg.dispatch == 'dropless':
      out, aux = self._dropless(groups, logits, experts, deterministic)
    else:
      out, aux = self._dropping(groups, logits, experts, deterministic)
    for name, value in aux.items():
      self.sow(MOE_COLLECTION, name, value)
    out = out.reshape(batch, length, d).astype(self.dtype)
    return partitioning.constrain(out, ('batch', 'length', 'embed'))

  def _dropping(self, groups, logits, experts, deterministic):
    cfg = self.config
    factor = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
    k = cfg.num_selected_experts if cfg.router == 'tokens_choose' else 1
    capacity = routing.expert_capacity(groups.shape[1], cfg.num_experts, factor,
                                       cfg.min_expert_capacity, k)
    if cfg.router == 'experts_choose':
      route = routing.experts_choose(logits, capacity)
    else:
      route = routing.tokens_choose(logits, capacity, k, cfg.renormalize_gates,
                                    cfg.batch_prioritized_routing and not self.causal)
    # 2. dispatch: [G, T, d] -> [E, G, C, d] (an all-to-all when experts and groups are sharded).
    dispatched = jnp.einsum('gtd,gtec->egcd', groups,
                            route.dispatch_mask.astype(groups.dtype))
    dispatched = partitioning.constrain(dispatched, ('expert', 'batch', None, 'embed'))
    # 3. experts.
    out = experts(dispatched, deterministic)
    out = partitioning.constrain(out, ('expert', 'batch', None, 'embed'))
    # 4. combine: back to [G, T, d], weighted by the gates.
    combined = jnp.einsum('egcd,gtec->gtd', out, route.combine_weights.astype(out.dtype))
    return combined, route.aux

  def _dropless(self, groups, logits, experts, deterministic):
    cfg = self.config
    k = cfg.num_selected_experts
    probs = routing.router_probabilities(logits)
    num_tokens = groups.shape[0] * groups.shape[1]
    aux = {'router_z_loss': routing.router_z_loss(logits),
           'fraction_dropped': jnp.zeros((), jnp.float32)}
    if expert_parallel.applies(cfg.dropless_exchange):
      # Under an expert mesh axis: a shard_map with a ragged all-to-all (expert_parallel.py).
      # Top-k runs inside it too (GSPMD would gather the router probabilities for it).
      dispatch = expert_parallel.make_dispatch(
          probs=probs, k=k, renormalize_gates=cfg.renormalize_gates,
          activations=tuple(self.activations), grouped_matmul_implementation=cfg.grouped_matmul,
          dropout_rate=cfg.expert_dropout_rate, exchange=cfg.dropless_exchange)
      combined, sizes, expert_index = experts(groups, deterministic, sharded_dispatch=dispatch)
      aux['load_balancing_loss'] = routing.load_balancing_loss(probs, expert_index)
      aux['expert_load'] = sizes.astype(jnp.float32) / (num_tokens * k)
      return combined, aux
    choice = routing.top_k_assignment(probs, k, cfg.renormalize_gates)
    aux['load_balancing_loss'] = routing.load_balancing_loss(probs, choice.expert_index)
    tokens = groups.reshape(num_tokens, groups.shape[-1])
    expert_of = choice.expert_index.reshape(num_tokens * k)
    # 2. dispatch: token-choices sorted by expert (stable: position order within an expert).
    order = jnp.argsort(expert_of, stable=True)
    token_of = order // k
    sizes = jnp.bincount(expert_of, length=cfg.num_experts).astype(jnp.int32)
    # 3. experts, as grouped matmuls over the ragged groups.
    out = experts(tokens[token_of], deterministic, group_sizes=sizes)
    # 4. combine: weight by the gates and add each choice back to its token.
    gates = choice.gates.reshape(num_tokens * k)[order]
    combined = jnp.zeros(tokens.shape, out.dtype).at[token_of].add(
        out * gates[:, None].astype(out.dtype))
    aux['expert_load'] = sizes.astype(jnp.float32) / (num_tokens * k)
    return combined.reshape(groups.shape), aux
