"""The fused Triton Newton-Schulz / Fast-Spectral kernels of train_gpt.py against its torch path.
Without CUDA they run under the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
pytest.importorskip("triton", reason="triton is not importable: no fused Newton-Schulz to test")

import train_gpt as nst  # noqa: E402
from train_gpt import NS_COEFFS, fast_spectral, newton_schulz  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
# 97 rows: 4 tiles a side under the interpreter's 32-blocks, so some mirrored tiles are not next to the diagonal
SHAPES = [(1, 5, 7), (3, 17, 40), (2, 33, 33), (1, 64, 200), (1, 97, 130)]
# fp32 dots (fp64 inputs are dotted in fp32) under the interpreter, tf32 on a GPU. Interpreter: fp32 products and
# sums of <= 200 terms, norm-wise ~sqrt(200) x 2^-24 = 1e-6 (1.5e-7 here): 1e-5. bf16: the output's rounding (norm-wise
# ~0.44 x 2^-8 RMS) plus bf16 inputs through ns_poly's |b| + 2|c| A (<= 3.5x): ~1.6 x 2^-8 = 6e-3 (4.6e-3 here): 1e-2
TOL = {torch.float64: 1e-5 if INTERP else 5e-3, torch.float32: 1e-5 if INTERP else 5e-3,
       torch.bfloat16: 1e-2}
# fused vs torch path of whole iterations, on any device: every fp32 dot may sum in another order than torch's,
# which on a GPU is everywhere (tf32, other tiles); an order that crosses a bf16 midpoint changes one element by
# one bf16 step, and NS's later iterations carry that on to ~1e-2 of the output. That the fused ops round like
# eager torch is checked where nothing amplifies it: one op (test_poly, test_update), one iteration
# (test_each_newton_schulz_iteration_rounds_like_torch)
NS_TOL, FS_TOL = 2e-2, 3e-2


def rel(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite output (unwritten tile?)"
    return ((x - ref).norm() / ref.norm()).item()


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gram(shape, dtype):
    X = randn(*shape, dtype=dtype)
    out = nan_like((shape[0], shape[1], shape[1]), dtype)
    nst.gram_xxt(X, out=out, alpha=0.5)
    assert rel(out, 0.5 * X.double() @ X.double().mT) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_poly(shape, dtype):
    X = randn(*shape, dtype=torch.float64)
    A = X @ X.mT / X.norm(dim=(-2, -1), keepdim=True) ** 2  # symmetric, spectrum in [0, 1]
    b, c, d = NS_COEFFS[0][1], NS_COEFFS[0][2], 0.3
    ref = b * A + c * A @ A + d * torch.eye(shape[1], dtype=A.dtype, device=DEV)
    for rounding in (True, False):
        out = nan_like(A.shape, dtype)
        nst.ns_poly(A.to(dtype), b, c, diag=d, out=out, torch_rounding=rounding)
        assert rel(out, ref) < TOL[dtype]
    if dtype == torch.bfloat16:  # torch_rounding: the eager torch bf16 expression
        Ab = A.bfloat16()
        # equal bits but where an fp32 sum in another order crosses a bf16 midpoint: one step (2^-7) of that element,
        # norm-wise << 2e-3; one rounding instead of torch's four (no epilogue rounding) is 3e-3 off
        assert rel(nst.ns_poly(Ab, b, c), b * Ab + c * (Ab @ Ab)) < 2e-3
    out = nst.ns_poly(A.to(dtype), b, c, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and rel(out, b * A + c * A @ A) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_update(shape, dtype):
    X = randn(*shape, dtype=torch.float64)
    B = randn(shape[0], shape[1], shape[1], dtype=torch.float64, seed=1)
    a, s = NS_COEFFS[0][0], torch.rand(shape[0], generator=torch.Generator().manual_seed(2)).to(DEV)
    for rounding in (True, False):
        out = nan_like(shape, dtype)
        nst.ns_update(B.to(dtype), X.to(dtype), a, out=out, torch_rounding=rounding)
        assert rel(out, a * X + B @ X) < TOL[dtype]
    out = nst.ns_update(B.to(dtype), X.to(dtype), 0.0, scale=s)
    assert rel(out, s.double()[:, None, None] * (B @ X)) < TOL[dtype]
    out = nst.ns_update(B.to(dtype), X.to(dtype), a, scale=s, torch_rounding=False)
    assert rel(out, s.double()[:, None, None] * (a * X + B @ X)) < TOL[dtype]


def ns_fp64(G):
    X = G.double() / G.double().norm(dim=(-2, -1), keepdim=True)
    for a, b, c in NS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X


@pytest.mark.parametrize("shape", SHAPES + [(5, 7), (2, 1, 6, 9)])
def test_newton_schulz(shape):
    G = randn(*shape, dtype=torch.bfloat16)
    X, gram = nst.newton_schulz_fused(G)
    Xr, gramr = newton_schulz(G)
    assert X.dtype == gram.dtype == torch.bfloat16 and X.shape == G.shape
    assert gram.shape == (*shape[:-1], shape[-2])
    assert rel(gram, gramr) < 1e-2  # the same X, one bf16 rounding each: equal but for a midpoint crossed (2^-7)
    assert rel(X, Xr) < NS_TOL
    sv = torch.linalg.svdvals(X.double())
    # NS's band for these inputs (0.72-1.04, the square one lowest), set by NS's polynomial; bf16 moves it a few 2^-8
    assert sv.min() > 0.6 and sv.max() < 1.25, (sv.min().item(), sv.max().item())


@pytest.mark.parametrize("shape", [(3, 17, 40), (1, 97, 130)])
@pytest.mark.parametrize("step", range(len(NS_COEFFS)))
def test_each_newton_schulz_iteration_rounds_like_torch(monkeypatch, shape, step):
    """Iteration `step` of the fused NS against eager torch's from the same bf16 input (eager torch's X after the
    earlier iterations). Both round each op to bf16, so they differ only where an fp32 sum in another order
    crosses a bf16 midpoint: one bf16 step (2^-8 of |X|) in a fraction f of the elements, norm-wise 2^-8 sqrt(f);
    fp32 order effects (~2^-24 sqrt(n)) make f ~1e-4. 1e-3 allows f up to 6%; a missing rounding epilogue moves
    every element, ~3e-3 (test_poly)."""
    G = randn(*shape, dtype=torch.bfloat16, seed=5)
    monkeypatch.setattr(nst, "NS_COEFFS", NS_COEFFS[:step])
    X = newton_schulz(G)[0] if step else G  # both paths normalise it again, with the same eager ops
    monkeypatch.setattr(nst, "NS_COEFFS", NS_COEFFS[step:step + 1])
    fused, plain = nst.newton_schulz_fused(X)[0], newton_schulz(X)[0]
    assert rel(fused, plain) < (1e-3 if INTERP else NS_TOL)


def test_newton_schulz_strided():
    G = randn(2, 40, 17, dtype=torch.bfloat16).mT  # transposed view [2, 17, 40]
    assert rel(nst.newton_schulz_fused(G)[0], newton_schulz(G)[0]) < NS_TOL


FS_CASES = [(s, p) for s in [(1, 5, 7), (3, 17, 40)] for p in (-0.1, -0.25, -0.5)]


@pytest.mark.parametrize("shape,p", FS_CASES + [((2, 33, 33), -0.5), ((1, 64, 200), -0.1)])
def test_fast_spectral(shape, p):
    U = 3 * randn(*shape, dtype=torch.bfloat16, seed=3)
    out = nst.fast_spectral_fused(U, p)
    assert out.dtype == torch.bfloat16 and out.shape == U.shape
    assert rel(out, fast_spectral(U, p)) < FS_TOL


def test_dynmuon_step_fused_equals_plain():
    """The optimizer with fused kernels takes the same step as with the torch path (NS_TOL: its NS's bound)."""
    grads = [randn(3, 24, 40, seed=7), randn(40, 24, seed=8)]
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        nst.DynMuon(params, lr=0.1, mu=0.95, weight_decay=0.0, p_schedule=lambda t: -0.25, fused=fused).step()
        results.append([p.detach().clone() for p in params])
    for plain, fused in zip(*results):
        assert rel(fused, plain) < NS_TOL


def test_fast_spectral_correction_costs_no_more_than_one_bf16_rounding():
    """The fused C Y (bf16 P = (d - 2g) A + g A^2 in the MMA, c0 Y and |U|^p in the epilogue) against C Y in
    float64 from the same NS output and Gram matrix: its error is the final bf16 rounding's, no more."""
    U = 3 * randn(2, 64, 256, dtype=torch.bfloat16, seed=4)
    p = -0.25
    d, g = p / 2, 0.5 * (p / 2) * (p / 2 - 1)
    Y, gram = nst.newton_schulz_fused(U)
    A = gram.double()
    eye = torch.eye(A.size(-1), dtype=A.dtype, device=DEV)
    C = eye + d * (A - eye) + g * (A - eye) @ (A - eye)
    exact = U.double().norm(dim=(-2, -1), keepdim=True) ** p * (C @ Y.double())
    # where the fused value's own error (fp32, bf16 P on the small P Y) moves it across a rounding midpoint, its
    # rounding error is still ~half a step: 2% more in norm would take a systematic error (1.00001x here)
    assert rel(nst.fast_spectral_fused(U, p), exact) < 1.02 * rel(exact.bfloat16(), exact)
