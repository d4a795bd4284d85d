"""Float32 rounding-error bounds, per element, for tests that compare two computations.

A kernel and its reference compute the same sums in different orders (blocks, an online softmax,
another matmul algorithm, more or fewer threads), so they differ by rounding error. A fixed
atol/rtol fails by chance when the inputs or the summation order change; these bounds do not.

Model: float32 rounds to nearest with unit roundoff U = 2**-24. A sum of n products computed in
any order has |error| <= n U sum|terms| (first order; the gamma_n bound of Higham, Accuracy and
Stability of Numerical Algorithms, 2nd ed., section 3.1): it grows with the reduction length and
with the sum of the terms' magnitudes, not with the result, which cancellation can make small.
Typical errors grow like sqrt(n) U sum|terms|: the bound is a worst case that no summation order
or thread count exceeds, so a comparison within it does not fail by chance.

`dot_bound`: one float32 evaluation of sums of products against an exact (float64) one.
`attention_error_bounds`: two float32 evaluations of attention and its gradients, where two
more things follow: dS = P (dP - D) cancels, so its error is relative to P (|dP| + |D|); and
the logits' error, d U scale sum|q| |k| (+ the bias), enters P relatively, so large logits
(scale 1 on random inputs) make every output of their row less accurate. Chained through
attention, with sigma_i the largest logit magnitude scale sum_c |q_ic k_jc| + |bias_ij| of row i
over its visible keys:
  P's relative error   eps_i = U (2 (d + 3) sigma_i + 3 k_len + 4)
    (the row's own logit and the max/normalizer's, d + 2 roundings each; the shift s - max
    (|s - max| <= 2 sigma_i); exp, the division; the normalizer's sum of k_len terms and the
    online softmax's per-block rescales, which the 3 k_len also covers for the backward's
    recomputation from the logsumexp)
  out_i  = sum_j P_ij v_j            |err| <= sum_j P_ij |v_j| (eps_i + k_len U)
  dv_j   = sum_i P_ij dO_i           |err| <= sum_i P_ij |dO_i| (eps_i + n_q U)
  dS_ij  = P_ij (dP_ij - D_i)        |err| <= P_ij W_ij (eps_i + (d + 2) U)
                                                + P_ij |dO_i| . err(out_i)
           with W_ij = |dO_i| . |v_j| + |dO_i| . |out_i| (the terms of dP and D)
  dq_i   = scale sum_j dS_ij k_j     |err| <= scale sum_j (err(dS_ij) + k_len U P_ij W_ij) |k_j|
  dk_j   = scale sum_i dS_ij q_i     |err| <= scale sum_i (err(dS_ij) + n_q U P_ij W_ij) |q_i|
  dtable[h, n] = sum over bucket n of dS  (n_n = the bucket's size, as for dk)
where n_q = q_len * group (dk and dv of a KV head sum over its query heads) and P, W, out come
from an exact (float64) evaluation. Both evaluations obey the bound, so they differ by at most
twice it: that is the tolerance. Elements that read nothing (P = 0) get bound 0: they must match
exactly. Measured over the kernel tests, with 1 and 2 threads and other seeds, the errors stay
below 5% of the bound; a wrong mask (window off by one), a missing scale in dq or P rounded to
bfloat16 in the float32 kernel exceed it on most elements.

`logits_bound`: a whole network's logits, first order, assuming each layer passes on its input's
relative error with gain about 1 (pre-norm residual layers at initialization scale); looser in
principle, so it carries a wide margin (errors measured at under 1% of it).
"""

from __future__ import annotations

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff (round to nearest)
U_BF16 = 2.0 ** -8  # bfloat16's (8 significant bits)


def dot_bound(n: int, magnitude):
  """|float32 result - exact| for sums of n products whose |terms| sum to `magnitude` (an array:
  the same computation on the inputs' absolute values), computed in float32 from float64 inputs
  rounded to float32: gamma_(n+2) magnitude, 2 for rounding each factor of a product, with
  gamma_m = m U / (1 - m U) (exact, not first order)."""
  m = n + 2
  return m * U / (1 - m * U) * np.asarray(magnitude, np.float64)


