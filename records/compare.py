#!/usr/bin/env python3
"""Compare training logs by steps-to-target, the DynMuon paper's metric (SPEC.md section 4).

    python records/compare.py LOG [LOG ...] [--target LOSS | --reference REF] [--plot out.png] [--json]

A LOG is a training log (ours or modded-nanoGPT's) or a records/<YYYY-MM-DD>_<name>/ folder
holding exactly one .txt log. Only lines of the form

    step:{s}/{T} val_loss:{x} [train_time:{ms}ms step_avg:{ms}ms]

are read as evaluations; `step:` must start a whitespace-separated word and the fields must be
real numbers, so a copy of the training script at the top of a log (f-strings, string literals,
comments) is never mistaken for data. Train lines (`step:s/T train_loss:...`) only supply
step_avg. An optional `target:{X} reached_at_step:{N}` / `target:{X} not_reached` line is kept
for information. A last line without its newline (log cut mid-write) is used only if its
val_loss number is complete (followed by a space).

Target (paper rule): the reference run's val loss at 80% of its total steps T, i.e. the
evaluation at step round(0.8*T), or the last evaluation before 0.8*T if there is none exactly
there. Steps-to-target = first evaluated step with val_loss <= target. Step saving =
(ref_steps - steps) / ref_steps. The reference is the first LOG unless --reference names a log,
a records folder, or a records.json entry (NAME or NAME:OPTIMIZER, optimizer default muon).

Exit status: 0 ok, 2 bad input (missing file, no evaluations, unknown reference, no target).
The parse/compute functions are pure and importable (parse_text, parse_log, best_val,
steps_to_target, target_from_reference, compare).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RECORDS_JSON = Path(__file__).resolve().parent / "records.json"
NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
VAL_RE = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s+val_loss:(\d+\.\d+|\d+|nan|inf)(?=\s|$)")
VAL_RE_PARTIAL = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s+val_loss:(\d+\.\d+|\d+|nan|inf)(?=\s)")
STEP_RE = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s")
AVG_RE = re.compile(r"(?<!\S)step_avg:(\d+\.?\d*)ms")
TARGET_RE = re.compile(rf"(?<!\S)target:({NUM})\s+(?:reached_at_step:(\d+)|not_reached)(?=\s|$)")


class LogError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass
class Run:
    name: str
    path: str
    total_steps: int                      # T, from the last `step:s/T` line
    evals: list[tuple[int, float]]        # (step, val_loss), sorted by step
    step_avg_ms: float | None = None      # last numeric step_avg
    logged_target: float | None = None    # from a `target:X ...` line, if any
    logged_reached: int | None = None

    @property
    def last_step(self) -> int:
        return self.evals[-1][0]


@dataclass
class Reference:
    name: str
    steps: int | None                     # steps to target
    ms_per_step: float | None
    run: Run | None = None                # None for a records.json entry
    target: float | None = None           # published target (records.json entries)
    notes: list[str] = field(default_factory=list)


def parse_text(text: str, name: str = "run", path: str = "") -> Run:
    """Parse the text of a log into a Run. Raises LogError if it holds no evaluation."""
    lines = text.splitlines()
    cut = bool(lines) and not text.endswith(("\n", "\r"))
    evals: dict[int, float] = {}
    total, avg, ltarget, lreached = None, None, None, None
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        partial = cut and i == len(lines) - 1
        m = (VAL_RE_PARTIAL if partial else VAL_RE).search(line)
        if m:
            evals[int(m.group(1))] = float(m.group(3))  # a repeated step keeps the last value
        s = m or STEP_RE.search(line)
        if s:
            total = int(s.group(2))
            a = AVG_RE.search(line)
            if a:
                avg = float(a.group(1))
        t = None if partial else TARGET_RE.search(line)
        if t:
            ltarget = float(t.group(1))
            lreached = int(t.group(2)) if t.group(2) else None
    if not evals:
        raise LogError(f"{path or name}: no validation lines (step:S/T val_loss:X) found")
    return Run(name, path, total, sorted(evals.items()), avg, ltarget, lreached)


def find_log(path: str | Path) -> Path:
    """A log file, or the single .txt log inside a records/<dir>/ folder."""
    p = Path(path)
    if p.is_dir():
        txts = sorted(p.glob("*.txt"))
        if len(txts) != 1:
            listed = f" ({', '.join(t.name for t in txts)}): give one of them as the path" if txts else ""
            raise LogError(f"{p}: expected exactly one .txt log in the folder, found {len(txts)}{listed}")
        return txts[0]
    if not p.is_file():
        raise LogError(f"{p}: no such file or folder")
    return p


def parse_log(path: str | Path) -> Run:
    """Parse a log file or records folder. The run is named by the folder or the file stem."""
    p = Path(path)
    log = find_log(p)
    name = p.resolve().name if p.is_dir() else log.stem
    return parse_text(log.read_text(errors="replace"), name=name, path=str(log))


def best_val(run: Run) -> tuple[float, int] | tuple[None, None]:
    """(lowest val loss, its first step); NaN/inf evaluations are skipped."""
    ok = [(loss, step) for step, loss in run.evals if math.isfinite(loss)]
    return min(ok) if ok else (None, None)


def steps_to_target(run: Run, target: float) -> int | None:
    """First evaluated step whose val loss is <= target, or None."""
    for step, loss in run.evals:
        if math.isfinite(loss) and loss <= target + 1e-12:
            return step
    return None


def target_from_reference(run: Run, frac: float = 0.8) -> tuple[float, int, str]:
    """(target loss, step used, note): the run's val loss at frac*T (paper rule)."""
    at = frac * run.total_steps
    want = round(at)
    if run.last_step < at - 1e-9:
        raise LogError(f"reference {run.name} stops at step {run.last_step}, before "
                       f"{frac:.0%} of {run.total_steps} steps: pass --target")
    losses = dict(run.evals)
    if want in losses and math.isfinite(losses[want]):
        return losses[want], want, (f"val loss of {run.name} at step {want} "
                                    f"({frac:.0%} of {run.total_steps})")
    before = [(s, x) for s, x in run.evals if s <= at + 1e-9 and math.isfinite(x)]
    if not before:
        raise LogError(f"reference {run.name} has no evaluation at or before step {at:g}")
    step, loss = before[-1]
    return loss, step, (f"val loss of {run.name} at step {step}: no evaluation at step {want} "
                        f"({frac:.0%} of {run.total_steps}), used the last one before it")


