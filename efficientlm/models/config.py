"""The one dataclass that describes a Transformer network (bound by the model gins)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from efficientlm.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from efficientlm.layers.bigbird import BigBirdConfig
from efficientlm.layers.block_recurrent import BlockRecurrentConfig
from efficientlm.layers.evolving_attention import EvolvingAttentionConfig
from efficientlm.layers.fourier_mixing import FourierConfig
from efficientlm.layers.gss import GssConfig
from efficientlm.layers.h3 import H3Config
from efficientlm.layers.lsh_attention import LshConfig
from efficientlm.layers.moe.config import MoeConfig
from efficientlm.layers.sparse_ffn import SparseFfnConfig
from efficientlm.layers.sparse_qkv import SparseQkvConfig
from efficientlm.layers.ssm import SsmConfig

POSITION_EMBEDDINGS = ('relative', 'rotary')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_with_no_batch_dims')
# What mixes information across positions in a layer (see `token_mixers`). Each name is one
# module in efficientlm/layers; models/transformer.token_mixer builds it.
TOKEN_MIXERS = ('attention', 'bigbird', 'lsh', 'h3', 'gss', 's4d', 'fnet', 'block_recurrent',
                'block_window')
# Attention-free mixers: causal state space models (recurrent decoding, no KV cache) and
# FNet's bidirectional Fourier mixing (encoders only).
SSM_MIXERS = ('h3', 'gss', 's4d')
# Block-Recurrent Transformer layers (layers/block_recurrent.py): 'block_recurrent' carries S
# state vectors from block to block; 'block_window' is the same layer without them (sliding-
# window attention over blocks, the previous block's keys kept): the paper's baseline layers.
BLOCK_MIXERS = ('block_recurrent', 'block_window')
ATTENTION_MIXERS = ('attention', 'bigbird', 'lsh')
# How a stack joins its layers (see `residual`).
RESIDUALS = ('standard', 'reversible')


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Network hyperparameters. Defaults are T5.1.1 conventions; the gins set the sizes."""

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  num_kv_heads: int | None = None  # None: multi-head; 1: multi-query; else grouped-query
  mlp_dim: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  mlp_activations: tuple[str, ...] = ('gelu', 'linear')
  dropout_rate: float = 0.0
  dtype: str = 'bfloat16'  # activations
  param_dtype: str = 'float32'
  layer_norm_epsilon: float = 1e-6
  # Output logits: tied to the token embedding (original T5, GPT) or a separate logits_dense.
  logits_via_embedding: bool = False
  # Multiply tied logits by emb_dim**-0.5 (original T5). Embeddings start at N(0, 1) and every
  # layer at unit scale, so without it tied logits start with std sqrt(emb_dim).
  scale_tied_logits: bool = True
  position_embedding: str = 'relative'
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rotary_max_wavelength: float = 10_000.0
  # False: 1/sqrt(head_dim) is folded into the query init (T5). True: applied at run time.
  scale_attention_logits: bool = False
  float32_attention_logits: bool = True
  one_hot_embedding: bool = False
  scan_layers: bool = False
  remat_policy: str = 'none'
  moe: MoeConfig | None = None  # None: every feed-forward layer is dense
  # Decoder layers as PaLM's parallel block, x + attention(norm(x)) + mlp(norm(x)) with one norm
  # (Chowdhery et al. 2022): one fewer all-reduce per layer when partitioned. Decoder-only.
  parallel_block: bool = False
  # kernels.attention: 'xla' (dense masks), 'pallas' (flash / decode kernels), 'cudnn' (GPU) or
  # 'auto' (pallas on GPU where it applies, else xla). 'pallas' raises where the kernels cannot
  # apply a case (prefix-LM masks, attention dropout, relative bias at decoding steps or with
  # explicit positions); 'auto' runs those on xla.
  attention_implementation: str = 'xla'
  # --- architecture variation points (README, Architectures) ---
  # The token mixer of each layer: a pattern repeated over each stack's layers, layer i using
  # token_mixers[i % len(token_mixers)], like the MoE layouts. ('attention',) is dense attention
  # everywhere; a hybrid such as ('bigbird', 'bigbird', 'bigbird', 'attention') is one line.
  token_mixers: tuple[str, ...] = ('attention',)
  # The encoder's pattern when it differs from the decoder's (None: token_mixers), e.g. FNet's
  # ('fnet',) in a T5 encoder whose decoder keeps attention.
  encoder_token_mixers: tuple[str, ...] | None = None
  # 'h3' (layers/h3.py), 'gss' (layers/gss.py): causal state space mixers; 'fnet'
  # (layers/fourier_mixing.py): Fourier mixing, bidirectional, for encoders.
  h3: H3Config | None = None
  gss: GssConfig | None = None
  # 's4d' (layers/ssm.S4dMixer): a plain diagonal SSM layer, the baseline of H3's ablations.
  s4d: SsmConfig | None = None
  fourier: FourierConfig | None = None
  # Self-attention layers read only keys within this many positions (|i - j| < window; causal
  # in decoders): local attention, e.g. for the GSS-Hybrid. 0: unlimited.
  attention_window: int = 0
  # 'bigbird': block-sparse attention (layers/bigbird.py), its pattern from this config.
  bigbird: BigBirdConfig | None = None
  # 'lsh': Reformer's LSH attention (layers/lsh_attention.py), shared query/key projection.
  lsh: LshConfig | None = None
  # The attention-logit path between layers: each self-attention mixes its logits with the
  # previous layer's through a residual convolution (Wang et al. 2021). None: independent.
  evolving_attention: EvolvingAttentionConfig | None = None
  # The stack's residual structure. 'standard': x + mixer(norm(x)), then + mlp(norm(.)).
  # 'reversible' (RevNet; Reformer sec. 3): two streams, y1 = x1 + F(x2), y2 = x2 + G(y1) with
  # F the pre-normed token mixer and G the pre-normed MLP, the same parameters as 'standard';
  # the backward pass recomputes activations, so their memory does not grow with depth
  # (models/reversible_transformer.py).
  residual: str = 'standard'
  # Reversible layers: the MLP runs on this many slices of the length (Reformer's chunking).
  reversible_ff_chunks: int = 1
  # 'block_recurrent' / 'block_window' layers (Hutchins et al. 2022), e.g. token_mixers =
  # ('block_window',) * 3 + ('block_recurrent',) for the paper's recurrence in one layer of four.
  block_recurrent: BlockRecurrentConfig | None = None
  # Block layers keep their states and windows from one training step to the next (truncated
  # backprop across steps, the paper's training): the batches must be document streams
  # (DatasetConfig.document_streams), which the trainer checks. False: every row starts fresh.
  carry_state: bool = False
  # Scaling Transformer (Jaszczur et al. 2021): every dense feed-forward layer keeps one hidden
  # unit per block, chosen by a low-rank controller (layers/sparse_ffn.py) ...
  sparse_ffn: SparseFfnConfig | None = None
  # ... and self-attention projects Q/K/V through a multiplicative layer and convolutions
  # (layers/sparse_qkv.py). None: dense.
  sparse_qkv: SparseQkvConfig | None = None
  # (IA)3 (Liu et al. 2022; layers/ia3.py): learned vectors, initialized to ones, rescale the keys
  # and values of every attention and the hidden activations of every MLP and MoE expert. A run
  # that trains only them: configs/runs/ia3_finetune.gin (README, Parameter-efficient fine-tuning).
  ia3: bool = False

  def __post_init__(self):
    # gin passes lists; keep the dataclass hashable.
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    object.__setattr__(self, 'token_mixers', tuple(self.token_mixers))
    if self.encoder_token_mixers is not None:
      object.__setattr__(self, 'encoder_token_mixers', tuple(self.encoder_token_mixers))
    kv = self.num_kv_heads or self.num_heads
    checks = [
        (self.position_embedding in POSITION_EMBEDDINGS,
         f'position_embedding {self.position_embedding!r} not in {POSITION_EMBEDDINGS}'),
        (self.remat_policy in REMAT_POLICIES,
         f'remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}'),
        (kv > 0 and self.num_heads % kv == 0,
         f'num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}'),
        (self.position_embedding != 'rotary' or self.head_dim % 2 == 0,
         f'rotary embeddings need an even head_dim, got {self.head_dim}'),
        (0.0 <= self.dropout_rate < 1.0, f'dropout_rate {self.dropout_rate} not in [0, 1)'),
        (not self.parallel_block or self.num_encoder_layers == 0,
         'parallel_block is for decoder-only models (num_encoder_layers = 0)'),
        (self.attention_implementation in ATTENTION_IMPLEMENTATIONS,
         f'attention_implementation {self.attention_implementation!r} not in '
         f'{ATTENTION_IMPLEMENTATIONS}'),
        (bool(self.token_mixers) and set(self.token_mixers) <= set(TOKEN_MIXERS),
         f'token_mixers {self.token_mixers} must be a non-empty pattern of {TOKEN_MIXERS}'),
        ('bigbird' not in self.token_mixers or self.bigbird is not None,
         "token_mixers use 'bigbird': set TransformerConfig.bigbird = @BigBirdConfig() (see "
         'configs/models/bigbird/)'),
        (self.attention_implementation in ('xla', 'pallas') or 'bigbird' not in self.token_mixers,
         "bigbird layers run on 'xla' (gathered blocks) or 'pallas' (block-sparse flash "
         f'kernels), not {self.attention_implementation!r}'),
        (not self.scan_layers or not {'bigbird', 'lsh'} & set(self.token_mixers),
         'bigbird and lsh layers draw their random blocks / hash rotations per layer, and '
         'scanned layers are one traced function that does not know its index yet: set '
         'scan_layers = False'),
        ('lsh' not in self.token_mixers or self.lsh is not None,
         "token_mixers use 'lsh': set TransformerConfig.lsh = @LshConfig() (see "
         'configs/models/reformer/)'),
        ('lsh' not in self.token_mixers or self.position_embedding == 'rotary',
         "lsh layers take no relative position bias: set position_embedding = 'rotary'"),
        ('lsh' not in self.token_mixers or kv in (self.num_heads,),
         'lsh layers share queries and keys, with as many value heads as query heads: set '
         f'num_kv_heads = None (got {self.num_kv_heads})'),
        ('lsh' not in self.token_mixers or self.attention_implementation == 'xla',
         "lsh layers have no kernel: set attention_implementation = 'xla'"),
        (self.residual in RESIDUALS, f'residual {self.residual!r} not in {RESIDUALS}'),
        (self.reversible_ff_chunks >= 1,
         f'reversible_ff_chunks must be >= 1 (1: unchunked), got {self.reversible_ff_chunks}'),
        (self.reversible_ff_chunks == 1 or self.residual == 'reversible',
         "reversible_ff_chunks chunks the MLP of reversible layers only: set residual = "
         "'reversible' or reversible_ff_chunks = 1"),
        (self.evolving_attention is None or (set(self.token_mixers) == {'attention'} and
                                             self.attention_implementation == 'xla'),
         'evolving_attention mixes the [heads, q, k] logits of dense attention: it needs '
         "token_mixers ('attention',) and attention_implementation 'xla' (the kernels never "
         f'form the logits); got {self.token_mixers}, {self.attention_implementation!r}'),
    ]
    checks += self._attention_free_checks()
    checks += self._block_recurrent_checks()
    checks += self._scaling_checks()
    if self.ia3:
      checks += self._ia3_checks()
    if self.residual == 'reversible':
      checks += self._reversible_checks()
    for name in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim'):
      checks.append((getattr(self, name) > 0, f'{name} must be positive'))
    for ok, message in checks:
      if not ok:
        raise ValueError(f'TransformerConfig: {message}.')
    for name in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f'TransformerConfig.{name}: unknown dtype {getattr(self, name)!r}.') from e

  @property
  def all_mixers(self) -> set[str]:
    """Every token mixer of either stack."""
    mixers = set(self.token_mixers) if self.num_decoder_layers else set()
    if self.num_encoder_layers:
      mixers |= set(self.encoder_token_mixers or self.token_mixers)
    return mixers

  def _attention_free_checks(self) -> list[tuple[bool, str]]:
    """H3, GSS and Fourier mixers: their configs, the stack each may sit in, the options that
    concern attention layers only."""
    encoder = self.encoder_token_mixers or self.token_mixers
    used = self.all_mixers
    decoder_uses = set(self.token_mixers) if self.num_decoder_layers else set()
    encoder_uses = set(encoder) if self.num_encoder_layers else set()
    return [
        (self.encoder_token_mixers is None or (
            bool(self.encoder_token_mixers) and set(encoder) <= set(TOKEN_MIXERS)),
         f'encoder_token_mixers {self.encoder_token_mixers} must be None or a non-empty '
         f'pattern of {TOKEN_MIXERS}'),
        ('h3' not in used or self.h3 is not None,
         "token_mixers use 'h3': set TransformerConfig.h3 = @H3Config() (see configs/models/h3/)"),
        ('gss' not in used or self.gss is not None,
         "token_mixers use 'gss': set TransformerConfig.gss = @GssConfig() (see "
         'configs/models/gss/)'),
        ('s4d' not in used or self.s4d is not None,
         "token_mixers use 's4d': set TransformerConfig.s4d = @SsmConfig() (see "
         'configs/models/h3/s4d.gin)'),
        ('fnet' not in used or self.fourier is not None,
         "token_mixers use 'fnet': set TransformerConfig.fourier = @FourierConfig() (see "
         'configs/models/fnet/)'),
        ('fnet' not in decoder_uses,
         "'fnet' mixes every position with every other (the DFT looks ahead), so it cannot be "
         'a causal decoder layer: use it in an encoder (encoder_token_mixers = (\'fnet\',)) '
         "and keep the decoder's token_mixers causal"),
        (not set(SSM_MIXERS) & encoder_uses,
         f'{sorted(set(SSM_MIXERS) & encoder_uses)} layers are causal state space models (only '
         'the left context): an encoder needs bidirectional mixing. Set encoder_token_mixers, '
         "e.g. ('attention',) or ('fnet',)"),
        (bool(used & set(ATTENTION_MIXERS)) or self.num_encoder_layers > 0 or
         self.attention_implementation in ('xla', 'auto'),
         f'attention_implementation {self.attention_implementation!r} selects attention kernels, '
         f'but no layer of this model attends (token_mixers {self.token_mixers}): set '
         "attention_implementation = 'xla'"),
        (self.attention_window >= 0, f'attention_window must be >= 0 (0: unlimited), got '
         f'{self.attention_window}'),
        (self.attention_window == 0 or self.attention_implementation == 'xla',
         "attention_window is applied through the dense mask: set attention_implementation = "
         f"'xla' (got {self.attention_implementation!r})"),
        (self.attention_window == 0 or not {'bigbird', 'lsh'} & used,
         'attention_window restricts dense attention layers; bigbird and lsh layers have their '
         'own sparsity patterns: set attention_window = 0'),
    ]

  def _scaling_checks(self) -> list[tuple[bool, str]]:
    """The Scaling Transformer's sparse layers: the widths they split, what they replace."""
    checks = []
    ffn, qkv = self.sparse_ffn, self.sparse_qkv
    if ffn is not None:
      checks += [
          (self.mlp_dim % ffn.block_size == 0,
           f'mlp_dim {self.mlp_dim} is not divisible by SparseFfnConfig.block_size '
           f'{ffn.block_size}: set mlp_dim to a multiple of it or pick a block_size dividing it'),
          (self.moe is None, 'sparse_ffn makes every dense feed-forward layer sparse and moe '
           'makes some of them Mixture-of-Experts layers: set one of sparse_ffn, moe to None'),
      ]
    if qkv is not None:
      kv = self.num_kv_heads or self.num_heads
      s = qkv.num_modules
      for what, width in (('emb_dim', self.emb_dim), ('num_heads * head_dim',
                                                        self.num_heads * self.head_dim),
                          ('num_kv_heads * head_dim', kv * self.head_dim)):
        checks.append((width % s == 0, f'{what} = {width} is not divisible by '
                       f'SparseQkvConfig.num_modules {s}: pick num_modules dividing it'))
      checks += [
          (bool(self.all_mixers & set(ATTENTION_MIXERS)),
           f'sparse_qkv replaces the Q/K/V projections of attention layers, but no layer '
           f'attends (token_mixers {self.token_mixers}): set sparse_qkv = None'),
          (self.num_encoder_layers == 0 or qkv.length_kernel % 2 == 1,
           f'the encoder\'s sparse_qkv convolution is centered over the length, so it needs an '
           f'odd SparseQkvConfig.length_kernel (got {qkv.length_kernel})'),
      ]
    return checks

  def _ia3_checks(self) -> list[tuple[bool, str]]:
    """(IA)3 scales what dense attention and MLP/MoE layers compute; other layers lack it."""
    others = sorted(self.all_mixers - {'attention', 'bigbird'})
    return [
        (not others, f'ia3 scales the key and value projections of attention layers, which '
         f'token_mixers {others} do not have (LSH shares queries and keys; the state space, '
         'Fourier and block-recurrent mixers project no keys): set ia3 = False, or use '
         "token_mixers ('attention',) or ('bigbird',)"),
        (self.sparse_qkv is None, 'ia3 scales the outputs of dense key and value projections; '
         'sparse_qkv replaces them: set sparse_qkv = None or ia3 = False'),
        (self.sparse_ffn is None, 'ia3 scales every hidden unit of the dense feed-forward '
         'layers; sparse_ffn computes only some of them: set sparse_ffn = None or ia3 = False'),
    ]

  def _block_recurrent_checks(self) -> list[tuple[bool, str]]:
    """Block-recurrent layers: their config, causal stacks only, what carries state."""
    used = self.all_mixers & set(BLOCK_MIXERS)
    encoder = (set(self.encoder_token_mixers or self.token_mixers) if self.num_encoder_layers
               else set())
    return [
        (not used or self.block_recurrent is not None,
         f"token_mixers use {sorted(used)}: set TransformerConfig.block_recurrent = "
         '@BlockRecurrentConfig() (see configs/models/block_recurrent/)'),
        (not encoder & set(BLOCK_MIXERS),
         'block_recurrent / block_window layers are causal (each block reads only earlier '
         'ones): an encoder needs bidirectional mixing; set encoder_token_mixers, e.g. '
         "('attention',)"),
        (not self.carry_state or bool(used),
         'carry_state keeps block-recurrent layers\' state across training steps, but no layer '
         f'is one (token_mixers {self.token_mixers}): set carry_state = False'),
        (not used or self.residual == 'standard',
         "block-recurrent layers write their state collections, which the reversible stack's "
         "custom gradient cannot carry: set residual = 'standard'"),
    ]

  def _reversible_checks(self) -> list[tuple[bool, str]]:
    """What residual='reversible' cannot combine with (each branch may hold only parameters,
    and the stack applies its layers itself)."""
    why = "residual 'reversible'"
    return [
        (self.moe is None, f'{why} cannot sow the MoE auxiliary losses from inside its custom '
         'gradient: set moe = None (dense feed-forward layers) or residual = \'standard\''),
        (self.evolving_attention is None, f'{why} layers see one stream, not the previous '
         "layer's logits: set evolving_attention = None or residual = 'standard'"),
        (not self.parallel_block, f'{why} already splits each layer into F (mixer) and G (MLP) '
         'on two streams: set parallel_block = False'),
        (not self.scan_layers, f'{why} applies its layers unrolled under its own custom '
         'gradient: set scan_layers = False'),
        (self.remat_policy == 'none', f'{why} recomputes every activation in its backward pass '
         f'already: set remat_policy = \'none\' (got {self.remat_policy!r})'),
    ]

  @property
  def structured_masks(self) -> bool:
    """Whether the stacks pass masks as AttentionMask structures and the relative bias as its
    table: the kernels and every token mixer other than dense 'xla' attention need them (dense
    layers then build their [q, k] masks and bias themselves)."""
    return self.attention_implementation != 'xla' or self.all_mixers != {'attention'}

  def mixer_pattern(self, num_layers: int, stack: str = 'decoder') -> tuple[str, ...]:
    """The token mixer of each of a stack's (`stack`: 'encoder' or 'decoder') layers."""
    mixers = self.token_mixers
    if stack == 'encoder' and self.encoder_token_mixers is not None:
      mixers = self.encoder_token_mixers
    return tuple(mixers[i % len(mixers)] for i in range(num_layers))

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)
