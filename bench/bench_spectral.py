"""Benchmark: exact spectral shaping U S^p V^T (bench/spectral_exact.py) vs the trainer's bf16 Newton-Schulz,
its Taylor Fast-Spectral and its fp32 SVD path, batched at the DynMuon model shapes.

    python3 bench/bench_spectral.py --shapes study 127M --json $OUT/spectral.json     # H200: ~1-2 min
    python3 bench/bench_spectral.py --shapes tiny --device cpu                        # smoke run
Inputs: bf16 matrices U diag(s) V^T with s_i = 0.01 / i and random orthogonal U, V (QR), a few sets that the
timed calls rotate through. Times: CUDA events (CPU: perf_counter), median of --repeats after warm-up.
Error: max over the first --ref_batch matrices of |D - D_ref|_F / |D_ref|_F, D_ref from a float64 SVD on the
same device (for newton_schulz the reference is the polar factor, p = 0). The table comes last."""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import train_gpt  # noqa: E402
from spectral_exact import eigh_spectral, exact_spectral, polar_spectral  # noqa: E402

SHAPES = {  # (batch, m, n): 4 attention matrices per layer (square) and 2 MLP ones (wide after transposition)
    "tiny": [(4, 64, 64), (2, 64, 256)],
    "study": [(24, 384, 384), (12, 384, 1536)],
    "127M": [(96, 512, 512), (48, 512, 2048)],
    "601M": [(96, 1280, 1280), (48, 1280, 5120)],
    "1.1B": [(96, 1792, 1792), (48, 1792, 7168)],
}
SLOW = {"svd_spectral", "svd_gesvdj", "svd_gesvda", "eigh64"}  # skipped for m > 512 unless named in --methods


def first(out):
    return out[0] if isinstance(out, tuple) else out


def methods(p, cuda):
    """name -> (fn(X), reference exponent)."""
    ms = {"newton_schulz": (lambda X: first(train_gpt.newton_schulz(X)), 0.0)}
    if hasattr(train_gpt, "newton_schulz_fused") and cuda:
        ms["newton_schulz_fused"] = (lambda X: first(train_gpt.newton_schulz_fused(X)), 0.0)
    ms["fast_spectral"] = (lambda X: train_gpt.fast_spectral(X, p), p)
    ms["svd_spectral"] = (lambda X: train_gpt.svd_spectral(X, p), p)
    if cuda:
        for drv in ("gesvdj", "gesvda"):
            def svd_drv(X, drv=drv):
                u, s, vh = torch.linalg.svd(X.float(), full_matrices=False, driver=drv)
                keep = s > s.amax(-1, keepdim=True) * 1e-7
                sp = torch.where(keep, s.clamp_min(1e-30).pow(p), torch.zeros_like(s))
                return ((u * sp.unsqueeze(-2)) @ vh).bfloat16()
            ms["svd_" + drv] = (svd_drv, p)
    ms["eigh64"] = (lambda X: eigh_spectral(X, p), p)
    ms["exact_spectral"] = (lambda X: exact_spectral(X, p), p)
    ms["polar_spectral"] = (lambda X: polar_spectral(X, p), p)
    return ms


def make_inputs(shape, sets, device, seed=0):
    """bf16 U diag(0.01 / i) V^T, U [m, m] and V [n, m] orthonormal from QR of Gaussian matrices."""
    b, m, n = shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    s = 0.01 / torch.arange(1, m + 1, device=device, dtype=torch.float32)
    out = []
    for _ in range(sets):
        U = torch.linalg.qr(torch.randn(b, m, m, generator=g).to(device))[0]
        V = torch.linalg.qr(torch.randn(b, n, m, generator=g).to(device))[0]
        out.append(((U * s) @ V.mT).bfloat16())
    return out


def reference(X, p):
    u, s, vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (u * s.pow(p).unsqueeze(-2)) @ vh


def rel_err(Y, R):
    Y, R = Y.double().flatten(1), R.flatten(1)
    return ((Y - R).norm(dim=1) / R.norm(dim=1)).max().item()


def timed(fn, inputs, repeats, cuda, slow_s):
    """Median ms of fn over repeats (after warm-up), rotating through inputs; one call if it is slow."""
    def once(X):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(X)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn(X)
        return 1e3 * (time.perf_counter() - t)
    first_ms = once(inputs[0])  # warm-up (also cuBLAS / cuSOLVER handles and workspaces)
    if first_ms > 1e3 * slow_s:
        return once(inputs[1 % len(inputs)]), 1
    once(inputs[1 % len(inputs)])
    times = [once(inputs[i % len(inputs)]) for i in range(repeats)]
    return statistics.median(times), repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["study", "127M"],
                    help="model presets whose optimizer shapes to run (several allowed)")
    ap.add_argument("--p", type=float, default=-0.25, help="exponent, in [-1, 0)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per method and shape (median)")
    ap.add_argument("--sets", type=int, default=3, help="input sets the timed calls rotate through")
    ap.add_argument("--ref_batch", type=int, default=8, help="matrices of the batch compared to the fp64 SVD")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of methods (default: all; svd/eigh ones only for m <= 512)")
    ap.add_argument("--slow_s", type=float, default=2.0, help="a method whose warm-up call takes longer is timed once")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    ms = methods(args.p, cuda)
    if args.methods:
        unknown = set(args.methods) - set(ms)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; known: {sorted(ms)}")
    dev_name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    print(f"device {dev_name}, torch {torch.__version__}, p = {args.p}, repeats {args.repeats}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for preset in args.shapes:
        for shape in SHAPES[preset]:
            b, m, n = shape
            inputs = make_inputs(shape, args.sets, args.device)
            Xr = inputs[0][:args.ref_batch]
            refs = {}
            ns_ms = None
            for name, (fn, p_ref) in ms.items():
                if args.methods and name not in args.methods:
                    continue
                if not args.methods and name in SLOW and m > 512:
                    continue
                if p_ref not in refs:
                    refs[p_ref] = reference(Xr, p_ref)
                try:
                    ms_, reps = timed(fn, inputs, args.repeats, cuda, args.slow_s)
                    err = rel_err(fn(inputs[0])[:args.ref_batch], refs[p_ref])
                except Exception as e:  # e.g. a cuSOLVER driver refusing a shape
                    print(f"  {preset} {list(shape)} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                if name == "newton_schulz":
                    ns_ms = ms_
                row = dict(preset=preset, shape=list(shape), method=name, ms=ms_, repeats=reps, rel_err=err,
                           err_vs="polar (p=0)" if p_ref == 0.0 else f"p={args.p}",
                           x_ns=ms_ / ns_ms if ns_ms else None)
                rows.append(row)
                print(f"  {preset} {list(shape)} {name}: {ms_:.3f} ms ({reps} calls), rel err {err:.2e}", flush=True)
            del inputs, Xr, refs
            if cuda:
                torch.cuda.empty_cache()
    print(f"total {time.perf_counter() - t_all:.1f} s")
    head = f"{'preset':6} {'shape':>17} {'method':20} {'ms':>10} {'x NS':>8} {'rel err':>9}  vs"
    print(head)
    print("-" * len(head))
    for r in rows:
        x = f"{r['x_ns']:8.1f}" if r["x_ns"] else f"{'-':>8}"
        print(f"{r['preset']:6} {str(r['shape']):>17} {r['method']:20} {r['ms']:10.3f} {x} {r['rel_err']:9.2e}  {r['err_vs']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(device=dev_name, torch=torch.__version__, p=args.p,
                                                   repeats=args.repeats, rows=rows), indent=1))


if __name__ == "__main__":
    main()