def compare(runs: list[Run], ref: Reference, target: float) -> list[dict]:
    """One result dict per run (the numbers of the printed table)."""
    rows = []
    for r in runs:
        best, best_step = best_val(r)
        steps = steps_to_target(r, target)
        saving = (100.0 * (ref.steps - steps) / ref.steps
                  if steps is not None and ref.steps else None)
        ratio = (r.step_avg_ms / ref.ms_per_step
                 if r.step_avg_ms is not None and ref.ms_per_step else None)
        rows.append(dict(name=r.name, path=r.path, last_step=r.last_step, total_steps=r.total_steps,
                         num_evals=len(r.evals), best_val_loss=best, best_step=best_step,
                         target=target, steps_to_target=steps, step_saving_pct=saving,
                         ms_per_step=r.step_avg_ms, ms_ratio=ratio,
                         logged_target=r.logged_target, logged_reached_at_step=r.logged_reached))
    return rows


def load_records(path: str | Path = RECORDS_JSON) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LogError(f"cannot read records file {path}: {e}") from None


def resolve_reference(spec: str, records_path: str | Path = RECORDS_JSON) -> Reference | Run:
    """A log path / records folder (-> Run) or a records.json entry NAME[:OPTIMIZER] (-> Reference)."""
    if Path(spec).exists():
        return parse_log(spec)
    records_path = Path(records_path)
    if (records_path.parent / spec).is_dir():
        return parse_log(records_path.parent / spec)
    records = load_records(records_path)
    name, _, opt = spec.partition(":")
    opt = opt or "muon"
    entry = records.get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get(opt), dict):
        known = ", ".join(k for k, v in records.items() if isinstance(v, dict))
        raise LogError(f"unknown reference {spec!r}: not a file, folder or records.json entry "
                       f"({known})")
    res = entry[opt]
    return Reference(f"{name}:{opt}", res.get("steps_to_target"), res.get("ms_per_step"),
                     target=entry.get("target_loss"))


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def format_table(rows: list[dict], ref: Reference, target_note: str) -> str:
    head = ["run", "evals", "last/T", "best_val", "@step", "target", "reached", "saving",
            "ms/step", "ms_ratio"]
    body = [[r["name"], str(r["num_evals"]), f"{r['last_step']}/{r['total_steps']}",
             _fmt(r["best_val_loss"], ".4f"), _fmt(r["best_step"], "d"), f"{r['target']:.4f}",
             _fmt(r["steps_to_target"], "d", "not reached"), _fmt(r["step_saving_pct"], ".1f") +
             ("%" if r["step_saving_pct"] is not None else ""),
             _fmt(r["ms_per_step"], ".2f"), _fmt(r["ms_ratio"], ".3f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt_row = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [f"reference: {ref.name}  steps_to_target: {_fmt(ref.steps, 'd', 'not reached')}  "
           f"ms/step: {_fmt(ref.ms_per_step, '.2f')}",
           f"target:    {rows[0]['target']:.4f} ({target_note})"]
    out += [f"note:      {n}" for n in ref.notes]
    out += ["", fmt_row(head)] + [fmt_row(b) for b in body]
    return "\n".join(out)


def plot_runs(runs: list[Run], rows: list[dict], target: float, out: str | Path,
              ref: Reference | None = None) -> None:
    """Val curves, the target line and each run's crossing point, written atomically to out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run, row in zip(runs, rows):
        xs, ys = zip(*[(s, x) for s, x in run.evals if math.isfinite(x)] or [(0, float("nan"))])
        (line,) = ax.plot(xs, ys, marker=".", ms=3, lw=1.2, label=run.name)
        if row["steps_to_target"] is not None:
            s = row["steps_to_target"]
            ax.plot([s], [dict(run.evals)[s]], "o", ms=8, mfc="none", color=line.get_color())
            ax.annotate(str(s), (s, dict(run.evals)[s]), textcoords="offset points",
                        xytext=(4, 6), fontsize=8, color=line.get_color())
    ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.4f}")
    if ref is not None and ref.run is None and ref.steps:
        ax.axvline(ref.steps, color="gray", ls=":", lw=1, label=f"{ref.name} {ref.steps} steps")
    finite = [x for r in runs for _, x in r.evals if math.isfinite(x)] + [target]
    lo = min(finite)
    ax.set_ylim(lo - 0.05 * max(target - lo, 0.1), min(max(finite), target + 1.0) + 0.02)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    fd, tmp = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; give it a normal file's mode
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", metavar="LOG",
                    help="training log file, or a records/<date>_<name>/ folder holding one .txt log")
    ap.add_argument("--target", type=float, metavar="LOSS",
                    help="target val loss (default: the reference's val loss at 80%% of its "
                         "steps, or a records.json entry's published target)")
    ap.add_argument("--reference", metavar="REF",
                    help="log file, records folder, or records.json entry NAME[:OPTIMIZER] "
                         "(default: the first LOG; OPTIMIZER defaults to muon)")
    ap.add_argument("--frac", type=float, default=0.8,
                    help="fraction of the reference's steps that defines the target (default 0.8)")
    ap.add_argument("--records", default=str(RECORDS_JSON),
                    help="records.json to look reference names up in (default: next to this script)")
    ap.add_argument("--plot", metavar="OUT.png", help="write val curves with the target line here")
    ap.add_argument("--json", action="store_true", help="print results as JSON instead of the table")
    args = ap.parse_args(argv)
    if not 0 < args.frac <= 1:
        ap.error(f"--frac must lie in (0, 1], got {args.frac}")
    try:
        if args.plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise LogError("--plot needs matplotlib (pip install matplotlib)") from None
            if not Path(args.plot).resolve().parent.is_dir():
                raise LogError(f"--plot {args.plot}: folder {Path(args.plot).parent} does not exist")
        runs = [parse_log(p) for p in args.logs]
        target = args.target
        ref_obj = resolve_reference(args.reference, args.records) if args.reference else runs[0]
        if isinstance(ref_obj, Run):
            ref = Reference(ref_obj.name, None, ref_obj.step_avg_ms, run=ref_obj)
            if target is None:
                target, _, note = target_from_reference(ref_obj, args.frac)
            else:
                note = "given"
            ref.steps = steps_to_target(ref_obj, target)
        else:
            ref = ref_obj
            if target is None:
                if ref.target is None:
                    raise LogError(f"{ref.name.split(':')[0]} publishes steps ({ref.steps}) "
                                   f"but no target loss: pass --target LOSS")
                target, note = ref.target, f"published target of {ref.name}"
            else:
                note = "given"
                if ref.target is not None and abs(ref.target - target) > 1e-12:
                    ref.notes.append(f"{ref.name} steps are for its own target {ref.target}")
            if ref.steps is None:
                raise LogError(f"{ref.name} has no steps_to_target")
        rows = compare(runs, ref, target)
        if args.json:
            print(json.dumps(dict(target=target, target_note=note,
                                  reference=dict(name=ref.name, steps_to_target=ref.steps,
                                                 ms_per_step=ref.ms_per_step,
                                                 path=ref.run.path if ref.run else None,
                                                 notes=ref.notes),
                                  runs=rows), indent=2))
        else:
            print(format_table(rows, ref, note))
        if args.plot:
            plot_runs(runs, rows, target, args.plot, ref)
    except (LogError, OSError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
