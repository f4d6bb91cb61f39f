"""train_gpt.exact_spectral (--spectral exact) vs a float64 SVD on small random and low-rank matrices.

Bounds, from the method rather than from a run:
- float64 output: D - D_ref = U diag(e_i s_i^p) V^T with |e_i| the relative error of the rational
  approximation of s^p at s_i, so |D - D_ref|_F / |D_ref|_F <= max |e_i| <= 2.1e-4 (the quadrature bound for
  s_i >= 1e-6 s_max, checked on a dense grid in test_quadrature_bound), plus float64 rounding
  ~ sqrt(n) u / (s_min/s_max)^2 < 1e-7 here (s_min/s_max > 1e-4): QUAD_TOL = 2.1e-4 + 1e-5.
- bf16 output: plus the bf16 rounding of each entry, relative <= 2^-8 (8-bit significand), so
  <= 2^-8 (1 + QUAD_TOL) + QUAD_TOL in Frobenius norm."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_gpt import EXACT_FLOOR as FLOOR, exact_spectral, stieltjes_poles  # noqa: E402

QUAD_TOL = 2.1e-4 + 1e-5
BF16_TOL = 2.0 ** -8 * (1 + QUAD_TOL) + QUAD_TOL
PS = (-1.0, -0.5, -0.25, -0.1)


def reference(X, p, floor=1e-7):
    u, s, vh = torch.linalg.svd(X.double(), full_matrices=False)
    keep = s > floor * s.amax(-1, keepdim=True)
    sp = torch.where(keep, s.clamp_min(1e-300).pow(p), torch.zeros_like(s))
    return (u * sp.unsqueeze(-2)) @ vh


def rel_err(Y, R):
    Y, R = Y.double().flatten(1), R.flatten(1)
    return ((Y - R).norm(dim=1) / R.norm(dim=1)).max().item()


def inputs(kind, b=3, m=24, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        X = torch.randn(b, m, n, generator=g)
    else:  # rank 4 plus noise 1e-2: a decaying, well-separated spectrum
        X = torch.randn(b, m, 4, generator=g) @ torch.randn(b, 4, n, generator=g) + 1e-2 * torch.randn(b, m, n, generator=g)
    return X.bfloat16()


@pytest.mark.parametrize("p", PS)
def test_quadrature_bound(p):
    """sum_k w_k / (l + tau_k) = l^-a within 2.1e-4 relative for l in [1e-12, 4] (s in [1e-6, 2] s_max)."""
    a = (1 - p) / 2
    taus, ws = stieltjes_poles(a, FLOOR ** 2, 10.0)
    lam = torch.logspace(-12, math.log10(4.0), 20001, dtype=torch.float64)
    f = sum(w / (lam + t) for t, w in zip(taus, ws))
    assert (f * lam.pow(a) - 1).abs().max().item() <= 2.1e-4


@pytest.mark.parametrize("kind", ["random", "lowrank"])
@pytest.mark.parametrize("p", PS)
def test_exact_spectral_matches_svd(kind, p):
    X = inputs(kind)
    R = reference(X, p)
    s = torch.linalg.svdvals(X.double())
    assert (s[:, -1] / s[:, 0]).min() > 1e-4  # the regime of the float64 bound above
    assert rel_err(exact_spectral(X, p, out_dtype=torch.float64), R) <= QUAD_TOL
    Y = exact_spectral(X, p)
    assert Y.dtype == torch.bfloat16 and Y.shape == X.shape
    assert rel_err(Y, R) <= BF16_TOL


def test_zero_singular_values_stay_zero():
    """Zero rows (zero singular values) give zero rows, as svd_spectral's floor does."""
    X = inputs("random").float()
    X[:, -4:] = 0
    X = X.bfloat16()
    Y = exact_spectral(X, -0.5, out_dtype=torch.float64)
    assert Y[:, -4:].abs().max().item() == 0.0
    assert rel_err(Y, reference(X, -0.5)) <= QUAD_TOL
