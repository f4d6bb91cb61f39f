"""Multi-GPU scaling in one call: bench_step.py on one GPU, then on N GPUs (torchrun, DDP as train_gpt.py),
and per config the scaling efficiency = tokens/s per GPU on N GPUs / tokens/s on one GPU.

    python bench/scaling.py --nproc 2 --models 127M 601M        # 1 GPU, then 2 GPUs; table last
    python bench/scaling.py --nproc 8 --fp8 all --json scaling.json
    python bench/scaling.py --nproc 8 --dry_run                 # CPU: the planned configs (no timings)

Other flags go to bench_step.py unchanged (see its --help). Both runs write their JSON next to --json
(or into a temporary folder); the joined table comes last."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_STEP = Path(__file__).resolve().parent / "bench_step.py"
PASSED_ON = ["--models", "--optimizers", "--steps", "--warmup", "--micro_batch_size", "--fp8", "--attention",
             "--kernels", "--ddp_bucket_mb"]


def bench_command(nproc, json_path, passed, dry_run):
    """The command of one bench_step.py run over nproc GPUs (a plain process for one GPU or a dry run)."""
    script = [str(BENCH_STEP), *passed, "--json", str(json_path)] + (["--dry_run"] if dry_run else [])
    if nproc == 1 or dry_run:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]


def run_bench(nproc, json_path, passed, dry_run):
    env = dict(os.environ)
    if dry_run:
        env["WORLD_SIZE"] = str(nproc)  # bench_step --dry_run plans for this many processes without starting them
    elif nproc == 1:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(f"=== {nproc} GPU{'s' if nproc > 1 else ''}: {' '.join(bench_command(nproc, json_path, passed, dry_run))}",
          flush=True)
    proc = subprocess.run(bench_command(nproc, json_path, passed, dry_run), env=env)
    if proc.returncode != 0:
        sys.exit(f"error: bench_step.py on {nproc} GPU(s) exited with {proc.returncode} (its output is above)")
    return json.loads(Path(json_path).read_text())


def join_rows(one, many):
    """One row per (model, opt): both runs' numbers and the scaling efficiency (None where untimed)."""
    single = {(r["model"], r["opt"]): r for r in one["rows"]}
    rows = []
    for r in many["rows"]:
        s = single[(r["model"], r["opt"])]
        timed = r["tokens_s_gpu"] is not None and s["tokens_s_gpu"] is not None
        rows.append(dict(model=r["model"], opt=r["opt"], world=r["world"], micro_batch=r["micro_batch"],
                         accum_1=s["accum"], accum_n=r["accum"], ms_step_1=s["ms_step"], ms_step_n=r["ms_step"],
                         tokens_s_gpu_1=s["tokens_s_gpu"], tokens_s_gpu_n=r["tokens_s_gpu"],
                         efficiency=r["tokens_s_gpu"] / s["tokens_s_gpu"] if timed else None,
                         peak_gib_1=s["peak_gib"], peak_gib_n=r["peak_gib"], dyn_over_muon_n=r["dyn_over_muon"]))
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows):
    n = rows[0]["world"] if rows else "N"
    head = ["model", "opt", "mb", "accum 1/N", "ms/step 1", f"ms/step {n}", "tok/s/GPU 1", f"tok/s/GPU {n}",
            "efficiency", "peak GiB 1/N", "dyn/muon"]
    body = [[r["model"], r["opt"], str(r["micro_batch"]), f"{r['accum_1']}/{r['accum_n']}", fmt(r["ms_step_1"], ".1f"),
             fmt(r["ms_step_n"], ".1f"), fmt(r["tokens_s_gpu_1"], ",.0f"), fmt(r["tokens_s_gpu_n"], ",.0f"),
             "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.1f}%",
             f"{fmt(r['peak_gib_1'], '.1f')}/{fmt(r['peak_gib_n'], '.1f')}", fmt(r["dyn_over_muon_n"], ".4f")]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="GPUs of the multi-GPU run (>= 2)")
    ap.add_argument("--json", default=None, help="write the joined table here (and the two runs beside it)")
    ap.add_argument("--dry_run", action="store_true", help="CPU: plan both runs with bench_step.py --dry_run")
    a, passed = ap.parse_known_args()
    unknown = [x for x in passed if x.startswith("--") and x not in PASSED_ON]
    if a.nproc < 2 or unknown:
        ap.error(f"--nproc must be >= 2, got {a.nproc}" if a.nproc < 2 else
                 f"{unknown}: not a bench_step.py flag passed on (those are {PASSED_ON})")
    folder = Path(a.json).resolve().parent if a.json else Path(tempfile.mkdtemp(prefix="scaling_"))
    stem = Path(a.json).stem if a.json else "scaling"
    folder.mkdir(parents=True, exist_ok=True)
    one = run_bench(1, folder / f"{stem}_1gpu.json", passed, a.dry_run)
    many = run_bench(a.nproc, folder / f"{stem}_{a.nproc}gpu.json", passed, a.dry_run)
    rows = join_rows(one, many)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(meta=dict(one=one["meta"], many=many["meta"]), rows=rows), indent=1))
    print(f"\nscaling efficiency = tokens/s per GPU on {a.nproc} GPUs / tokens/s on 1 GPU (same call)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