def transformer_reduction_length(cfg, inputs_len: int, targets_len: int) -> int:
  """The summed lengths of the reductions on an encoder-decoder's (or, with inputs_len 0, a
  decoder's) path to its logits: per layer the norms (emb), the q/k/v projections (emb), the
  logits (head_dim), softmax and values (the keys), the output projection (heads * head_dim)
  and the MLP (emb, mlp); the final norm and the logits (emb each)."""
  def attention(keys):
    return 2 * cfg.emb_dim + cfg.head_dim + keys + cfg.num_heads * cfg.head_dim
  mlp = 2 * cfg.emb_dim + cfg.mlp_dim
  encoder = cfg.num_encoder_layers * (attention(inputs_len) + mlp) if inputs_len else 0
  cross = attention(inputs_len) if inputs_len else 0
  decoder = cfg.num_decoder_layers * (attention(targets_len) + cross + mlp)
  return encoder + decoder + 2 * cfg.emb_dim


def logits_bound(hidden, kernel, reduction_length: int):
  """Two float32 evaluations of one network's logits = hidden @ kernel (hidden: the final norm's
  output [..., emb], kernel [emb, vocab]): first order, each stage of the network adds at most
  its reduction length times U to the hidden state's relative error (pre-norm residual layers
  pass it on with gain about 1), and the logits' own sum adds emb U; so each logit is off by at
  most reduction_length U sum_e |hidden_e| |kernel_ev|, the two evaluations by twice that."""
  magnitude = np.abs(np.asarray(hidden, np.float64)) @ np.abs(np.asarray(kernel, np.float64))
  return 2 * reduction_length * U * magnitude


def _f64(x):
  return None if x is None else np.asarray(x, np.float64)


