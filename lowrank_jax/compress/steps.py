"""MoDeGPT's three module reconstructions and its global sparsity allocation, in float64 numpy.

Each function works on one module (a pair of consecutive matrices with an inner dimension) and
its calibration statistics, and returns the kept inner indices and/or the new matrices. Kernels
are in flax layout ``(d_in, d_out)`` with ``y = x @ W``. Statistics are uncentred correlations
``XᵀX / N`` of the rows the module sees.

- Type I, MLP (`nystrom_select`, `nystrom_down`): Nyström approximation of the activation
  correlation ``C_σ`` (inner x inner): keep the k columns of the largest ridge leverage scores
  ``s_i = [C_σ (C_σ + λI)⁻¹]_ii`` and re-fit the down projection,
  ``W_D ← (Sᵀ C_σ S)⁻¹ Sᵀ C_σ W_D`` (least squares on the calibration activations, so it is
  exact when every column is kept). λ is `ridge` times the mean of ``diag(C_σ)`` (scale-free).
- Type II, key–query (`cr_scores`): CR decomposition of ``Q Kᵀ``: dim i scores
  ``‖C_q^{1/2}[:, i]‖ · ‖C_k^{1/2}[:, i]‖``; as ``‖C^{1/2}[:, i]‖² = C_ii`` this is
  ``sqrt(C_q,ii · C_k,ii)``. Grouped-query attention: the query heads of a group share their key
  head's kept dims, so their correlations are summed (the group's queries stacked as one sample
  matrix). RoPE: dims i and i + D/2 rotate together, so a pair is scored as a whole by the
  Frobenius norms of the two columns, ``sqrt((C_q,ii + C_q,jj)(C_k,ii + C_k,jj))``, which a
  rotation within the pair leaves unchanged (pre- and post-RoPE statistics give the same score).
- Type III, value–output (`svd_value_output`): with ``S = C^{1/2} + λI`` (C the correlation of
  the attention input, λ = `ridge` times the mean eigenvalue of ``C^{1/2}``), the SVD
  ``S W_V W_O = U Σ Vᵀ`` gives ``W_V ← S⁻¹ U_k`` and ``W_O ← Σ_k V_kᵀ``, the minimiser of
  ``‖S (W_V W_O − W_V' W_O')‖_F`` over rank-k pairs (without the ridge, of
  ``‖X (W_V W_O − W_V' W_O')‖_F``); exact at k = rank. Grouped-query attention: one value head
  serves its group, so the SVD is of ``S W_V [W_O^{h1}, …, W_O^{hG}]`` (the group's output
  projections side by side), and each query head keeps its slice of ``Σ_k V_kᵀ``.
- `allocate_sparsity`: layer l's sparsity is ``L · φ̄ · softmax(−s / ε)_l`` for block influence
  ``s_l = 1 − cos(x_in, x_out)`` (important layers lose less), capped at `cap`, with the excess
  of capped layers handed to the others in proportion to their softmax weights so that the mean
  stays φ̄.
"""
from __future__ import annotations

import numpy as np


def _sym(c) -> np.ndarray:
  c = np.asarray(c, np.float64)
  return (c + c.T) / 2


def _check_keep(keep: int, size: int, what: str) -> None:
  if not 1 <= keep <= size:
    raise ValueError(f"{what}: keep must be in [1, {size}], got {keep}")


def ridge_leverage_scores(cov, ridge: float) -> np.ndarray:
  """``diag(C (C + λI)⁻¹)`` with λ = `ridge` · mean(diag C) (one score per column)."""
  c = _sym(cov)
  lam = ridge * max(float(np.mean(np.diag(c))), np.finfo(np.float64).tiny)
  return np.diag(np.linalg.solve(c + lam * np.eye(len(c)), c))  # C(C+λI)⁻¹ is symmetric


def nystrom_select(cov, keep: int, ridge: float) -> np.ndarray:
  """Sorted indices of the `keep` columns of largest ridge leverage score."""
  _check_keep(keep, len(cov), "nystrom_select")
  scores = ridge_leverage_scores(cov, ridge)
  return np.sort(np.argsort(-scores, kind="stable")[:keep])


def nystrom_down(cov, keep_idx, w_down) -> np.ndarray:
  """The re-fitted down projection ``(Sᵀ C S)⁻¹ Sᵀ C W_D`` (kept rows only; least squares, so a
  singular ``Sᵀ C S`` takes the minimum-norm solution)."""
  c = _sym(cov)
  idx = np.asarray(keep_idx)
  w = np.asarray(w_down, np.float64)
  return np.linalg.lstsq(c[np.ix_(idx, idx)], c[idx] @ w, rcond=None)[0]


