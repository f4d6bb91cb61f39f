"""Benchmark: ms per optimizer step of train_gpt.train_step (global batch 512x1024, gradient accumulation,
torch.compile, bf16 autocast, synthetic tokens) for Muon vs DynMuon, plus the spectral transform alone.

    python bench/bench_step.py                                  # 1 GPU: 127M, 601M, 1.1B x muon, dynmuon
    python bench/bench_step.py --models 127M --steps 10 --json bench_127M.json
    python bench/bench_step.py --models 601M --fp8 all          # FP8 matmuls (train_gpt.py --fp8)
    python bench/bench_step.py --models 127M --profile 40       # also the 40 costliest GPU kernels of a step
    torchrun --standalone --nproc_per_node=2 bench/bench_step.py  # DDP as train_gpt: per-GPU tokens/s, scaling
    python bench/bench_step.py --dry_run                        # CPU: planned configs and FLOPs per step

DynMuon runs with --p_schedule fixed (p = -0.25 at every step), so every timed step takes the costly
Fast-Spectral branch; Muon is p = 0 (Newton-Schulz). MFU is against the bf16 matmul rate measured at the
start of the same run (8192^3, median). Transform = spectral_transform(U, p) (fused or torch) over the
model's matrices stacked per wide shape as DynMuon.step does, on one GPU (in a DDP step the stacks are split
across ranks). Only rank 0 prints; the table comes last."""
import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

PRESETS = ("127M", "601M", "1.1B")
H100_GIB = 79.6  # total memory of an H100 80GB HBM3, for --dry_run
DEVICE_BATCH, GLOBAL_BATCH = (tg.build_arg_parser().get_default(f) for f in ("device_batch_size", "batch_size"))
SEQUENCE_LENGTH = tg.build_arg_parser().get_default("sequence_length")
P_OF = {"muon": 0.0, "dynmuon": -0.25}
FLOPS_FORMULA = ("FLOPs/step = 6*N*tokens + 12*n_layer*d*seq_len*tokens "
                 "(N = parameters without the embedding, lm_head included)")


def config(model, opt, mb, world, device, kernels, no_compile, speed_flags=()):
    argv = ["--model", model, "--optimizer", opt, "--device_batch_size", str(mb), "--micro_batch_size", str(mb),
            "--batch_size", str(GLOBAL_BATCH), "--sequence_length", str(SEQUENCE_LENGTH),  # the GPU shape, also
            # where --dry_run resolves on a CPU (whose defaults are laptop-sized)
            "--device", device, "--kernels", kernels, "--run_name", "bench", *speed_flags]
    argv += ["--p_schedule", "fixed", "--dynmuon_pmin", str(P_OF["dynmuon"])] if opt == "dynmuon" else []
    args = tg.resolve_config(argv + (["--no_compile"] if no_compile else []))
    tg.validate_flags(args, world)  # batch_size must split into world x micro-batches
    return args


def flops_per_step(args):
    """FLOPs of one optimizer step (forward + backward) over the global batch, per FLOPS_FORMULA."""
    with torch.device("meta"):
        model = tg.build_model(args)
    n = tg.count_parameters(model) - model.embed.weight.numel()
    tokens = args.batch_size * args.sequence_length
    return 6 * n * tokens + 12 * args.n_layer * args.model_dim * args.sequence_length * tokens, n


def matrix_stacks(args):
    """{(m, n): count}: the model's hidden matrices as wide m <= n stacks, grouped like DynMuon._shape_groups."""
    with torch.device("meta"):
        model = tg.build_model(args)
    stacks = {}
    for w in model.matrices():
        m, n = w.shape[-2:]
        key = (min(m, n), max(m, n))
        stacks[key] = stacks.get(key, 0) + w[..., 0, 0].numel()
    return stacks


