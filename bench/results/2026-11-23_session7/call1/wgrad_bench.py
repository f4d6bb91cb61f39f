"""Weight-gradient accumulation at 1.1B shapes (micro-batch 32 x 1024 tokens): current (bf16 mm, cast, add_)
vs cuBLAS addmm with fp32 C/D in place (aten::addmm.dtype_out)."""
import torch
torch.manual_seed(0)
M = 32 * 1024
shapes = {"qkv": (5376, 1792), "out": (1792, 1792), "fc": (7168, 1792), "proj": (1792, 7168)}
dev = "cuda"

def timeit(fn, reps=20, warm=3):
    for _ in range(warm): fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    torch.cuda.synchronize(); s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps

for name, (N, K) in shapes.items():
    g = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    buf = torch.randn(N, K, device=dev)
    def current():
        w = (g.mT @ x).float()
        buf.add_(w)
    def mm_only():
        g.mT @ x
    def fused():
        torch.addmm(buf, g.mT, x, out_dtype=torch.float32, out=buf)
    def mm_fp32():
        torch.mm(g.mT, x, out_dtype=torch.float32)
    ref = buf.double() + g.mT.double() @ x.double()
    b0 = buf.clone(); fused(); err_f = (buf.double() - ref).abs().max().item(); buf.copy_(b0)
    current(); err_c = (buf.double() - ref).abs().max().item(); buf.copy_(b0)
    t = {k: timeit(f) for k, f in [("mm_bf16", mm_only), ("current", current), ("fused", fused), ("mm_fp32out", mm_fp32)]}
    print(f"{name} {N}x{K}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in t.items()),
          f"| err fused {err_f:.3g} current {err_c:.3g} (|ref| {ref.abs().max().item():.3g})")