def cr_scores(cov_q, cov_k) -> np.ndarray:
  """Per-dim CR score ``‖C_q^{1/2}[:, i]‖ · ‖C_k^{1/2}[:, i]‖ = sqrt(C_q,ii C_k,ii)``."""
  return np.sqrt(np.clip(np.diag(_sym(cov_q)), 0, None) * np.clip(np.diag(_sym(cov_k)), 0, None))


def cr_pair_scores(cov_q, cov_k) -> np.ndarray:
  """Per-RoPE-pair CR score for a rotate-half head of size D: pair j = dims (j, j + D/2)."""
  half = len(cov_q) // 2
  pair = lambda c: np.clip(np.diag(_sym(c)), 0, None).reshape(2, half).sum(0)
  return np.sqrt(pair(cov_q) * pair(cov_k))


def top_k(scores, keep: int) -> np.ndarray:
  """Sorted indices of the `keep` largest scores (ties: the lower index)."""
  _check_keep(keep, len(scores), "top_k")
  return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:keep])


def sqrtm_psd(cov) -> np.ndarray:
  """Symmetric square root of a PSD matrix (negative eigenvalues of rounding clipped to 0)."""
  vals, vecs = np.linalg.eigh(_sym(cov))
  return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def svd_value_output(cov, w_v, w_o, keep: int, ridge: float) -> tuple[np.ndarray, np.ndarray]:
  """Rank-`keep` value/output pair of a value head and its query heads.

  Args:
    cov: (d, d) correlation of the attention input.
    w_v: (d, D) value kernel of one value head.
    w_o: (G, D, d) output kernels of the G query heads that read this value head.
    keep: the new value head size k.
    ridge: λ relative to the mean eigenvalue of ``C^{1/2}``.
  Returns:
    (w_v (d, k), w_o (G, k, d)).
  """
  w_o = np.asarray(w_o, np.float64)
  g, dh, d = w_o.shape
  _check_keep(keep, dh, "svd_value_output")
  vals, vecs = np.linalg.eigh(_sym(cov))
  root = np.sqrt(np.clip(vals, 0, None))
  root = root + ridge * max(float(np.mean(root)), np.finfo(np.float64).tiny)
  s = (vecs * root) @ vecs.T
  s_inv = (vecs / root) @ vecs.T
  m = s @ np.asarray(w_v, np.float64) @ np.concatenate(list(w_o), axis=1)   # (d, G·d)
  u, sig, vt = np.linalg.svd(m, full_matrices=False)
  new_v = s_inv @ u[:, :keep]
  new_o = (sig[:keep, None] * vt[:keep]).reshape(keep, g, d).transpose(1, 0, 2)
  return new_v, new_o


def allocate_sparsity(influence, ratio: float, temperature: float, cap: float) -> np.ndarray:
  """Per-layer sparsities (fractions removed) with mean `ratio`, each in [0, cap].

  Args:
    influence: (L,) block influences ``1 − cos(x_in, x_out)``.
    ratio: the mean sparsity φ̄, in [0, cap].
    temperature: ε > 0 of ``softmax(−s / ε)``.
    cap: the largest sparsity of one layer, in (0, 1).
  Raises:
    ValueError: a bad `ratio`, `temperature` or `cap` (named).
  """
  s = np.asarray(influence, np.float64)
  if not 0 < cap < 1:
    raise ValueError(f"allocate_sparsity: cap must be in (0, 1), got {cap}")
  if not 0 <= ratio <= cap:
    raise ValueError(f"allocate_sparsity: ratio must be in [0, cap={cap}], got {ratio}")
  if not temperature > 0:
    raise ValueError(f"allocate_sparsity: temperature must be > 0, got {temperature}")
  logits = -s / temperature
  w = np.exp(logits - logits.max())
  w = w / w.sum()
  out = np.zeros_like(w)
  free = np.ones(len(w), bool)
  budget = len(w) * ratio
  while free.any():
    share = budget * w[free] / w[free].sum()
    over = share > cap
    if not over.any():
      out[free] = share
      break
    idx = np.flatnonzero(free)[over]
    out[idx] = cap
    budget -= cap * len(idx)
    free[idx] = False
  return out
