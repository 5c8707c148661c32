"""The pure linear algebra of MatMul-Aware Compensation (`carsam.methods.mac`), float64 throughout.

Notation, per attention and head (batch rows B kept as extra rows): `L`, `K` are the operands of
`qk_matmul` (`L` = Q in the decoder, `scale * Q` in the encoder), `S = L Kᵀ` its output; `P`, `V` those
of `pv_matmul`. Unhatted: the FP model; hatted: the quantized one. A projection's design matrix is
`A = [x̂, 1]` `(n, E+1)` (`x̂` what the Linear multiplies) and its parameters `Θ = [Wᵀ; bᵀ]` `(E+1, d)`
per head.

- Queries: per sample the residual `R = (S − L̂₀ K̂ᵀ) K̂ (K̂ᵀK̂ + εI)⁻¹` (`L̂₀` the current query operand
  before `lhs_quantizer`, `K̂` the key operand after `rhs_quantizer`, ε = `EPS_REL` × mean diagonal) is
  the smallest change of the queries whose scores best match `S`; with `K̂` of full column rank it is
  `Q* − L̂₀` with `Q* = S K̂ (K̂ᵀK̂)⁻¹` the target queries. Then `ΔΘ = (G + λI)⁻¹ C` with `G = Σ AᵀA`,
  `C = Σ AᵀR` (all heads at once) and `λ = damping · mean(diag G)`.
  *Exactness*: if some `Θ` gives `A Θ K̂ᵀ = S` and `K̂` has full column rank, then `Q* = A Θ`, so
  `R = A (Θ − Θ̂)` lies in the column space of `A` and the undamped solve returns `Θ − Θ̂` exactly.
  Where `K̂` is rank deficient (image->token: 7 token keys per box < head dim 16) the minimum-norm form
  leaves the score-invisible part of the queries as it is instead of pulling it to zero (what
  `Q* − L̂₀` would do). Only `d × d` Grams are formed (`S K̂ = L (Kᵀ K̂)`), never an `Nq × Nk` matrix.
- Keys: the same with the roles swapped (`Sᵀ = K Lᵀ`), with `L̂` after `lhs_quantizer` and the current
  key operand before `rhs_quantizer`.
- Values: per head `M = P̂ A_v`, `R = P V − P̂ V̂` (the quantized `pv_matmul` output),
  `ΔΘ_h = (Σ MᵀM + λ_h I)⁻¹ Σ MᵀR`; exact when the output error equals `P̂ A_v ΔΘ` for some `ΔΘ`.

The paper's form (`mac.solver: sylvester`): minimise `‖S − A(Θ̂ + Δ)K̂ᵀ‖² + λ‖Δ‖²` with the key error
fixed. Per sample i (one box prompt of one image: its `A_i` rows and the image's keys `K̂_i`) the normal
equations are `Σ_i G_xi Δ G_ki + λΔ = Σ_i A_iᵀ E_i K̂_i` (`G_x = AᵀA`, `G_k = K̂ᵀK̂`, `E = S − L̂₀K̂ᵀ`): a
sum of Kronecker products, not separable. The Sylvester form stacks the samples as if every sample's
queries met the *mean* key Gram: `G_x Δ Ḡ_k + λΔ = C`, `G_x = Σ G_xi`, `Ḡ_k = Σ G_ki / n`, `C = Σ AᵢᵀEᵢK̂ᵢ`;
left-multiplied by `G_x⁻¹` it is `AX + XB = C'` with `A = λG_x⁻¹`, `B = Ḡ_k`, `C' = G_x⁻¹C`, `X = Δ`. It is
exact when every sample has the same key Gram (one image), an approximation otherwise. Both sides are
symmetric, so Bartels-Stewart's Schur forms are eigendecompositions: with `G_x = UgUᵀ`, `Ḡ_k = VbVᵀ`,
`Δ = U [(UᵀCV)_ij / (g_i b_j + λ)] Vᵀ` (`solve_separable`), which needs no inverse of `G_x`. λ is
`damping · mean(diag G_x) · mean(diag Ḡ_k)`, the mean diagonal of the separable Hessian.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS_REL = 1e-12  # operand-Gram shift relative to its mean diagonal (numerical safety only)
SINGULAR_RTOL = 1e-12  # undamped solve: smallest / largest Cholesky pivot below this means singular


class MacError(ValueError):
    """MAC cannot run as asked (model not ready, singular system without damping, no data)."""


def with_ones(x: Tensor, bias: bool = True) -> Tensor:
    """`x` `(..., E)` as float64 `(..., E+1)` with a ones column appended (`(..., E)` if not `bias`)."""
    x = x.to(torch.float64)
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if bias else x


def heads_to_rows(t: Tensor) -> Tensor:
    """Per-head `(B, h, N, d)` -> float64 rows `(B*N, h*d)`, the layout of a projection's output."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b * n, h * d).to(torch.float64)


