"""Autoregressive decoding: prefill, then one token per step against the KV cache.

`generate` decodes a batch of prompts of different lengths with greedy search, sampling
(temperature, top-k, top-p) or beam search, stopping a sequence at EOS and the batch when every
sequence has stopped or `max_decode_length` tokens were produced. The loop is a
`lax.while_loop` inside one jit, so a step costs one dispatch-free iteration.

The search itself (`search`) takes a step function `(cache, tokens, positions) -> (logits,
cache)`, so decoders other than the Flax model (the partitioned layouts, layout_generate.py)
share the sampling and beam code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from efficientlm.inference import kv_cache
from efficientlm.models.model import BaseModel

METHODS = ('greedy', 'sample', 'beam')
NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How to decode (bound by runs/infer.gin). Token 0 is padding/BOS, `eos_id` ends a sequence."""

  method: str = 'greedy'
  max_decode_length: int = 64
  temperature: float = 1.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1: no nucleus filter
  num_beams: int = 4
  length_penalty: float = 0.6  # GNMT's alpha: beams rank by logp / ((5 + len) / 6) ** alpha
  eos_id: int = 1

  def __post_init__(self):
    checks = [(self.method in METHODS, f'method {self.method!r} not in {METHODS}'),
              (self.max_decode_length > 0, 'max_decode_length must be positive'),
              (self.temperature > 0, 'temperature must be positive (use method="greedy")'),
              (self.top_k >= 0, 'top_k must be >= 0'),
              (0 < self.top_p <= 1, 'top_p must be in (0, 1]'),
              (self.num_beams >= 1, 'num_beams must be >= 1')]
    for ok, message in checks:
      if not ok:
        raise ValueError(f'DecodeOptions: {message}.')


@dataclasses.dataclass(frozen=True)
class Decoded:
  """tokens [batch, max_decode_length] (beam: the best beam), 0 after EOS; lengths [batch]
  (EOS included); scores [batch]: log-probability of the tokens (beam: length-penalized);
  beams/beam_scores [batch, num_beams, ...] for beam search."""

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  beams: jax.Array | None = None
  beam_scores: jax.Array | None = None


jax.tree_util.register_dataclass(Decoded, data_fields=[f.name for f in
                                                       dataclasses.fields(Decoded)],
                                 meta_fields=[])


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits with everything outside the top-k and outside the top-p nucleus set to NEG_INF.

  The nucleus is the smallest set of most likely tokens whose probability reaches top_p
  (Holtzman et al. 2020); the most likely token always stays.
  """
  logits = logits.astype(jnp.float32)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    sorted_logits = jnp.where(before < top_p, sorted_logits, NEG_INF)
    logits = jnp.full_like(logits, NEG_INF).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return logits


def _choose(logits, options: DecodeOptions, rng):
  if options.method == 'greedy':
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / options.temperature, options.top_k, options.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decoder_prompt(model: BaseModel, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(decoder prompt [batch, P], lengths [batch]): [0] + the prompt for decoder-only models
  (prompts are right-padded with 0, which no vocabulary uses for a real token), [0] for
  encoder-decoder models (whose prompts are the encoder inputs)."""
  batch = prompts.shape[0]
  if kv_cache.is_encoder_decoder(model):
    return jnp.zeros((batch, 1), jnp.int32), jnp.ones((batch,), jnp.int32)
  return bos_prompt(prompts)