def attention_error_bounds(q, k, v, d_out=None, *, scale: float = 1.0, mask=None, bias=None,
                           bias_buckets=None, num_buckets: int | None = None,
                           bfloat16: bool = False) -> dict:
  """Tolerances for two float32 evaluations of attention(q, k, v) and its gradients.

  bfloat16: one evaluation is a kernel on bfloat16 inputs (those given here), the other float32
  on the same values. The kernel rounds P and dS to bfloat16 (unit roundoff U_BF16) before its
  matmuls, as FlashAttention does, and its outputs and the output cotangent to bfloat16. Each
  such rounding errs by U_BF16 relative to the terms it feeds, which adds U_BF16 times: 3 sum_j
  P_ij |v_j| to out (P, the output; a float32 reference rounded to bfloat16 too), 3 sum_i P_ij
  |dO_i| to dv (P, dO, the output), 4 scale sum P W |k| or |q| to dq and dk (dO and the rounded
  output in dP and D, dS, the output) and 3 sum P W to the d table.

  q [b, q_len, heads, d]; k, v [b, k_len, kv_heads, d]; mask bool [b|1, q_len, k_len] (True:
  read), bias float [b|1, heads, q_len, k_len] added to the scaled logits. With d_out (the
  output cotangent) also the gradients' bounds; with bias_buckets (int [q_len, k_len], the
  relative-bias bucket of each pair) and num_buckets, the bound of the d table [heads, buckets].
  Returns {'out', 'dq', 'dk', 'dv', 'dbias', 'dtable'} (those that apply), each shaped as the
  array it bounds.
  """
  q, k, v, d_out, bias = _f64(q), _f64(k), _f64(v), _f64(d_out), _f64(bias)
  b, q_len, heads, depth = q.shape
  k_len, kv_heads = k.shape[1], k.shape[2]
  group = heads // kv_heads
  kk, vv = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head h reads h // group
  logits = scale * np.einsum('bqhd,bkhd->bhqk', q, kk)
  sigma = abs(scale) * np.einsum('bqhd,bkhd->bhqk', np.abs(q), np.abs(kk))
  if bias is not None:
    logits, sigma = logits + bias, sigma + np.abs(bias)
  visible = np.ones(logits.shape, bool)
  if mask is not None:
    visible = np.broadcast_to(np.asarray(mask, bool)[:, None], logits.shape)
  logits = np.where(visible, logits, -np.inf)
  row_max = logits.max(-1, keepdims=True)
  p = np.where(visible, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  p /= np.maximum(p.sum(-1, keepdims=True), np.finfo(np.float64).tiny)
  sigma_row = np.where(visible, sigma, 0.0).max(-1, keepdims=True)  # [b, heads, q, 1]
  eps = U * (2 * (depth + 3) * sigma_row + 3 * k_len + 4)

  def per_kv_head(x):  # [b, k_len, heads, d] -> [b, k_len, kv_heads, d]: sum over the group
    return x.reshape(b, k_len, kv_heads, group, depth).sum(3)

  n_q = q_len * group
  out = np.einsum('bhqk,bkhd->bqhd', p, vv)
  out_terms = np.einsum('bhqk,bkhd->bqhd', p, np.abs(vv))
  out_err = np.einsum('bhqk,bkhd->bqhd', p * (eps + k_len * U), np.abs(vv))
  bounds = {'out': (out_err, out_terms, 3)}  # (float32 bound, terms, bfloat16 roundings)
  if d_out is not None:
    dv_terms = per_kv_head(np.einsum('bhqk,bqhd->bkhd', p, np.abs(d_out)))
    bounds['dv'] = (per_kv_head(np.einsum('bhqk,bqhd->bkhd', p * (eps + n_q * U),
                                          np.abs(d_out))), dv_terms, 3)
    w = (np.einsum('bqhd,bkhd->bhqk', np.abs(d_out), np.abs(vv)) +
         np.einsum('bqhd,bqhd->bhq', np.abs(d_out), np.abs(out))[..., None])
    ds_terms = p * w
    ds_err = (ds_terms * (eps + (depth + 2) * U) +
              p * np.einsum('bqhd,bqhd->bhq', np.abs(d_out), out_err)[..., None])
    bounds['dq'] = (abs(scale) * np.einsum('bhqk,bkhd->bqhd', ds_err + k_len * U * ds_terms,
                                           np.abs(kk)),
                    abs(scale) * np.einsum('bhqk,bkhd->bqhd', ds_terms, np.abs(kk)), 4)
    bounds['dk'] = (abs(scale) * per_kv_head(
        np.einsum('bhqk,bqhd->bkhd', ds_err + n_q * U * ds_terms, np.abs(q))),
                    abs(scale) * per_kv_head(np.einsum('bhqk,bqhd->bkhd', ds_terms, np.abs(q))), 4)
    bounds['dbias'] = (ds_err, ds_terms, 3)
    if bias_buckets is not None:
      ids = np.asarray(bias_buckets)
      counts = np.bincount(ids.ravel(), minlength=num_buckets) * b
      err, terms = np.zeros((heads, num_buckets)), np.zeros((heads, num_buckets))
      for n in range(num_buckets):
        hit = ids == n
        terms[:, n] = ds_terms[..., hit].sum((0, 2))
        err[:, n] = ds_err[..., hit].sum((0, 2)) + counts[n] * U * terms[:, n]
      bounds['dtable'] = (err, terms, 3)
  # Two float32 evaluations; with bfloat16, the kernel's roundings on top.
  return {name: 2 * err + (roundings * U_BF16 * terms if bfloat16 else 0.0)
          for name, (err, terms, roundings) in bounds.items()}


def assert_within(got, want, tolerance, name: str = '') -> float:
  """|got - want| <= tolerance elementwise (NaN fails); returns the worst |got - want| / bound."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  tolerance = np.broadcast_to(np.asarray(tolerance, np.float64), want.shape)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = np.abs(got - want)
  ok = err <= tolerance  # False for NaN
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = np.where(err == 0, 0.0, err / tolerance)
  if not ok.all():
    worst = np.unravel_index(np.argmax(np.where(ok, -1.0, np.nan_to_num(ratio, nan=np.inf))),
                             err.shape)
    raise AssertionError(
        f'{name}: {np.sum(~ok)} of {ok.size} elements differ by more than the rounding-error '
        f'bound; worst at {tuple(int(i) for i in worst)}: got {got[worst]!r}, want '
        f'{want[worst]!r}, bound {tolerance[worst]!r}')
  return float(ratio.max(initial=0.0))
