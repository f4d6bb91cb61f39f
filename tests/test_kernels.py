"""Newton-Schulz, Fast-Spectral, the --spectral ablations and exact shaping against float64 references."""
import math

import pytest
import torch

import train_gpt as tg


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def polar(G):
    u, _, vh = torch.linalg.svd(G.double(), full_matrices=False)
    return u @ vh


def newton_schulz_f64(G):
    """The NS iteration of SPEC §1 in float64 (no bf16 rounding)."""
    X = G.double() / (G.double().norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in tg.NS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X


def fast_spectral_f64(X, p):
    """SPEC's Fast-Spectral formula, literally, in float64."""
    X = X.double()
    norm = X.norm(dim=(-2, -1), keepdim=True)
    Xn = X / norm
    Y = newton_schulz_f64(X)
    I = torch.eye(X.size(-2), dtype=torch.float64)
    E = Xn @ Xn.mT - I
    d = p / 2
    C = I + d * E + 0.5 * d * (d - 1) * E @ E
    return norm ** p * (C @ Y)


SHAPES = [(1, 5, 7), (3, 16, 48), (2, 33, 33), (4, 7, 130)]


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_close_to_polar_factor(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    X, gram = tg.newton_schulz(G)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    sv = torch.linalg.svdvals(X.double())
    # NS's band: float64 NS puts these inputs' singular values in [0.977, 1.141]; bf16 moves them by a few 2^-8
    assert sv.min() > 0.7 and sv.max() < 1.2
    # float64 NS is <= 0.029 from the polar factor (its band); bf16 roundings add <= 0.02 (checked below at 2e-2)
    assert rel_err(X, polar(G)) < 0.06
    Xn = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    # the Gram matrix Fast-Spectral reuses: bf16 rounds G's norm (a scale error <= 2^-8 on X, 2 x 2^-8 on the Gram;
    # 0.37-0.67 x 2^-8 for these inputs, on any machine), X and the product (~2^-8 / sqrt(3) RMS each): < 1e-2
    assert rel_err(gram, Xn @ Xn.mT) < 1e-2


def test_newton_schulz_matches_float64_iteration():
    G = torch.randn(6, 24, 40, generator=torch.Generator().manual_seed(2))
    # ~5 x 2^-8: the norm of thousands of independent bf16 roundings concentrates, so another CPU's rounding order
    # moves it little (0.0181-0.0185 over 30 inputs moved by 2^-20: sd 1e-4); 2e-2 still fails NS with the last
    # iteration's coefficients throughout (0.024) or an iteration more or less (>= 0.031)
    assert rel_err(tg.newton_schulz(G)[0], newton_schulz_f64(G)) < 2e-2


@pytest.mark.parametrize("p", [-0.1, -0.25, -0.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_spectral_matches_spec_formula(shape, p):
    U = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 3.0).bfloat16()
    out = tg.fast_spectral(U, p)
    assert out.dtype == torch.bfloat16
    # dominated by the bf16 NS iterations: 0.018-0.036 for these shapes, sd <= 0.0012 over rounding realizations
    assert rel_err(out, fast_spectral_f64(U, p)) < 5e-2


@pytest.mark.parametrize("p", [-0.1, -0.25, -0.5])
def test_fast_spectral_correction_given_the_ns_output(p):
    """With the same NS output Y, the Taylor correction itself is exact to bf16 rounding."""
    U = (torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(6)) * 0.1).bfloat16()
    Y = tg.newton_schulz(U)[0].double()
    norm = U.double().norm(dim=(-2, -1), keepdim=True)
    Xn = U.double() / norm
    I = torch.eye(16, dtype=torch.float64)
    E, d = Xn @ Xn.mT - I, p / 2
    expected = norm ** p * ((I + d * E + 0.5 * d * (d - 1) * E @ E) @ Y)
    # the output's bf16 rounding (2^-8) plus the bf16 Gram's error (<= 3 x 2^-8) through |d| <= 0.25: 6.8e-3
    assert rel_err(tg.fast_spectral(U, p), expected) < 1e-2


def test_fast_spectral_boosts_small_directions_mildly():
    """The correction weights direction i by about (1 + d e_i + ...) with e_i = s_i^2/sum s_j^2 - 1:
    smaller input directions come out larger, by a few percent (SPEC §1: milder than exact s^p). In float64 the
    ratio is 1.048 (Taylor 1.061 x NS's own 0.988); each gain carries the bf16 NS's error of a few 2^-8 (1.038-1.073
    over seeds): 1.02 fails no correction (1.000 here), 1.2 fails exact s^p (5^0.25 = 1.50)."""
    g = torch.Generator().manual_seed(7)
    u, _, vh = torch.linalg.svd(torch.randn(1, 8, 16, dtype=torch.float64, generator=g), full_matrices=False)
    s = torch.linspace(1.0, 0.2, 8, dtype=torch.float64)
    U = ((u * s) @ vh).bfloat16()
    gains = (u.mT @ tg.fast_spectral(U, -0.25).double() @ vh.mT).diagonal(dim1=-2, dim2=-1)[0]
    assert gains[-1] > gains[0] * 1.02
    assert gains[-1] < gains[0] * 1.2


@pytest.mark.parametrize("p", [-0.25, -0.5])
def test_svd_spectral_equals_u_sigma_p_vt(p):
    G = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(G, full_matrices=False)
    expected = (u * s.pow(p).unsqueeze(-2)) @ vh
    assert rel_err(tg.svd_spectral(G, p), expected) < 1e-2  # the bf16 output: <= 2^-8; fp32 SVD adds ~1e-6


@pytest.mark.parametrize("p,expected", [(1.0, "raw"), (0.25, "raw"), (0.2, "ns"), (0.0, "ns"), (-0.01, "fast")])
def test_spectral_transform_anchoring(p, expected):
    U = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(5)).bfloat16()
    out = tg.spectral_transform(U, p)
    reference = {"raw": U, "ns": tg.newton_schulz(U)[0], "fast": tg.fast_spectral(U, p)}[expected]
    assert torch.equal(out, reference)
    assert torch.equal(tg.spectral_transform(U, -0.3, tg.svd_spectral), tg.svd_spectral(U, -0.3))


# ----------------------------------------------------------------------------- the --spectral ablations

def test_scalar_factor_is_c0():
    d = -0.25 / 2
    assert tg.scalar_factor(-0.25) == pytest.approx(1 - d + 0.5 * d * (d - 1)) == pytest.approx(1.1953125)


@pytest.mark.parametrize("p", [-0.1, -0.25, -0.5])
def test_scalar_spectral_is_fast_spectral_with_a_zero_gram(p):
    """--spectral scalar = Fast-Spectral with A := 0 (E = -I, C = c0 I): the same NS output, scaled."""
    U = (3 * torch.randn(3, 16, 40, generator=torch.Generator().manual_seed(6))).bfloat16()
    zero_gram = lambda G: (tg.newton_schulz(G)[0], torch.zeros(G.shape[:-1] + G.shape[-2:-1], dtype=G.dtype))
    out = tg.scalar_spectral(U, p)
    # both end in one bf16 rounding of the same fp32 value up to fp32 rounding (c0 I @ Y vs c0 Y): 1 bf16 ulp
    assert rel_err(out, tg.fast_spectral(U, p, ns=zero_gram)) < 2 ** -8
    norm = U.double().norm(dim=(-2, -1), keepdim=True)
    expected = tg.scalar_factor(p) * norm ** p * tg.newton_schulz(U)[0].double()
    assert rel_err(out, expected) < 2 ** -8  # one bf16 rounding of the exact product


def test_polar_spectral_is_newton_schulz():
    U = torch.randn(2, 12, 20, generator=torch.Generator().manual_seed(7)).bfloat16()
    assert torch.equal(tg.polar_spectral(U, -0.25), tg.newton_schulz(U)[0])
    assert torch.equal(tg.spectral_transform(U, -0.25, tg.polar_spectral), tg.newton_schulz(U)[0])


@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_exact_spectral_equals_svd_spectral(kind):
    """The quadrature (float64) and the fp32 SVD give the same U S^p V^T up to the final bf16 rounding (2^-8
    each) on full-rank and on low-rank + noise matrices (smallest s ~ 1e-3 s_max, inside both methods' range)."""
    g = torch.Generator().manual_seed(8)
    U = torch.randn(3, 24, 40, generator=g, dtype=torch.float64)
    if kind == "low_rank":
        U = torch.randn(3, 24, 4, generator=g, dtype=torch.float64) @ torch.randn(3, 4, 40, generator=g,
                                                                                  dtype=torch.float64) + 1e-3 * U
    U = U.bfloat16()
    assert rel_err(tg.exact_spectral(U, -0.25), tg.svd_spectral(U, -0.25)) < 2 * 2 ** -8 + 1e-3


def test_every_stage_runs_through_the_optimizer():
    for name, stage in tg.NEGATIVE_STAGES.items():
        w = torch.nn.Parameter(torch.zeros(3, 8, 12))
        w.grad = torch.randn(3, 8, 12, generator=torch.Generator().manual_seed(9))
        opt = tg.DynMuon([w], lr=0.1, mu=0.0, weight_decay=0.0, p_schedule=lambda t: -0.25, spectral=name)
        opt.step()
        expected = -0.1 * math.sqrt(8 / 12) * stage(w.grad.bfloat16(), -0.25, tg.newton_schulz).double()
        assert rel_err(w.detach(), expected) < 2 ** -7, name  # the update's own bf16 rounding, then fp32


@pytest.mark.parametrize("p,spectral", [(0.6, "taylor"), (0.1, "taylor"), (-0.25, "taylor"), (-0.25, "scalar"),
                                        (-0.25, "polar"), (-0.25, "exact")])
def test_direction_factor(p, spectral):
    """What multiplies NS(U)'s directions: U's RMS singular value (raw), 1 (NS, polar), c0 |U|_F^p (taylor's and
    scalar's scalar part), the RMS singular value of the output (exact)."""
    U = (2 * torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(10))).bfloat16()
    out = tg.spectral_transform(U, p, tg.NEGATIVE_STAGES[spectral])
    f = tg.direction_factor(U, out, p, spectral).double()
    norm = U.double().norm(dim=(-2, -1))
    expected = {"raw": norm / math.sqrt(8), "one": torch.ones(2, dtype=torch.float64),
                "c0": tg.scalar_factor(p) * norm ** p,
                "rms_out": out.double().norm(dim=(-2, -1)) / math.sqrt(8)}
    key = "raw" if p >= tg.ANCHOR_RAW else "one" if p >= 0 or spectral == "polar" else (
        "rms_out" if spectral == "exact" else "c0")
    torch.testing.assert_close(f, expected[key], rtol=1e-5, atol=0)  # fp32 norms of the same values
