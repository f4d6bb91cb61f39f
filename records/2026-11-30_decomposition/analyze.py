#!/usr/bin/env python3
"""Seed-paired differences, the val-loss curves and DynMuon's effective LR factor of the decomposition study.

    python3 records/2026-11-30_decomposition/analyze.py            # prints the paired table, writes the plots

Every variant's seed s shares its initialisation and data order with every other variant's seed s, so the
difference of final val losses within a seed removes most of the seed-to-seed spread. For each variant:
the three per-seed differences to the reference, their mean +- sample std, and a two-sided paired t-test
(t = mean / (std / sqrt(n)), n - 1 degrees of freedom; compare.py's Student t). The unpaired Welch tests are
compare.py --group's (table.md). Plots need matplotlib.
"""
import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0]))
from compare import mean_std, t_two_sided_p  # noqa: E402

SEEDS = (0, 1, 2)
SHAPED = ("dynmuon", "dynmuon_scalar", "dynmuon_exact", "dynmuon_polar", "dynmuon_scalar_fixed",
          "dynmuon_scalar_pmin-0.5")


def events(log_dir, run):
    return [json.loads(line) for line in (Path(log_dir) / f"{run}.jsonl").read_text().splitlines()]


def final_vals(log_dir):
    """{variant: {seed: final val loss}} of every run with a .jsonl log."""
    out = {}
    for path in sorted(Path(log_dir).glob("*_seed*.jsonl")):
        variant, seed = path.stem.rsplit("_seed", 1)
        vals = [e["val_loss"] for e in events(log_dir, path.stem) if e["event"] == "val"]
        out.setdefault(variant, {})[int(seed)] = vals[-1]
    return out


def paired(final, variant, reference):
    """(per-seed differences, mean, std, p) of variant - reference over the seeds both have."""
    diffs = [final[variant][s] - final[reference][s] for s in SEEDS if s in final[variant] and s in final[reference]]
    mean, std = mean_std(diffs)
    if len(diffs) < 2 or not std:
        return diffs, mean, std, None
    return diffs, mean, std, t_two_sided_p(mean / (std / math.sqrt(len(diffs))), len(diffs) - 1)


def paired_table(final, references):
    lines = ["| variant | " + " | ".join(f"- {r} (per seed; mean ± std; paired p)" for r in references) + " |",
             "|---|" + "---|" * len(references)]
    for variant in sorted(final, key=lambda v: sum(final[v].values()) / len(final[v])):
        cells = []
        for ref in references:
            if variant == ref or len(final[variant]) < 2:
                cells.append("-")
                continue
            diffs, mean, std, p = paired(final, variant, ref)
            cells.append(f"{', '.join(f'{d:+.4f}' for d in diffs)}; {mean:+.4f} ± {std:.4f}; "
                         + ("n/a" if p is None else f"p {p:.4f}"))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(log_dir, variants, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (full, late) = plt.subplots(1, 2, figsize=(13, 5))
    for variant in variants:
        curves = [[(e["step"], e["val_loss"]) for e in events(log_dir, f"{variant}_seed{s}") if e["event"] == "val"]
                  for s in SEEDS if (Path(log_dir) / f"{variant}_seed{s}.jsonl").exists()]
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        for ax in (full, late):
            ax.plot(steps, mean, label=f"{variant} (n={len(curves)})")
    full.set_ylim(1.6, 4.0)
    late.set_xlim(600, 1500)
    late.set_ylim(1.68, 2.1)
    for ax in (full, late):
        ax.set_xlabel("step")
        ax.set_ylabel("val loss (mean over seeds)")
        ax.grid(alpha=0.3)
    late.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_factor(log_dir, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant in SHAPED:
        run = f"{variant}_seed0"
        if not (Path(log_dir) / f"{run}.jsonl").exists():
            continue
        train = [e for e in events(log_dir, run) if e["event"] == "train"]
        line, = ax.plot([e["step"] for e in train], [e["factor_mean"] for e in train], label=f"{run} mean")
        ax.fill_between([e["step"] for e in train], [e["factor_min"] for e in train],
                        [e["factor_max"] for e in train], color=line.get_color(), alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("effective LR factor (band: min-max over matrices)")
    ax.set_title("what multiplies lr sqrt(out/in) NS(U), seed 0", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log_dir", default=str(HERE / "logs"), help="the study's .jsonl logs")
    ap.add_argument("--references", nargs="+", default=["muon_lr0.015", "dynmuon"],
                    help="variants to pair every other against (best-lr Muon, DynMuon)")
    ap.add_argument("--no_plots", action="store_true", help="only print the paired table")
    args = ap.parse_args()
    final = final_vals(args.log_dir)
    print(paired_table(final, args.references))
    if not args.no_plots:
        plot_curves(args.log_dir, ["muon_lr0.015", "muon_warmup0.1", "dynmuon", "dynmuon_scalar", "dynmuon_exact",
                                   "dynmuon_polar", "dynmuon_scalar_fixed", "dynmuon_scalar_pmin-0.5"],
                    HERE / "curves.png")
        plot_factor(args.log_dir, HERE / "factor.png")
        print(f"wrote {HERE / 'curves.png'} and {HERE / 'factor.png'}")


if __name__ == "__main__":
    main()
