#!/usr/bin/env python3
"""Compare training logs by steps-to-target, the DynMuon paper's metric (docs/algorithm.md section 4).

    python records/compare.py LOG [LOG ...] [--reference REF] [--target LOSS] [--json | --markdown]
    python records/compare.py LOG [LOG ...] --group [--ref_variant NAME] [--vs NAME] [--target LOSS]

A LOG is a training log (ours or modded-nanoGPT's) or a records/<YYYY-MM-DD>_<name>/ folder
holding exactly one .txt log. Only lines of the form

    step:{s}/{T} val_loss:{x} [train_time:{ms}ms step_avg:{ms}ms]

are read as evaluations; `step:` must start a whitespace-separated word and the fields must be
real numbers, so a copy of the training script at the top of a log (f-strings, string literals,
comments) is never mistaken for data. Train lines (`step:s/T train_loss:...`) only supply
step_avg. An optional `target:{X} reached_at_step:{N}` / `target:{X} not_reached` line is kept
for information. A last line without its newline (log cut mid-write) is used only if its
val_loss number is complete (followed by a space).

Configuration: the JSON object {"config": {...}, ...} that our trainer writes between two lines of
'=' after the code copy, or else the first event of <stem>.jsonl next to the log. Logs without
either (older ones, modded-nanoGPT's) have no known optimizer.

Reference (per-run table): --reference (a log, a records folder, or a records.json entry NAME or
NAME:OPTIMIZER, optimizer default muon), else the Muon run among the LOGs (config optimizer ==
"muon"). With several Muon runs: those whose T is the most common T among all LOGs (ties: the
larger T), and of those the one with the lowest best val loss (ties: run name). With none: the
first LOG by run name, and a warning. LOGs are sorted by run name, so the order of the command
line never changes the result.

Target (paper rule): the reference run's val loss at 80% of its total steps T, i.e. the
evaluation at step round(0.8*T), or the last evaluation before 0.8*T if there is none exactly
there. Steps-to-target = first evaluated step with val_loss <= target. Step saving =
(ref_steps - steps) / ref_steps, only for runs with the reference's T (a shorter run ends its
schedule early, so its steps are not comparable) unless --target is given explicitly.

Groups (--group): runs are grouped into variants by run name with `seed<N>` / `dseed<N>` tokens
removed. Per variant: n, mean +- sample std of final and best val loss, steps-to-target
(mean +- std over the runs that reached it), and two-sided Welch t-test p-values against the
reference variant (--ref_variant, default the Muon variant with the lowest mean final val) and
against each --vs variant. Group target: the mean over the reference variant's runs of each run's
val loss at 80% of its T. A p-value is n/a (with the reason) when a side has fewer than 2 runs,
both sides have zero spread, a value is not finite, or (steps) not every run reached the target
or T differs from the reference variant's.

Exit status: 0 ok, 2 bad input (missing file, no evaluations, unknown reference or variant, no
target). The parse/compute functions are pure and importable (parse_text, parse_log, best_val,
steps_to_target, target_from_reference, compare, group_runs, welch_test).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RECORDS_JSON = Path(__file__).resolve().parent / "records.json"
NUM = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"
VAL_RE = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s+val_loss:(\d+\.\d+|\d+|nan|inf)(?=\s|$)")
VAL_RE_PARTIAL = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s+val_loss:(\d+\.\d+|\d+|nan|inf)(?=\s)")
STEP_RE = re.compile(r"(?<!\S)step:(\d+)/(\d+)\s")
AVG_RE = re.compile(r"(?<!\S)step_avg:(\d+\.?\d*)ms")
TARGET_RE = re.compile(rf"(?<!\S)target:({NUM})\s+(?:reached_at_step:(\d+)|not_reached)(?=\s|$)")
RULE_RE = re.compile(r"^={20,}\s*$")
SEED_RE = re.compile(r"(?:^|[_-])d?seed\d+(?=[_-]|$)", re.IGNORECASE)
NOT_REACHED = "target not reached"
REF_NOT_REACHED = "the reference did not reach the target"


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
    config: dict | None = None            # the trainer's configuration, if the log has one

    @property
    def last_step(self) -> int:
        return self.evals[-1][0]

    @property
    def optimizer(self) -> str | None:
        return (self.config or {}).get("optimizer")

    @property
    def variant(self) -> str:
        """The run name without seed tokens: runs that differ only by seed share it."""
        return SEED_RE.sub("", self.name).strip("_-") or "(seed only)"


@dataclass
class Reference:
    name: str
    steps: int | None                     # steps to target
    ms_per_step: float | None
    run: Run | None = None                # None for a records.json entry
    target: float | None = None           # published target (records.json entries)
    notes: list[str] = field(default_factory=list)
    total_steps: int | None = None        # T; a records.json entry's num_iterations
    chosen_by: str = ""                   # why this is the reference

    @property
    def total(self) -> int | None:
        return self.total_steps if self.total_steps is not None else (
            self.run.total_steps if self.run else None)


def config_block(lines: list[str]) -> dict | None:
    """The "config" of the first JSON object that sits between two rule lines of '='."""
    for i, line in enumerate(lines[:-1]):
        if not (RULE_RE.match(line) and lines[i + 1].strip() == "{"):
            continue
        end = next((j for j in range(i + 2, len(lines)) if RULE_RE.match(lines[j])), None)
        if end is None:
            return None  # log cut inside the block
        try:
            block = json.loads("\n".join(lines[i + 1:end]))
        except ValueError:
            continue
        if isinstance(block, dict) and isinstance(block.get("config"), dict):
            return block["config"]
    return None


def config_from_jsonl(log: Path) -> dict | None:
    """The config event that starts <stem>.jsonl next to a .txt log, if there is one."""
    try:
        with open(log.with_suffix(".jsonl")) as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    if isinstance(first, dict) and first.get("event") == "config" and isinstance(first.get("config"), dict):
        return first["config"]
    return None


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
    return Run(name, path, total, sorted(evals.items()), avg, ltarget, lreached, config_block(lines))


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
    run = parse_text(log.read_text(errors="replace"), name=name, path=str(log))
    if run.config is None:
        run.config = config_from_jsonl(log)
    return run


def load_runs(paths: list[str]) -> list[Run]:
    """The LOGs, each file once, sorted by (name, path) so the command line's order never matters."""
    runs = {}
    for p in paths:
        run = parse_log(p)
        runs.setdefault(str(Path(run.path).resolve()), run)
    return sorted(runs.values(), key=lambda r: (r.name, str(Path(r.path).resolve())))


