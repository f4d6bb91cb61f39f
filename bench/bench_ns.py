"""Benchmark: the plain torch path of newton_schulz / fast_spectral (train_gpt.py) vs its fused
Triton kernels (newton_schulz_fused / fast_spectral_fused), batched at the DynMuon model shapes.

    python bench/bench_ns.py              # CUDA: 127M, 601M, 1.1B shapes
    python bench/bench_ns.py --small      # tiny shapes; runs on CPU under TRITON_INTERPRET=1
Prints ms (median of triton.testing.do_bench) for torch and Triton, the speedup, and the max
over the batch of the relative Frobenius error of the Triton output vs the reference."""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402
from train_gpt import (NS_COEFFS, fast_spectral, fast_spectral_fused, gram_xxt, newton_schulz,  # noqa: E402
                       newton_schulz_fused, ns_poly, ns_update)

SHAPES = {
    "127M": [(96, 512, 512), (48, 512, 2048)],
    "601M": [(96, 1280, 1280), (48, 1280, 5120)],
    "1.1B": [(96, 1792, 1792), (48, 1792, 7168)],
}
SMALL = {"tiny": [(2, 33, 33), (1, 40, 100)]}


def bench(fn, cuda):
    """Median ms of fn()."""
    if cuda:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def max_rel(x, ref):
    """Max over the batch of |x - ref|_F / |ref|_F (per matrix)."""
    x, ref = x.float().flatten(1), ref.float().flatten(1)
    return ((x - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU / interpreter smoke test)")
    ap.add_argument("--p", type=float, default=-0.25, help="exponent for Fast-Spectral")
    ap.add_argument("--blocks", default=None,
                    help="Triton tiling BLOCK_MN,BLOCK_K,warps,stages (default: train_gpt.TRITON_BLOCKS)")
    ap.add_argument("--parts", action="store_true", help="also time gram / poly / update alone")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if args.blocks:
        train_gpt.TRITON_BLOCKS = tuple(int(v) for v in args.blocks.split(","))
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (TRITON_INTERPRET=1)'}, "
          f"torch {torch.__version__}, triton {triton.__version__}, p = {args.p}, blocks {train_gpt.TRITON_BLOCKS}")
    head = (f"{'model':6} {'shape':>18} | {'NS torch':>9} {'NS triton':>9} {'speedup':>7} {'err':>8} | "
            f"{'FS torch':>9} {'FS triton':>9} {'speedup':>7} {'err':>8}")
    print(head)
    print("-" * len(head))
    parts = []
    for model, shapes in (SMALL if args.small else SHAPES).items():
        for shape in shapes:
            torch.manual_seed(0)
            G = torch.randn(shape, device=dev).bfloat16()
            ns_ref, ns_tri = newton_schulz(G)[0], newton_schulz_fused(G)[0]
            fs_ref, fs_tri = fast_spectral(G, args.p), fast_spectral_fused(G, args.p)
            t = [bench(lambda: newton_schulz(G), cuda), bench(lambda: newton_schulz_fused(G), cuda),
                 bench(lambda: fast_spectral(G, args.p), cuda),
                 bench(lambda: fast_spectral_fused(G, args.p), cuda)]
            print(f"{model:6} {str(list(shape)):>18} | {t[0]:9.3f} {t[1]:9.3f} {t[0] / t[1]:6.2f}x "
                  f"{max_rel(ns_tri, ns_ref):8.2e} | {t[2]:9.3f} {t[3]:9.3f} {t[2] / t[3]:6.2f}x "
                  f"{max_rel(fs_tri, fs_ref):8.2e}")
            if args.parts:
                X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
                A = X @ X.mT
                B = ns_poly(A, *NS_COEFFS[0][1:])
                a, b, c = NS_COEFFS[0]
                parts.append((model, shape, [
                    ("gram", bench(lambda: X @ X.mT, cuda), bench(lambda: gram_xxt(X), cuda)),
                    ("poly", bench(lambda: b * A + c * (A @ A), cuda), bench(lambda: ns_poly(A, b, c), cuda)),
                    ("update", bench(lambda: a * X + B @ X, cuda), bench(lambda: ns_update(B, X, a), cuda)),
                ]))
            del G, ns_ref, ns_tri, fs_ref, fs_tri
            if cuda:
                torch.cuda.empty_cache()
    for model, shape, rows in parts:
        print(f"{model:6} {str(list(shape)):>18} | " + "  ".join(
            f"{name} {tt:.3f}/{tk:.3f} ms ({tt / tk:.2f}x)" for name, tt, tk in rows) + "  [torch/triton]")


if __name__ == "__main__":
    main()
