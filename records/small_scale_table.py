#!/usr/bin/env python3
"""Summary table of the small-scale study (./run.sh small_scale), from its logs alone.

    python records/small_scale_table.py logs/small_scale [--plot curves.png]

Logs are named <variant>_lr<LR>_seed<S>.txt (variant: muon, dynmuon, adamw, dynmuon-svd). Prints a
markdown table: per variant, the lr sweep (best val loss at seed 0), and at each variant's best lr
the best val loss mean +- std over its seeds, steps-to-target against Muon's target (Muon's val loss
at 80% of its steps, best lr, seed 0; compare.py's rule), and ms/step. Every number comes from the
functions of compare.py, so `python records/compare.py LOG ... --reference MUON_LOG` reproduces
the steps and losses of any row. --plot draws the best-lr seed-0 curves with compare.py.
"""
import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

NAME = re.compile(r"^(?P<variant>[\w-]+)_lr(?P<lr>[0-9.]+)_seed(?P<seed>\d+)$")


def load(log_dir):
    """{variant: {lr: {seed: Run}}} for every log of the study."""
    runs = defaultdict(lambda: defaultdict(dict))
    for path in sorted(Path(log_dir).glob("*.txt")):
        m = NAME.match(path.stem)
        if m:
            runs[m["variant"]][float(m["lr"])][int(m["seed"])] = compare.parse_log(path)
    if "muon" not in runs:
        raise compare.LogError(f"{log_dir}: no muon_lr*_seed*.txt logs (the reference)")
    return runs


def best_lr(by_lr):
    """The lr whose seed-0 run has the lowest best val loss."""
    return min((lr for lr in by_lr if 0 in by_lr[lr]), key=lambda lr: compare.best_val(by_lr[lr][0])[0])


def table(runs):
    muon_ref = runs["muon"][best_lr(runs["muon"])][0]
    target, target_step, _ = compare.target_from_reference(muon_ref)
    ref_steps = compare.steps_to_target(muon_ref, target)
    lines = [f"Target: {target:.4f} = val loss of {muon_ref.name} at step {target_step} (80% of "
             f"{muon_ref.total_steps}); Muon reaches it at step {ref_steps}.", "",
             "| variant | lr sweep: best val (seed 0) | best lr | seeds | best val mean ± std | "
             "steps to target (per seed) | saving vs muon | ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for variant in ("muon", "dynmuon", "adamw", "dynmuon-svd"):
        if variant not in runs:
            continue
        by_lr = runs[variant]
        sweep = ", ".join(f"{lr:g}: {compare.best_val(by_lr[lr][0])[0]:.4f}" for lr in sorted(by_lr) if 0 in by_lr[lr])
        lr = best_lr(by_lr)
        seeds = by_lr[lr]
        bests = [compare.best_val(r)[0] for r in seeds.values()]
        spread = f"{statistics.mean(bests):.4f} ± {statistics.stdev(bests):.4f}" if len(bests) > 1 else f"{bests[0]:.4f}"
        steps = [compare.steps_to_target(r, target) for r in seeds.values()]
        reached = [s for s in steps if s is not None]
        saving = (f"{100 * (ref_steps - statistics.mean(reached)) / ref_steps:+.1f}%"
                  if len(reached) == len(steps) else "not reached")
        ms = statistics.mean(r.step_avg_ms for r in seeds.values())
        lines.append(f"| {variant} | {sweep} | {lr:g} | {','.join(map(str, seeds))} | {spread} | "
                     f"{', '.join(str(s) if s is not None else '-' for s in steps)} | {saving} | {ms:.1f} |")
    return "\n".join(lines), target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log_dir", help="folder of the study's logs (logs/small_scale)")
    ap.add_argument("--plot", metavar="OUT.png", help="plot the best-lr seed-0 val curves here (matplotlib)")
    args = ap.parse_args(argv)
    try:
        runs = load(args.log_dir)
        text, target = table(runs)
    except compare.LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.plot:
        best = [runs[v][best_lr(runs[v])][0] for v in ("muon", "dynmuon", "adamw", "dynmuon-svd") if v in runs]
        ref = compare.Reference(best[0].name, compare.steps_to_target(best[0], target), best[0].step_avg_ms, best[0])
        compare.plot_runs(best, compare.compare(best, ref, target), target, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