def solve_gram_right(n: Tensor, gram: Tensor) -> Tensor:
    """`n (gram + εI)⁻¹`, ε = `EPS_REL` × mean diagonal of each Gram: `n` `(..., N, d)`, `gram` `(..., d, d)`."""
    diag = gram.diagonal(dim1=-2, dim2=-1)
    eps = EPS_REL * diag.mean(-1).clamp_min(torch.finfo(gram.dtype).tiny)
    shifted = gram + eps[..., None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol, _ = torch.linalg.cholesky_ex(shifted)
    return torch.cholesky_solve(n.transpose(-1, -2), chol).transpose(-1, -2)


def query_residual(l_fp: Tensor, k_fp: Tensor, l_cur: Tensor, k_hat: Tensor) -> Tensor:
    """Smallest change `R` of the queries `l_cur` with `(l_cur + R) k_hatᵀ ≈ l_fp k_fpᵀ`, per batch and head.

    Shapes: `l_*` `(B, h, Nq, d)`, `k_*` `(B, h, Nk, d)` -> `(B, h, Nq, d)` float64. Computed as
    `(l_fp (k_fpᵀ k̂) − l_cur (k̂ᵀ k̂)) (k̂ᵀ k̂ + εI)⁻¹`, never forming the `Nq × Nk` scores.
    """
    l_fp, k_fp, l_cur, k_hat = (t.to(torch.float64) for t in (l_fp, k_fp, l_cur, k_hat))
    gram = k_hat.transpose(-1, -2) @ k_hat
    return solve_gram_right(l_fp @ (k_fp.transpose(-1, -2) @ k_hat) - l_cur @ gram, gram)


def key_residual(l_fp: Tensor, k_fp: Tensor, l_hat: Tensor, k_cur: Tensor) -> Tensor:
    """Smallest change of the keys `k_cur` `(B, h, Nk, d)` with `l_hat (k_cur + R)ᵀ ≈ l_fp k_fpᵀ` (`Sᵀ = K Lᵀ`)."""
    return query_residual(k_fp, l_fp, k_cur, l_hat)


def score_error_terms(l_fp: Tensor, k_fp: Tensor, l_hat: Tensor, k_hat: Tensor) -> tuple[float, float]:
    """`(‖L̂K̂ᵀ − LKᵀ‖², ‖LKᵀ‖²)` summed over batch and heads, from `d × d` Grams (`⟨ABᵀ, CDᵀ⟩ = Σ AᵀC ∘ BᵀD`).

    Shapes: `l_*` `(B, h, Nq, d)`, `k_*` `(B, h, Nk, d)`. The error is expanded in the operand errors
    (`L̂K̂ᵀ − LKᵀ = ΔL K̂ᵀ + L ΔKᵀ`), so small errors do not cancel against `‖S‖²`.
    """
    l_fp, k_fp, l_hat, k_hat = (t.to(torch.float64) for t in (l_fp, k_fp, l_hat, k_hat))
    gram = lambda a, b: a.transpose(-1, -2) @ b  # noqa: E731
    dl, dk = l_hat - l_fp, k_hat - k_fp
    err = (gram(dl, dl) * gram(k_hat, k_hat)).sum() + 2.0 * (gram(dl, l_fp) * gram(k_hat, dk)).sum() \
        + (gram(l_fp, l_fp) * gram(dk, dk)).sum()
    return max(float(err), 0.0), float((gram(l_fp, l_fp) * gram(k_fp, k_fp)).sum())


def separable_terms(a: Tensor, l_fp: Tensor, k_fp: Tensor, l_cur: Tensor, k_hat: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, int]:
    """One call's contribution to the separable (Sylvester) system of the queries (module docstring).

    Shapes: `a` the design matrix `(B, Nq, F)`, `l_*` `(B, h, Nq, d)`, `k_*` `(B, h, Nk, d)`. Returns
    `(G_x, C, ΣG_k, n)`: `G_x = Σ AᵀA` `(F, F)`, `C = Σ Aᵀ E K̂` `(h, F, d)` with `E K̂ = L (KᵀK̂) − L̂₀ (K̂ᵀK̂)`
    (never an `Nq × Nk` matrix), `ΣG_k = Σ K̂ᵀK̂` `(h, d, d)` over the batch, and `n = B` samples. For the
    keys call it with the roles swapped (`Sᵀ = K Lᵀ`): `(a_k, k_fp, l_fp, k_cur, l_hat)`.
    """
    a, l_fp, k_fp, l_cur, k_hat = (t.to(torch.float64) for t in (a, l_fp, k_fp, l_cur, k_hat))
    gram_k = k_hat.transpose(-1, -2) @ k_hat  # (B, h, d, d)
    ek = l_fp @ (k_fp.transpose(-1, -2) @ k_hat) - l_cur @ gram_k  # (B, h, Nq, d)
    rhs = torch.einsum("bnf,bhnd->hfd", a, ek)
    return torch.einsum("bnf,bng->fg", a, a), rhs, gram_k.sum(0), a.shape[0]


def solve_separable(gram_x: Tensor, rhs: Tensor, gram_k: Tensor, damping: float, where: str
                    ) -> tuple[Tensor, float]:
    """`Δ` of `G_x Δ Ḡ_k + λΔ = C` per head, by the symmetric Bartels-Stewart solve (module docstring).

    Shapes: `gram_x` `(F, F)`, `rhs` `(h, F, d)`, `gram_k` `(h, d, d)` (the mean key Gram `Ḡ_k`) ->
    `(F, h*d)` (heads side by side, the layout of a projection's output) and λ. Raises MacError, naming
    `where`, without data, or when the system is singular (only possible with `damping == 0`).
    """
    gram_x, rhs, gram_k = (t.to(torch.float64) for t in (gram_x, rhs, gram_k))
    mean_x, mean_k = float(gram_x.diagonal().mean()), float(gram_k.diagonal(dim1=-2, dim2=-1).mean())
    if not (mean_x > 0.0 and mean_k > 0.0):
        raise MacError(f"MAC: the Sylvester system of {where} is empty (no calibration data reached it)")
    lam = damping * mean_x * mean_k
    g, u = torch.linalg.eigh(gram_x)
    b, v = torch.linalg.eigh(gram_k)  # (h, d), (h, d, d)
    denom = g.clamp_min(0.0)[None, :, None] * b.clamp_min(0.0)[:, None, :] + lam  # (h, F, d)
    if float(denom.min()) <= SINGULAR_RTOL * float(denom.max()):
        raise MacError(f"MAC: the Sylvester system of {where} is singular (rank-deficient calibration inputs or "
                       "keys) and mac.damping is too small; set mac.damping > 0 (e.g. 0.01)")
    y = (u.T @ rhs @ v) / denom
    delta = u @ y @ v.transpose(-1, -2)  # (h, F, d)
    return delta.permute(1, 0, 2).reshape(gram_x.shape[0], -1), lam


def pv_normal_terms(probs_hat: Tensor, a_v: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """Per head `(Σ MᵀM, Σ MᵀR)` with `M = P̂ A_v`: `(h, F, F)` and `(h, F, d)` float64.

    Shapes: `probs_hat` `(B, h, Nq, Nk)`, `a_v` `(B, Nk, F)`, `residual` `(B, h, Nq, d)`. One head at a
    time, so the largest temporary is `(B, Nq, F)`.
    """
    grams, rhs = [], []
    for head in range(probs_hat.shape[1]):
        m = (probs_hat[:, head].to(torch.float64) @ a_v).reshape(-1, a_v.shape[-1])
        r = residual[:, head].to(torch.float64).reshape(m.shape[0], -1)
        grams.append(m.T @ m)
        rhs.append(m.T @ r)
    return torch.stack(grams), torch.stack(rhs)


def solve_ridge(gram: Tensor, rhs: Tensor, damping: float, where: str) -> tuple[Tensor, float]:
    """`(gram + λI)⁻¹ rhs` by Cholesky in float64, `λ = damping · mean(diag(gram))`; returns `(Δ, λ)`.

    Shapes: `gram` `(F, F)`, `rhs` `(F, d)` -> `(F, d)`. Raises MacError, naming `where`, when no data
    reached the system or when it is singular (only possible with `damping == 0`).
    """
    gram, rhs = gram.to(torch.float64), rhs.to(torch.float64)
    mean_diag = float(gram.diagonal().mean())
    if not mean_diag > 0.0:
        raise MacError(f"MAC: the normal matrix of {where} is empty (no calibration data reached it)")
    lam = damping * mean_diag
    chol, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    pivots = chol.diagonal().square()
    if damping == 0.0 and (int(info) > 0 or float(pivots.min()) <= SINGULAR_RTOL * float(pivots.max())):
        raise MacError(f"MAC: the normal matrix of {where} is singular (rank-deficient calibration inputs) and "
                       "mac.damping is 0; set mac.damping > 0 (e.g. 0.01)")
    if int(info) > 0:
        raise MacError(f"MAC: the normal matrix of {where} is not positive definite even with mac.damping="
                       f"{damping}; the calibration activations may be non-finite")
    return torch.cholesky_solve(rhs, chol), lam


__all__ = ["EPS_REL", "SINGULAR_RTOL", "MacError", "heads_to_rows", "key_residual", "pv_normal_terms",
           "query_residual", "score_error_terms", "separable_terms", "solve_gram_right", "solve_ridge",
           "solve_separable", "with_ones"]
