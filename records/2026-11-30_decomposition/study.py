#!/usr/bin/env python3
"""The decomposition study: which part of DynMuon carries its gain (README.md here has the results).

    python3 records/2026-11-30_decomposition/study.py --data_dir gpu_data/pycorpus --gpus 2
    python3 records/2026-11-30_decomposition/study.py --list          # the runs, as commands; runs nothing

A 6 x 384 GPT (the SPEC model scaled down), sequence 1024, 32 sequences a step, 1500 steps, val every 50
steps on 614,400 tokens (the Python-source corpus's val shard holds 617K), the trainer's defaults otherwise.
Variants (3 seeds each; seed s also orders the data, --data_seed s): Muon at lr 0.01 / 0.015 / 0.02 / 0.03,
DynMuon (Fast-Spectral) and its p < 0 stage replaced by --spectral scalar / polar / exact; AdamW once; and the
three follow-ups the first results suggested (Muon with a 10% warmup, the scalar factor from step 1, p_min -0.5). Runs go several to a GPU at once (--per_gpu),
checkpoint every 250 steps and resume (--resume auto), so an interrupted study continues where it stopped;
finished runs are reported as such by the trainer. Exit status: 0 all runs finished, 1 some failed or were
stopped (named at the end), 2 bad arguments.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = ["--model_dim", "384", "--n_layer", "6", "--n_head", "6", "--sequence_length", "1024",
         "--batch_size", "32", "--device_batch_size", "16", "--micro_batch_size", "16",
         "--val_loss_every", "50", "--val_tokens", "614400"]
SEEDS = (0, 1, 2)
VARIANTS = {  # name -> trainer flags
    **{f"muon_lr{lr}": ["--optimizer", "muon", "--lr", lr] for lr in ("0.01", "0.015", "0.02", "0.03")},
    "dynmuon": ["--optimizer", "dynmuon"],
    "dynmuon_scalar": ["--optimizer", "dynmuon", "--spectral", "scalar"],
    "dynmuon_polar": ["--optimizer", "dynmuon", "--spectral", "polar"],
    "dynmuon_exact": ["--optimizer", "dynmuon", "--spectral", "exact"],
    "adamw": ["--optimizer", "adamw"],
    # follow-ups from the decomposition: the raw phase as a warmup, the factor without the raw phase, a stronger factor
    "muon_warmup0.1": ["--optimizer", "muon", "--lr", "0.01", "--warmup_ratio", "0.1"],
    "dynmuon_scalar_fixed": ["--optimizer", "dynmuon", "--spectral", "scalar", "--p_schedule", "fixed"],
    "dynmuon_scalar_pmin-0.5": ["--optimizer", "dynmuon", "--spectral", "scalar", "--dynmuon_pmin", "-0.5"],
}
ONE_SEED = {"adamw"}


def runs(args):
    """(run name, trainer argv) of every run of the study, in launch order (slowest variant first)."""
    order = sorted(VARIANTS, key=lambda v: v != "dynmuon_exact")
    out = []
    for seed in SEEDS:
        for variant in order:
            if (args.only and variant not in args.only) or (variant in ONE_SEED and seed != SEEDS[0]):
                continue
            name = f"{variant}_seed{seed}"
            out.append((name, [sys.executable, args.trainer, *MODEL, *VARIANTS[variant],
                               "--num_iterations", str(args.steps), "--seed", str(seed), "--data_seed", str(seed),
                               "--data_dir", args.data_dir, "--log_dir", str(Path(args.out_dir) / "logs"),
                               "--run_name", name, "--checkpoint_dir", str(Path(args.checkpoint_root) / name),
                               "--checkpoint_freq", "250", "--keep_checkpoints", "1", "--resume", "auto"]))
    return out


def launch(name, argv, gpu, log_dir):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
    out = open(Path(log_dir) / f"{name}.console", "a")
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def run_all(todo, args):
    """Runs todo with at most per_gpu processes on each GPU; past --deadline_s, SIGTERM (checkpoint, exit 143)."""
    console = Path(args.out_dir) / "console"
    console.mkdir(parents=True, exist_ok=True)
    start, running, results, stopped = time.monotonic(), {}, {}, False
    slots = [g for _ in range(args.per_gpu) for g in range(args.gpus)]
    while todo or running:
        late = args.deadline_s and time.monotonic() - start > args.deadline_s
        if late and not stopped:
            print(f"deadline {args.deadline_s} s: stopping {len(running)} runs at their next step", flush=True)
            for proc, _ in running.values():
                proc.send_signal(signal.SIGTERM)
            stopped, todo = True, []
        while todo and slots and not stopped:
            name, argv = todo.pop(0)
            gpu = slots.pop(0)
            running[name] = (launch(name, argv, gpu, console), gpu)
        for name, (proc, gpu) in list(running.items()):
            if proc.poll() is not None:
                results[name] = proc.returncode
                slots.append(gpu)
                del running[name]
                print(f"[{time.monotonic() - start:6.0f} s] {name}: exit {proc.returncode} "
                      f"({len(results)} done, {len(running)} running, {len(todo)} waiting)", flush=True)
        time.sleep(2)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", default=str(REPO / "train_gpt.py"), help="the train_gpt.py to run")
    ap.add_argument("--data_dir", default="gpu_data/pycorpus", help="shards (data/python_corpus.py makes them)")
    ap.add_argument("--out_dir", default=str(HERE), help="logs go to OUT_DIR/logs, console output to OUT_DIR/console")
    ap.add_argument("--checkpoint_root", default="checkpoints/decomposition", help="one checkpoint folder per run")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to spread the runs over (CUDA ids 0..N-1)")
    ap.add_argument("--per_gpu", type=int, default=6, help="runs at once on each GPU (small models share a GPU well)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of every run")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    ap.add_argument("--deadline_s", type=float, default=0,
                    help="after this many seconds stop every run at its next step (checkpointed; rerun to continue)")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    args = ap.parse_args()
    if args.gpus < 1 or args.per_gpu < 1:
        ap.error("--gpus and --per_gpu must be >= 1")
    todo = runs(args)
    if args.list:
        print("\n".join(shlex.join(argv) for _, argv in todo))
        return 0
    results = run_all(todo, args)
    failed = sorted(name for name, code in results.items() if code != 0)
    print(f"{len(results) - len(failed)} of {len(results)} runs finished; "
          + (f"not finished: {', '.join(failed)} (rerun to resume)" if failed else "all done"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
