"""Candidates for exact spectral shaping U S^p V^T, kept for bench/bench_spectral.py next to the one the trainer
uses (train_gpt.exact_spectral: (X X^T)^((p-1)/2) X by a quadrature of resolvents, float64 Cholesky):
eigh_spectral (float64 Gram + eigh, the baseline) and polar_spectral (an fp32 polynomial polar iteration, then
P^p for P = X Q^T by the same quadrature: half the poles, plus 28 fp32 matmuls)."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import EXACT_STEP, exact_spectral, resolvent_sum, stieltjes_poles  # noqa: E402,F401

def eigh_spectral(X, p, floor=1e-7, out_dtype=torch.bfloat16):
    """Baseline: eigh of the float64 Gram X X^T = U S^2 U^T, D = U diag(s^(p-1)) U^T X; s < floor s_max -> 0."""
    X64 = X.double()
    lam, U = torch.linalg.eigh(X64 @ X64.mT)
    s = lam.clamp_min(0).sqrt()
    keep = s > floor * s.amax(-1, keepdim=True)
    g = torch.where(keep, s.clamp_min(1e-300).pow(p - 1), torch.zeros_like(s))
    return ((U * g.unsqueeze(-2)) @ (U.mT @ X64)).to(out_dtype)


# Odd quintics x (c1 + c3 x^2 + c5 x^4) for polar_spectral: step k is the minimax approximation of 1 on
# [l_k, 1] (Remez, 4 alternation points), divided by its max 1 + E_k so that it maps [l_k, 1] into [l_k+1, 1],
# and evaluated at x / 1.01 (room for rounding above 1), from l_0 = 1e-4: l = 4.2e-4, 1.8e-3, 7.5e-3, 3.1e-2,
# 0.13, 0.46, 0.93, then two Newton-Schulz quintics (15/8, -5/4, 3/8): 1 - 8e-4, then 1 - 4e-11.
POLAR_COEFFS = (
    (4.214608, -12.265861, 8.925486), (4.213343, -12.255424, 8.916470), (4.208012, -12.211492, 8.878526),
    (4.185537, -12.027433, 8.719691), (4.090956, -11.273273, 8.071283), (3.709797, -8.554824, 5.772684),
    (2.682870, -3.463191, 1.768233), (1.875, -1.25, 0.375), (1.875, -1.25, 0.375),
)


def polar_spectral(X, p, floor=1e-4, h=EXACT_STEP, out_dtype=torch.bfloat16):
    """Candidate: Q = U V^T by 9 fp32 quintic steps (POLAR_COEFFS, converged for s >= ~1e-4 s_max), then
    P = X Q^T (float64, symmetrised, eigenvalues s) and D = P^p Q with P^p = sum_k w_k (P + tau_k I)^-1
    (a = -p, poles over [floor/100, 10]: 11 poles instead of 16). X is scaled by ||(X X^T)^2||_F^(1/4) >= s_max
    (<= m^(1/8) s_max). Accurate (~2e-4 plus fp32 polar error ~ u32 s_max/s) for s >= 1e-4 of that scale."""
    assert -1.0 <= p < 0.0, p
    Y = X.float()
    A = Y @ Y.mT
    A2 = A @ A
    s2 = A2.norm(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-30)  # >= s_max^2, <= m^(1/2) s_max^2
    Y = Y / s2.sqrt()
    A, A2 = A / s2, A2 / (s2 * s2)
    for i, (c1, c3, c5) in enumerate(POLAR_COEFFS):
        if i:
            A = Y @ Y.mT
            A2 = A @ A
        Y = c1 * Y + (c3 * A + c5 * A2) @ Y
    X64, Q = X.double(), Y.double()
    P = X64 @ Q.mT
    P = 0.5 * (P + P.mT)
    s = s2.double().sqrt()
    taus, ws = stieltjes_poles(-p, floor / 100, 10.0, h)
    F = resolvent_sum(P / s, taus, ws)
    return (s.pow(p) * (F @ Q)).to(out_dtype)