def bos_prompt(prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A decoder-only model's prompt: [0] + prompt, and its lengths (BOS included)."""
  lengths = jnp.sum(prompts > 0, axis=1).astype(jnp.int32) + 1
  tokens = jnp.concatenate([jnp.zeros((prompts.shape[0], 1), prompts.dtype), prompts], axis=1)
  return tokens.astype(jnp.int32), lengths


def last_logits(logits: jax.Array, lengths: jax.Array) -> jax.Array:
  """Each row's logits at its last valid prompt position: [B, P, V] -> [B, V]."""
  return logits[jnp.arange(logits.shape[0]), lengths - 1]


def repeat_rows(tree, copies: int, axis: int = 0):
  """Every leaf repeated `copies` times along its batch `axis` (beams share a prompt's cache)."""
  return jax.tree.map(lambda x: jnp.repeat(x, copies, axis=axis), tree)


def _prefill(model, params, prompts, options, copies, cache_length):
  tokens, lengths = decoder_prompt(model, prompts)
  needed = tokens.shape[1] + options.max_decode_length
  cache_length = cache_length or needed
  if needed > cache_length:
    raise ValueError(f'A prompt of {tokens.shape[1]} decoder tokens plus max_decode_length '
                     f'{options.max_decode_length} needs {needed} cache slots; the cache has '
                     f'{cache_length}.')
  encoder_tokens = prompts if kv_cache.is_encoder_decoder(model) else None
  cache = kv_cache.init_cache(model, params, prompts.shape[0], cache_length,
                              None if encoder_tokens is None else encoder_tokens.shape[1])
  logits, cache = kv_cache.prefill(model, params, cache, tokens, lengths, encoder_tokens)
  logits = last_logits(logits, lengths)
  if copies > 1:  # beams share the prompt's cache
    cache = repeat_rows(cache, copies, _cache_batch_axis(model))
    logits, lengths, encoder_tokens = repeat_rows((logits, lengths, encoder_tokens), copies)
  return logits, cache, lengths, encoder_tokens


def _cache_batch_axis(model: BaseModel) -> int:
  return 1 if model.module.config.scan_layers else 0


@functools.partial(jax.jit, static_argnames=('model', 'options', 'cache_length'))
def generate(model: BaseModel, params: Any, prompts: jax.Array, options: DecodeOptions,
             rng: jax.Array | None = None, cache_length: int | None = None) -> Decoded:
  """Decodes `prompts` [batch, P] (right-padded with 0; the encoder inputs for an
  encoder-decoder model). `rng` is required for sampling; the same rng gives the same tokens."""
  copies = options.num_beams if options.method == 'beam' else 1
  logits, cache, lengths, encoder_tokens = _prefill(model, params, prompts, options, copies,
                                                    cache_length)

  def step(cache, tokens, positions):
    return kv_cache.step(model, params, cache, tokens, positions, encoder_tokens)
  return search(step, logits, cache, lengths, options, rng, _cache_batch_axis(model))


def search(step, logits: jax.Array, cache: Any, lengths: jax.Array, options: DecodeOptions,
           rng: jax.Array | None = None, cache_batch_axis: int = 0) -> Decoded:
  """Greedy, sampling or beam search from a prefilled cache. `step(cache, tokens [rows],
  positions [rows]) -> (logits [rows, V], cache)`; `logits` [rows, V] are the prompts' last
  logits and `lengths` [rows] their lengths (BOS included); for beam search every row is
  repeated num_beams times already (repeat_rows), the cache along `cache_batch_axis`."""
  if options.method == 'beam':
    return _beam_search(step, logits, cache, lengths, options, cache_batch_axis)
  if options.method == 'sample' and rng is None:
    raise ValueError('Sampling needs an rng.')
  rng = jax.random.key(0) if rng is None else rng
  batch, steps = logits.shape[0], options.max_decode_length
  init = dict(i=jnp.int32(0), logits=logits, cache=cache,
              tokens=jnp.zeros((batch, steps), jnp.int32), done=jnp.zeros((batch,), bool),
              scores=jnp.zeros((batch,), jnp.float32), count=jnp.zeros((batch,), jnp.int32))

  def body(s):
    token = _choose(s['logits'], options, jax.random.fold_in(rng, s['i']))
    logp = jax.nn.log_softmax(s['logits'].astype(jnp.float32), axis=-1)
    token = jnp.where(s['done'], 0, token)
    scores = s['scores'] + jnp.where(s['done'], 0.0,
                                     jnp.take_along_axis(logp, token[:, None], -1)[:, 0])
    tokens = s['tokens'].at[:, s['i']].set(token)
    count = s['count'] + ~s['done']
    done = s['done'] | (token == options.eos_id)
    logits, cache = step(s['cache'], token, lengths + s['i'])
    return dict(i=s['i'] + 1, logits=logits, cache=cache, tokens=tokens, done=done,
                scores=scores, count=count)

  out = jax.lax.while_loop(lambda s: (s['i'] < steps) & ~jnp.all(s['done']), body, init)
  return Decoded(out['tokens'], out['count'], out['scores'])


def _length_penalty(lengths, alpha):
  return ((5.0 + lengths.astype(jnp.float32)) / 6.0)**alpha


def _beam_search(step, logits, cache, lengths, options: DecodeOptions, batch_axis: int):
  """Beam search over `num_beams` hypotheses per prompt.

  Hypotheses that reached EOS stay in the beam with a frozen score (they continue with padding
  at no cost) and compete with the live ones on raw log-probability; the final ranking divides
  by GNMT's length penalty. With enough beams (num_beams >= vocab**(steps-1)) this is exact
  search, which the tests use.
  """
  k, steps, eos = options.num_beams, options.max_decode_length, options.eos_id
  batch, vocab = logits.shape[0] // k, logits.shape[-1]
  # Only the first copy of each prompt is live at the start, so the beams differ.
  scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (batch, 1))
  init = dict(i=jnp.int32(0), logits=logits, cache=cache, scores=scores,
              tokens=jnp.zeros((batch, k, steps), jnp.int32), done=jnp.zeros((batch, k), bool),
              count=jnp.zeros((batch, k), jnp.int32))

  def body(s):
    logp = jax.nn.log_softmax(s['logits'].astype(jnp.float32), -1).reshape(batch, k, vocab)
    # A finished hypothesis extends only with padding, at no cost.
    pad_only = jnp.where(jnp.arange(vocab) == 0, 0.0, NEG_INF)
    logp = jnp.where(s['done'][..., None], pad_only, logp)
    candidates = (s['scores'][..., None] + logp).reshape(batch, k * vocab)
    scores, flat = jax.lax.top_k(candidates, k)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(s['tokens'], parent[..., None], axis=1)
    tokens = tokens.at[:, :, s['i']].set(token)
    was_done = jnp.take_along_axis(s['done'], parent, axis=1)
    count = jnp.take_along_axis(s['count'], parent, axis=1) + ~was_done
    done = was_done | (token == eos)
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=batch_axis), s['cache'])
    logits, cache = step(cache, token.reshape(-1), lengths + s['i'])
    return dict(i=s['i'] + 1, logits=logits, cache=cache, scores=scores, tokens=tokens,
                done=done, count=count)

  out = jax.lax.while_loop(lambda s: (s['i'] < steps) & ~jnp.all(s['done']), body, init)
  ranked = out['scores'] / _length_penalty(out['count'], options.length_penalty)
  order = jnp.argsort(-ranked, axis=1)
  beams = jnp.take_along_axis(out['tokens'], order[..., None], axis=1)
  ranked = jnp.take_along_axis(ranked, order, axis=1)
  best_length = jnp.take_along_axis(out['count'], order, axis=1)[:, 0]
  return Decoded(beams[:, 0], best_length, ranked[:, 0], beams, ranked)