def cuda_median_ms(fn, reps=10, warmup=3):
    """Median over reps of fn()'s GPU time (CUDA events), after warm-up calls (Triton JIT, allocator)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(n=8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = cuda_median_ms(lambda: a @ b, reps=20, warmup=5)
    return 2 * n ** 3 / ms / 1e9  # TFLOP/s


def transform_ms(args, p, fused):
    stacks = {k: torch.randn(c, *k, device="cuda").bfloat16() for k, c in matrix_stacks(args).items()}
    ns, negative = (tg.newton_schulz_fused, tg.fast_spectral_fused) if fused else (tg.newton_schulz, tg.fast_spectral)
    return cuda_median_ms(lambda: [tg.spectral_transform(U, p, negative, ns) for U in stacks.values()], reps=5)


def step_bench(args, steps, warmup, world, local, say, profile_rows=0):
    """Median ms per train_step and peak allocated GiB; with profile_rows, one more step under the profiler,
    whose most expensive GPU kernels are printed."""
    device = torch.device(args.device, local)  # cpu only in tests
    torch.manual_seed(args.seed)
    raw = tg.build_model(args, device)
    opts = tg.build_optimizers(raw, args)
    model = tg.wrap_model(raw, args, world, local, compile_model=not args.no_compile)
    fwd_context = tg.forward_context(args)
    accum = args.batch_size // (world * args.micro_batch_size)
    shape = (args.micro_batch_size, args.sequence_length)
    batch = [(torch.randint(0, 50257, shape, device=device), torch.randint(0, 50257, shape, device=device))
             for _ in range(accum)]
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = tg.train_step(model, opts, batch, args, i, 1.0 / accum, fwd_context)
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        times += [ms] if i >= warmup else []
        say(f"  {'warm-up' if i < warmup else 'step'} {i + 1}/{warmup + steps}: {ms:.1f} ms, "
            f"loss {loss.item() / accum:.4f}" + (f", p {opts[-1].last_p}" if hasattr(opts[-1], "last_p") else ""))
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if profile_rows:
        say(profile_step(lambda: tg.train_step(model, opts, batch, args, warmup + steps, 1.0 / accum, fwd_context),
                         profile_rows))
    del model, raw, opts, batch, loss
    return statistics.median(times), peak


def profile_step(step, rows):
    """The `rows` ops and kernels of most self GPU time in one call of step(), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile
    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * gpu) as prof:
        step()
        if gpu:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)


