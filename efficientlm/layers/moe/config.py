"""Configuration of Mixture-of-Experts layers: where they go, how they route."""

from __future__ import annotations

import dataclasses

MOE_LAYOUTS = ('all', 'mixed', 'every', 'explicit')
ROUTERS = ('tokens_choose', 'experts_choose')
DISPATCHES = ('dropping', 'dropless')
GROUPED_MATMULS = ('auto', 'blocked', 'ragged_dot')
# How the dropless path moves token-choices between devices of an expert mesh axis
# (expert_parallel.py).
DROPLESS_EXCHANGES = ('auto', 'ragged', 'emulated', 'gspmd')


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-Experts feed-forward layers (Switch, GShard, ST-MoE; T5X's MoE configs).

  Which layers are sparse, per stack of L layers:
    'all'       every layer;
    'mixed'     T5X's layout: S sparse layers spread evenly, layer i sparse iff
                i % (L / S) == L / S - 1 (S = num_sparse_{encoder,decoder}_layers);
    'every'     every `period`-th layer (layers period-1, 2*period-1, ...);
    'explicit'  the indices in {encoder,decoder}_layers.
  """

  num_experts: int
  expert_mlp_dim: int | None = None  # None: the dense mlp_dim
  layout: str = 'mixed'
  num_sparse_encoder_layers: int | None = None
  num_sparse_decoder_layers: int | None = None
  period: int | None = None
  encoder_layers: tuple[int, ...] = ()
  decoder_layers: tuple[int, ...] = ()
  router: str = 'tokens_choose'
  num_selected_experts: int = 1  # k of top-k tokens-choose routing
  renormalize_gates: bool = False  # Mixtral-style; T5X does not
  # V-MoE's BPR: within a group, the most confident tokens get capacity first. Encoder stacks
  # only: in a causal decoder it would let a token's drop depend on later tokens.
  batch_prioritized_routing: bool = False
  train_capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  min_expert_capacity: int = 4
  # Routing groups hold at most this many tokens (T5X's GROUP_SIZE): the batch's tokens are
  # split into the fewest groups that divide them evenly. None: one group per sequence.
  max_group_size: int | None = None
  dispatch: str = 'dropping'
  # The dropless path's grouped matmul: 'auto', 'blocked' or 'ragged_dot' (see grouped_matmul.py).
  grouped_matmul: str = 'auto'
  # The dropless path under an expert mesh axis of size > 1: a shard_map that sends each
  # token-choice to its expert's device, by jax.lax.ragged_all_to_all ('ragged', GPU/TPU) or an
  # all_to_all emulation of it ('emulated', any backend, for CPU tests); 'auto' picks by backend.
  # 'gspmd' leaves the single-device program to GSPMD (gathers routing indices, all-reduces the
  # outputs).
  dropless_exchange: str = 'auto'
  router_jitter: float = 0.0  # Switch: multiplicative noise on the router input in training
  expert_dropout_rate: float = 0.0  # dropout on the experts' hidden units

  def __post_init__(self):
    for name in ('encoder_layers', 'decoder_layers'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    checks = [
        (self.num_experts >= 1, f'num_experts must be >= 1, got {self.num_experts}'),
        (self.layout in MOE_LAYOUTS, f'layout {self.layout!r} not in {MOE_LAYOUTS}'),
        (self.router in ROUTERS, f'router {self.router!r} not in {ROUTERS}'),
        (self.dispatch in DISPATCHES, f'dispatch {self.dispatch!r} not in {DISPATCHES}'),
        (self.grouped_matmul in GROUPED_MATMULS,
         f'grouped_matmul {self.grouped_matmul!r} not in {GROUPED_MATMULS}'),
        (self.dropless_exchange in DROPLESS_EXCHANGES,
         f'dropless_exchange {self.dropless_exchange!r} not in {DROPLESS_EXCHANGES}'),
        (1 <= self.num_selected_experts <= self.num_experts,
         f'num_selected_experts {self.num_selected_experts} must be in [1, num_experts = '
         f'{self.num_experts}]'),
        (self.train_capacity_factor > 0 and self.eval_capacity_factor > 0,
         f'capacity factors must be > 0, got train {self.train_capacity_factor}, eval '
         f'{self.eval_capacity_factor}'),
        (self.min_expert_capacity >= 1,
         f'min_expert_capacity must be >= 1, got {self.min_expert_capacity}'),
        (self.dispatch == 'dropping' or self.router == 'tokens_choose',
         'dropless dispatch routes tokens to their top-k experts: use router tokens_choose'),
        (self.max_group_size is None or self.max_group_size >= 1,
         f'max_group_size must be >= 1 or None, got {self.max_group_size}'),
        (0.0 <= self.router_jitter < 1.0, f'router_jitter {self.router_jitter} not in [0, 1)'),
        (0.0 <= self.expert_dropout_rate < 1.0,
         f'expert_dropout_rate {self.expert_dropout_rate} not in [0, 1)'),
        (self.layout != 'every' or (self.period or 0) >= 1,
         "layout 'every' needs period >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'MoeConfig: {message}.')

  def sparse_layers(self, num_layers: int, stack: str) -> tuple[bool, ...]:
    """Which of a stack's layers are sparse; stack is 'encoder' or 'decoder'."""
    if self.layout == 'all':
      return (True,) * num_layers
    if self.layout == 'every':
      return tuple(i % self.period == self.period - 1 for i in range(num_layers))
    if self.layout == 'explicit':
      indices = getattr(self, f'{stack}_layers')
      bad = [i for i in indices if not 0 <= i < num_layers]
      if bad:
        raise ValueError(f'MoeConfig.{stack}_layers {bad} are not layers of a {num_layers}-layer '
                         f'{stack}.')
      return tuple(i in indices for i in range(num_layers))
    sparse = getattr(self, f'num_sparse_{stack}_layers')
    if sparse is None or sparse == 0:
      return (False,) * num_layers
    if sparse < 0 or num_layers % sparse:
      raise ValueError(f"MoeConfig 'mixed' layout: num_sparse_{stack}_layers = {sparse} must "
                       f'divide the {num_layers} {stack} layers.')
    every = num_layers // sparse
    return tuple(i % every == every - 1 for i in range(num_layers))