def best_val(run: Run) -> tuple[float, int] | tuple[None, None]:
    """(lowest val loss, its first step); NaN/inf evaluations are skipped."""
    ok = [(loss, step) for step, loss in run.evals if math.isfinite(loss)]
    return min(ok) if ok else (None, None)


def final_val(run: Run) -> float:
    """Val loss of the last evaluation (NaN if the run diverged there)."""
    return run.evals[-1][1]


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


def step_saving(run: Run, steps: int | None, ref: Reference,
                target_given: bool) -> tuple[float | None, str | None]:
    """(saving in %, None) or (None, why there is none). The default target is a point of the
    reference's own schedule, so a run of another length T only gets a saving at a target the
    user chose."""
    if not target_given and ref.total is not None and run.total_steps != ref.total:
        return None, f"T={run.total_steps} vs reference T={ref.total}"
    if steps is None:
        return None, NOT_REACHED
    if not ref.steps:
        return None, REF_NOT_REACHED
    return 100.0 * (ref.steps - steps) / ref.steps, None


def compare(runs: list[Run], ref: Reference, target: float, target_given: bool = False) -> list[dict]:
    """One result dict per run (the numbers of the printed table)."""
    rows = []
    for r in runs:
        best, best_step = best_val(r)
        steps = steps_to_target(r, target)
        saving, why = step_saving(r, steps, ref, target_given)
        ratio = (r.step_avg_ms / ref.ms_per_step
                 if r.step_avg_ms is not None and ref.ms_per_step else None)
        rows.append(dict(name=r.name, path=r.path, optimizer=r.optimizer, last_step=r.last_step,
                         total_steps=r.total_steps, num_evals=len(r.evals), final_val_loss=final_val(r),
                         best_val_loss=best, best_step=best_step, target=target,
                         steps_to_target=steps, step_saving_pct=saving, step_saving_reason=why,
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
                     target=entry.get("target_loss"), total_steps=entry.get("num_iterations"))


def _sort_best(run: Run) -> float:
    best = best_val(run)[0]
    return best if best is not None else math.inf


def choose_reference(runs: list[Run]) -> tuple[Run, str, str | None]:
    """(reference run, how it was chosen, warning or None); runs come sorted by name."""
    muons = [r for r in runs if r.optimizer == "muon"]
    if not muons:
        return runs[0], "first LOG by run name (no Muon run among the logs)", (
            f"no Muon run among the logs (config optimizer 'muon'): using {runs[0].name} as reference")
    if len(muons) == 1:
        return muons[0], "the Muon run among the logs", None
    counts = Counter(r.total_steps for r in runs)
    common = max(counts, key=lambda t: (counts[t], t))
    # a Muon run as long as most of the others keeps most step savings comparable
    pool = [r for r in muons if r.total_steps == common]
    how = f"with T={common}, the most common T" if pool else f"(none has the most common T={common})"
    pick = min(pool or muons, key=lambda r: (_sort_best(r), r.name, str(Path(r.path).resolve())))
    return pick, f"lowest best val of the {len(pool or muons)} Muon runs {how}", None


def _reference_of(obj: Reference | Run, chosen: str) -> Reference:
    if isinstance(obj, Run):
        return Reference(obj.name, None, obj.step_avg_ms, run=obj, total_steps=obj.total_steps,
                         chosen_by=chosen)
    obj.chosen_by = chosen
    return obj


def reference_for_table(args, runs: list[Run]) -> tuple[Reference, float, str, list[str]]:
    """(reference, target, target note, warnings) for the per-run table."""
    warnings = []
    if args.reference:
        obj, chosen = resolve_reference(args.reference, args.records), "--reference"
    else:
        obj, chosen, warning = choose_reference(runs)
        warnings += [warning] if warning else []
    target, note = args.target, "given"
    ref = _reference_of(obj, chosen)
    other_T = sorted({r.total_steps for r in runs} - {ref.total})
    if args.target is not None and ref.total is not None and other_T:
        ref.notes.append(f"runs with T={'/'.join(map(str, other_T))} (reference T={ref.total}) get a "
                         f"step saving only because --target was given")
    if ref.run is not None:
        if target is None:
            target, _, note = target_from_reference(ref.run, args.frac)
        ref.steps = steps_to_target(ref.run, target)
        return ref, target, note, warnings
    if target is None:
        if ref.target is None:
            raise LogError(f"{ref.name.split(':')[0]} publishes steps ({ref.steps}) "
                           f"but no target loss: pass --target LOSS")
        target, note = ref.target, f"published target of {ref.name}"
    elif ref.target is not None and abs(ref.target - target) > 1e-12:
        ref.notes.append(f"{ref.name} steps are for its own target {ref.target}")
    if ref.steps is None:
        raise LogError(f"{ref.name} has no steps_to_target")
    return ref, target, note, warnings


def _fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def render(head: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    """A table as markdown, or as text columns (first column left-aligned, the rest right)."""
    if markdown:
        cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        return [cells(head), "|" + "---|" * len(head)] + [cells(row) for row in body]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return [line(head)] + [line(row) for row in body]


def render_header(items: list[tuple[str, str]], markdown: bool) -> list[str]:
    """`label: text` lines above a table; a bullet list in markdown so the lines stay apart."""
    if markdown:
        return [f"- {label}: {text}" for label, text in items]
    return [f"{label + ':':<11}{text}" for label, text in items]


def saving_cell(row: dict) -> str:
    if row["step_saving_pct"] is not None:
        return f"{row['step_saving_pct']:.1f}%"
    why = row["step_saving_reason"]
    return "n/a" if why in (NOT_REACHED, REF_NOT_REACHED) else f"n/a ({why})"


def format_table(rows: list[dict], ref: Reference, target_note: str, markdown: bool = False) -> str:
    head = ["run", "evals", "last/T", "best_val", "@step", "target", "reached", "saving",
            "ms/step", "ms_ratio"]
    body = [[r["name"], str(r["num_evals"]), f"{r['last_step']}/{r['total_steps']}",
             _fmt(r["best_val_loss"], ".4f"), _fmt(r["best_step"], "d"), f"{r['target']:.4f}",
             _fmt(r["steps_to_target"], "d", "not reached"), saving_cell(r),
             _fmt(r["ms_per_step"], ".2f"), _fmt(r["ms_ratio"], ".3f")] for r in rows]
    items = [("reference", f"{ref.name}  T: {_fmt(ref.total, 'd')}  steps_to_target: "
                           f"{_fmt(ref.steps, 'd', 'not reached')}  ms/step: {_fmt(ref.ms_per_step, '.2f')}")]
    items += [("chosen", ref.chosen_by)] if ref.chosen_by else []
    items += [("target", f"{rows[0]['target']:.4f} ({target_note})")]
    items += [("note", n) for n in ref.notes]
    return "\n".join(render_header(items, markdown) + [""] + render(head, body, markdown))


def table_order(runs: list[Run], ref: Reference) -> list[Run]:
    """The reference's own log first, then the others by name."""
    ref_path = str(Path(ref.run.path).resolve()) if ref.run else None
    return sorted(runs, key=lambda r: str(Path(r.path).resolve()) != ref_path)


# ---- statistics over seeds ------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1); std is None below two values."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    f, c, d = tiny, tiny, 0.0          # value of 0 + 1/(1 + d1/(1 + d2/(1 + ...)))
    for k in range(0, 20000):
        if k == 0:
            num = 1.0
        elif k % 2:                    # d_{2m+1}
            m = (k - 1) // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:                          # d_{2m}
            m = k // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta fraction did not converge (a={a}, b={b}, x={x})")


def reg_inc_beta(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b); y = 1 - x may be passed when it is known more exactly
    than 1 - x rounds to. The fraction converges fast only for x < (a+1)/(a+b+2), so beyond that
    I_x(a, b) = 1 - I_y(b, a) is used."""
    y = 1.0 - x if y is None else y
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(y))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, y) / b


def t_two_sided_p(t: float, df: float) -> float:
    """2*(1 - F_t(|t|; df)), written as I_{df/(df+t^2)}(df/2, 1/2) to keep tiny p-values exact."""
    t2 = t * t
    return reg_inc_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))


def welch_test(a: list[float], b: list[float]) -> dict:
    """Two-sided Welch t-test of mean(a) == mean(b): {t, df, p, reason}; p is None, with the
    reason, where the test is undefined (a side below 2 values, a non-finite value, or no spread
    on either side, where t would be 0/0 or infinite)."""
    undefined = lambda why: dict(t=None, df=None, p=None, reason=why)
    if len(a) < 2 or len(b) < 2:
        return undefined(f"n={len(a)} vs n={len(b)}: needs 2 runs or more on each side")
    if not all(math.isfinite(x) for x in (*a, *b)):
        return undefined("a value is not finite (diverged run)")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    if va + vb == 0.0:
        return undefined("zero spread on both sides: the t statistic is undefined")
    t = (ma - mb) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))  # Welch-Satterthwaite
    return dict(t=t, df=df, p=t_two_sided_p(t, df), reason=None)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """{variant: its runs}, variants and runs sorted by name."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.variant, []).append(r)
    return dict(sorted(groups.items()))


def choose_ref_variant(groups: dict[str, list[Run]], wanted: str | None) -> tuple[str, str, str | None]:
    """(reference variant, how it was chosen, warning or None)."""
    if wanted is not None:
        if wanted not in groups:
            raise LogError(f"unknown variant {wanted!r} (variants: {', '.join(groups)})")
        return wanted, "--ref_variant", None
    muon = [v for v, rs in groups.items() if all(r.optimizer == "muon" for r in rs)]
    if not muon:
        first = next(iter(groups))
        return first, "first variant by name (no Muon variant)", (
            f"no Muon variant among the logs (config optimizer 'muon'): using {first} as reference")
    if len(muon) == 1:
        return muon[0], "the Muon variant among the logs", None
    final_mean = lambda v: mean_std([final_val(r) for r in groups[v]])[0]
    rank = lambda v: (final_mean(v) if math.isfinite(final_mean(v)) else math.inf, v)
    return min(muon, key=rank), f"lowest mean final val of the {len(muon)} Muon variants", None


def group_target(ref_runs: list[Run], variant: str, frac: float) -> tuple[float, str]:
    """Mean over the reference variant's runs of each run's val loss at frac*T (paper rule per run)."""
    points = [target_from_reference(r, frac) for r in ref_runs]
    target = math.fsum(p[0] for p in points) / len(points)
    each = ", ".join(f"{loss:.4f} @{step}/{r.total_steps}" for r, (loss, step, _) in zip(ref_runs, points))
    return target, f"mean over the {len(points)} runs of {variant} of the val loss at {frac:.0%} of T: {each}"


def variant_stats(name: str, runs: list[Run], target: float) -> dict:
    """The numbers of one row of the group table."""
    finals = [final_val(r) for r in runs]
    bests = [b if b is not None else math.nan for b in (best_val(r)[0] for r in runs)]
    steps = [steps_to_target(r, target) for r in runs]
    reached = [s for s in steps if s is not None]
    stat = lambda xs: dict(zip(("mean", "std"), mean_std(xs)), values=xs)
    return dict(variant=name, runs=[r.name for r in runs], n=len(runs),
                optimizer=sorted({str(r.optimizer) for r in runs}),
                total_steps=sorted({r.total_steps for r in runs}),
                final_val=stat(finals), best_val=stat(bests),
                steps_to_target=dict(stat(reached), reached=len(reached), per_run=steps))


def steps_test(v: dict, ref: dict, target_given: bool) -> dict:
    """Welch test of steps-to-target, only where every run reached the target and (at the default
    target) both variants have the same T."""
    if not target_given and v["total_steps"] != ref["total_steps"]:
        show = lambda ts: "/".join(map(str, ts))
        why = f"T={show(v['total_steps'])} vs T={show(ref['total_steps'])}: runs of different length"
        return dict(t=None, df=None, p=None, reason=why)
    for side in (v, ref):
        s = side["steps_to_target"]
        if s["reached"] < side["n"]:
            return dict(t=None, df=None, p=None, reason="not every run reached the target")
    return welch_test(v["steps_to_target"]["values"], ref["steps_to_target"]["values"])


def variant_tests(v: dict, against: dict, target_given: bool) -> dict:
    """p-values of one variant against another, for final val, best val and steps-to-target."""
    if v["variant"] == against["variant"]:
        same = dict(t=None, df=None, p=None, reason="same variant")
        return dict(final_val=same, best_val=same, steps_to_target=same)
    return dict(final_val=welch_test(v["final_val"]["values"], against["final_val"]["values"]),
                best_val=welch_test(v["best_val"]["values"], against["best_val"]["values"]),
                steps_to_target=steps_test(v, against, target_given))


def group_report(args, runs: list[Run]) -> dict:
    """Everything the group table shows (and --json prints)."""
    groups = group_runs(runs)
    ref_name, chosen, warning = choose_ref_variant(groups, args.ref_variant)
    for vs in args.vs:
        if vs not in groups:
            raise LogError(f"--vs {vs}: unknown variant (variants: {', '.join(groups)})")
        if vs == ref_name:
            raise LogError(f"--vs {vs} is the reference variant already")
    if args.target is not None:
        target, note = args.target, "given"
    else:
        target, note = group_target(groups[ref_name], ref_name, args.frac)
    stats = {name: variant_stats(name, rs, target) for name, rs in groups.items()}
    compared_to = [ref_name, *args.vs]
    for s in stats.values():
        s["p"] = {other: variant_tests(s, stats[other], args.target is not None) for other in compared_to}
    order = [ref_name] + [v for v in stats if v != ref_name]
    unfinished = [f"{r.name} stopped at step {r.last_step} of {r.total_steps}: its final val is that "
                  f"step's" for r in runs if r.last_step < r.total_steps]
    return dict(reference_variant=ref_name, chosen_by=chosen, warnings=[warning] if warning else [],
                target=target, target_note=note, target_given=args.target is not None,
                vs=list(args.vs), notes=unfinished, variants=[stats[v] for v in order])


def _mean_pm(stat: dict, spec: str) -> str:
    if stat["mean"] is None:
        return "-"
    return format(stat["mean"], spec) + ("" if stat["std"] is None else f" ± {format(stat['std'], spec)}")


def _p_cell(test: dict, footnotes: dict[str, int]) -> str:
    if test["reason"] == "same variant":
        return "-"
    if test["p"] is None:
        number = footnotes.setdefault(test["reason"], len(footnotes) + 1)
        return f"n/a ({number})"
    return f"{test['p']:.4f}" if test["p"] >= 1e-4 else f"{test['p']:.2e}"


def format_group_table(report: dict, markdown: bool = False) -> str:
    ref = report["reference_variant"]
    head = ["variant", "T", "n", "final val", "best val", "steps to target", "reached",
            "p final", "p best", "p steps"]
    for vs in report["vs"]:
        head += [f"p final vs {vs}", f"p best vs {vs}", f"p steps vs {vs}"]
    footnotes: dict[str, int] = {}
    body = []
    for v in report["variants"]:
        row = [v["variant"], "/".join(map(str, v["total_steps"])), str(v["n"]),
               _mean_pm(v["final_val"], ".4f"), _mean_pm(v["best_val"], ".4f"),
               _mean_pm(v["steps_to_target"], ".1f"), f"{v['steps_to_target']['reached']}/{v['n']}"]
        for other in [ref, *report["vs"]]:
            tests = v["p"][other]
            row += [_p_cell(tests[k], footnotes) for k in ("final_val", "best_val", "steps_to_target")]
        body.append(row)
    items = [("reference", f"{ref} ({report['chosen_by']})"),
             ("target", f"{report['target']:.4f} ({report['target_note']})"),
             ("p", f"two-sided Welch t-test against {ref}" +
              "".join(f"; 'vs {vs}' columns against {vs}" for vs in report["vs"])),
             ("columns", "mean ± sample std over the runs; steps to target over the runs that reached it")]
    items += [("note", n) for n in report["notes"]]
    marker = "- " if markdown else ""
    notes = [f"{marker}({n}) n/a: {why}" for why, n in footnotes.items()]
    return "\n".join(render_header(items, markdown) + [""] + render(head, body, markdown)
                     + ([""] + notes if notes else []))


# ---- plot and command line -------------------------------------------------------------------------

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", metavar="LOG",
                    help="training log file, or a records/<date>_<name>/ folder holding one .txt log")
    ap.add_argument("--target", type=float, metavar="LOSS",
                    help="target val loss (default: the reference's val loss at 80%% of its steps, "
                         "a records.json entry's published target, or with --group the mean of that "
                         "over the reference variant's runs); also gives a step saving to runs "
                         "whose T differs from the reference's")
    ap.add_argument("--reference", metavar="REF",
                    help="log file, records folder, or records.json entry NAME[:OPTIMIZER] "
                         "(OPTIMIZER defaults to muon; default: the Muon run among the LOGs, "
                         "else the first LOG by name)")
    ap.add_argument("--frac", type=float, default=0.8,
                    help="fraction of the reference's steps that defines the target (default 0.8)")
    ap.add_argument("--records", default=str(RECORDS_JSON),
                    help="records.json to look reference names up in (default: next to this script)")
    ap.add_argument("--group", action="store_true",
                    help="one row per variant (run name without seed tokens): n, mean ± std of final "
                         "and best val and of steps-to-target, Welch p-values against the reference variant")
    ap.add_argument("--ref_variant", metavar="NAME",
                    help="with --group: the variant the p-values compare against "
                         "(default: the Muon variant with the lowest mean final val)")
    ap.add_argument("--vs", action="append", default=[], metavar="NAME",
                    help="with --group: also print p-values against this variant (repeatable)")
    ap.add_argument("--plot", metavar="OUT.png", help="write val curves with the target line here")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print results as JSON instead of the table")
    out.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args(argv)
    if not 0 < args.frac <= 1:
        ap.error(f"--frac must lie in (0, 1], got {args.frac}")
    if not args.group and (args.ref_variant or args.vs):
        ap.error("--ref_variant and --vs need --group")
    if args.group and args.reference:
        ap.error("--reference picks a run for the per-run table; with --group use --ref_variant")
    args.vs = list(dict.fromkeys(args.vs))
    return args


def check_plot_path(plot: str) -> None:
    """Fail before any output if the plot cannot be written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LogError("--plot needs matplotlib (pip install matplotlib)") from None
    if not Path(plot).resolve().parent.is_dir():
        raise LogError(f"--plot {plot}: folder {Path(plot).parent} does not exist")


def to_json(data) -> str:
    """JSON text; NaN/inf (a diverged run) become null, which every JSON reader accepts."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(data), indent=2, allow_nan=False)


def run_per_run(args, runs: list[Run]) -> None:
    ref, target, note, warnings = reference_for_table(args, runs)
    for w in warnings:
        print(f"compare.py: warning: {w}", file=sys.stderr)
    runs = table_order(runs, ref)
    rows = compare(runs, ref, target, target_given=args.target is not None)
    if args.json:
        reference = dict(name=ref.name, steps_to_target=ref.steps, ms_per_step=ref.ms_per_step,
                         total_steps=ref.total, path=ref.run.path if ref.run else None,
                         chosen_by=ref.chosen_by, notes=ref.notes)
        print(to_json(dict(target=target, target_note=note, target_given=args.target is not None,
                           reference=reference, warnings=warnings, runs=rows)))
    else:
        print(format_table(rows, ref, note, args.markdown))
    if args.plot:
        plot_runs(runs, rows, target, args.plot, ref)


def run_grouped(args, runs: list[Run]) -> None:
    report = group_report(args, runs)
    for w in report["warnings"]:
        print(f"compare.py: warning: {w}", file=sys.stderr)
    print(to_json(dict(groups=report)) if args.json else format_group_table(report, args.markdown))
    if args.plot:
        rows = [dict(steps_to_target=steps_to_target(r, report["target"])) for r in runs]
        plot_runs(runs, rows, report["target"], args.plot)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.plot:
            check_plot_path(args.plot)
        runs = load_runs(args.logs)
        (run_grouped if args.group else run_per_run)(args, runs)
    except (LogError, OSError) as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