def free():
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows):
    head = ["model", "opt", "mb", "ms/step", "tok/s/GPU", "MFU %", "peak GiB", "transform ms fused/torch",
            "dyn/muon"]
    body = [[r["model"], r["opt"], str(r["micro_batch"]), fmt(r["ms_step"], ".1f"), fmt(r["tokens_s_gpu"], ",.0f"),
             fmt(r["mfu_pct"], ".1f"), fmt(r["peak_gib"], ".1f"),
             f"{fmt(r['transform_fused_ms'], '.2f')} / {fmt(r['transform_torch_ms'], '.2f')}",
             fmt(r["dyn_over_muon"], ".4f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(PRESETS), help="presets (space or comma separated)")
    ap.add_argument("--optimizers", nargs="+", default=["muon", "dynmuon"], help="optimizers to time per preset")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per config (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, Triton JIT)")
    ap.add_argument("--micro_batch_size", type=int, default=0,
                    help="0: the trainer's default for this GPU and number of processes "
                         "(--dry_run: for an H100)")
    ap.add_argument("--kernels", choices=["triton", "torch"], default="triton",
                    help="train_gpt.py --kernels of the step timing (Triton NS, QK-norm + RoPE, cross-entropy)")
    ap.add_argument("--no_compile", action="store_true", help="time the eager model")
    ap.add_argument("--attention", choices=list(tg.SDPA_BACKENDS), default="auto",
                    help="train_gpt.py --attention (SDPA backend)")
    ap.add_argument("--fp8", choices=list(tg.FP8_SCOPES), default="none",
                    help="train_gpt.py --fp8 (MFU stays against the bf16 matmul rate)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="after the timed steps, profile one more and print its ROWS most expensive GPU kernels")
    ap.add_argument("--ddp_bucket_mb", type=float, default=tg.build_arg_parser().get_default("ddp_bucket_mb"),
                    help="train_gpt.py --ddp_bucket_mb (several GPUs)")
    ap.add_argument("--json", default=None, help="also write the table (and run facts) as JSON here")
    ap.add_argument("--dry_run", action="store_true", help="CPU: print planned configs and FLOPs/step, no CUDA")
    a = ap.parse_args()
    models = [m for s in a.models for m in s.split(",") if m]
    optims = [o for s in a.optimizers for o in s.split(",") if o]
    for name, known in ((models, PRESETS), (optims, P_OF)):
        bad = [x for x in name if x not in known]
        if bad:
            ap.error(f"unknown {bad}: choose from {list(known)}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = "cpu" if a.dry_run else "cuda"
    kernels = "torch" if a.dry_run else a.kernels  # a dry run builds CPU configs, where Triton does not run
    rank, local = 0, 0
    if not a.dry_run:
        rank, world, local = tg.setup_distributed(config(models[0], optims[0], 1, 1, device, kernels, True))
    say = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    say(FLOPS_FORMULA)
    peak_tflops = None
    if not a.dry_run:
        peak_tflops = matmul_tflops()
        say(f"device {torch.cuda.get_device_name()} x {world}, torch {torch.__version__}, "
            f"bf16 matmul 8192^3: {peak_tflops:.1f} TFLOP/s (MFU reference)")
    rows = []
    for model in models:
        mb = a.micro_batch_size or tg.default_micro_batch(model, "cuda", DEVICE_BATCH, GLOBAL_BATCH // world,
                                                          H100_GIB if a.dry_run else None)
        for opt in optims:
            args = config(model, opt, mb, world, device, kernels, a.no_compile,
                          ["--attention", a.attention, "--fp8", a.fp8, "--ddp_bucket_mb", str(a.ddp_bucket_mb)])
            flops, n = flops_per_step(args)
            accum = args.batch_size // (world * mb)
            row = dict(model=model, opt=opt, micro_batch=mb, accum=accum, world=world, flops_per_step=flops,
                       non_embedding_params=n, ms_step=None, tokens_s_gpu=None, mfu_pct=None, peak_gib=None,
                       transform_fused_ms=None, transform_torch_ms=None, dyn_over_muon=None)
            say(f"{model} {opt}: micro-batch {mb} x {accum} accum x {world} GPU, N {n:,}, "
                f"{flops / 1e15:.3f} PFLOP/step, stacks {matrix_stacks(args)}")
            if not a.dry_run:
                free()
                ms, peak = step_bench(args, a.steps, a.warmup, world, local, say, a.profile)
                free()
                tokens = args.batch_size * args.sequence_length
                row.update(ms_step=ms, peak_gib=peak, tokens_s_gpu=tokens / world / ms * 1e3,
                           mfu_pct=100 * flops / world / (ms / 1e3) / (peak_tflops * 1e12),
                           transform_fused_ms=transform_ms(args, P_OF[opt], True),
                           transform_torch_ms=transform_ms(args, P_OF[opt], False))
                free()
                say(f"  -> {ms:.1f} ms/step, MFU {row['mfu_pct']:.1f}%, peak {peak:.1f} GiB, transform "
                    f"{row['transform_fused_ms']:.2f} ms fused / {row['transform_torch_ms']:.2f} ms torch")
            rows.append(row)
        ref = {r["opt"]: r["ms_step"] for r in rows if r["model"] == model}
        if ref.get("muon") and ref.get("dynmuon"):
            next(r for r in rows if r["model"] == model and r["opt"] == "dynmuon")["dyn_over_muon"] = \
                ref["dynmuon"] / ref["muon"]
    if a.json and rank == 0:
        meta = dict(device=None if a.dry_run else torch.cuda.get_device_name(), world=world, torch=torch.__version__,
                    matmul_tflops=peak_tflops, kernels=args.kernels, compile=not a.no_compile, steps=a.steps,
                    warmup=a.warmup, p_schedule="dynmuon fixed p=-0.25, muon p=0", flops_formula=FLOPS_FORMULA,
                    attention=a.attention, fp8=a.fp8)
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    say(f"\nglobal batch 512x1024, {a.steps} timed steps (median) after {a.warmup} warm-up, "
        f"kernels {args.kernels}, {'eager' if a.no_compile else 'torch.compile'}, attention {a.attention}, "
        f"fp8 {a.fp8}; {FLOPS_FORMULA}")
    say(format_table(rows))
    if tg.is_distributed():
        tg.dist.destroy_process_group()


if __name__ == "__main__":
    main()
