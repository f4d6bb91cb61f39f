"""Tests for records/compare.py (steps-to-target comparison of training logs)."""
import importlib.util
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "records" / "compare.py"
_spec = importlib.util.spec_from_file_location("compare", SCRIPT)
compare = importlib.util.module_from_spec(_spec)
sys.modules["compare"] = compare
_spec.loader.exec_module(compare)

CODE = '''import os
# the log starts with a copy of the training script
EXAMPLE = "step:100/1000 val_loss:1.2345 train_time:5ms step_avg:1.00ms"
print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{t:.0f}ms step_avg:{a:.2f}ms")
print0(f"step:{step+1}/{train_steps} train_loss:{loss:.4f} train_time:{t:.0f}ms step_avg:{a:.2f}ms")
print0(f"target:{args.target} reached_at_step:{step}")
RUN_CONFIG = {"config": {"optimizer": "muon"}}
'''
RULE = "=" * 100


def config_lines(optimizer, T, name):
    """The block our trainer writes after the code copy: configuration, environment, parameters."""
    block = dict(config=dict(optimizer=optimizer, lr=0.02, seed=0, num_iterations=T, run_name=name),
                 env=dict(python="3.12"), parameters=123)
    return [RULE, *json.dumps(block, indent=1).splitlines(), RULE]


def make_log(path, T, evals, ms=100.0, code=False, train_every=0, extra="", newline=True, opt=None):
    """Write a log: `evals` maps step -> val loss; train lines every `train_every` steps;
    `opt` adds the trainer's configuration block with that optimizer."""
    path = Path(path)
    lines = [*CODE.splitlines()] if code or opt else []
    if opt:
        lines += config_lines(opt, T, path.stem)
    elif code:
        lines.append(RULE)
    for s in range(0, max(evals) + 1):
        if train_every and s and s % train_every == 0:
            lines.append(f"step:{s}/{T} train_loss:{9.9:.4f} train_time:{s * ms:.0f}ms "
                         f"step_avg:{ms:.2f}ms")
        if s in evals:
            avg = "nan" if s == 0 else f"{ms:.2f}"
            lines.append(f"step:{s}/{T} val_loss:{evals[s]:.4f} train_time:{s * ms:.0f}ms "
                         f"step_avg:{avg}ms")
    text = "\n".join(lines) + ("\n" if lines else "") + extra
    if not newline:
        text = text.rstrip("\n")
    path.write_text(text)
    return path


def run_cli(*args):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                       capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


def run_main(capsys, *args):
    """compare.main in this process (fast, for many calls): (exit status, stdout, stderr)."""
    rc = compare.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def table(out):
    """Parse the printed table into {run name: {column: cell}}, plus the header lines."""
    lines = out.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith(("run ", "variant ")))
    head = re.split(r"\s{2,}", lines[i].strip())
    rows = {}
    for l in lines[i + 1:]:
        if not l.strip():
            break
        cells = re.split(r"\s{2,}", l.strip())
        assert len(cells) == len(head), l
        rows[cells[0]] = dict(zip(head, cells))
    return rows, lines[:i]


def header(lines):
    """{label: text} of the `label: text` lines above a table."""
    return {l.split(":", 1)[0]: l.split(":", 1)[1].strip() for l in lines if ":" in l}


def curve(T, every, scale=1.0, floor=3.0):
    """A decreasing synthetic val-loss curve, rounded to 4 decimals as in a log."""
    return {s: round(floor + 8.0 / (1 + scale * s / 50), 4) for s in range(0, T + 1, every)}


@pytest.fixture
def logs(tmp_path):
    muon = make_log(tmp_path / "muon.txt", 1000, curve(1000, 100), ms=200.0, train_every=25, opt="muon")
    dyn = make_log(tmp_path / "dyn.txt", 1000, curve(1000, 100, scale=1.5), ms=210.0,
                   code=True, train_every=25, opt="dynmuon",
                   extra="target:3.4444 reached_at_step:600\n")
    return tmp_path, muon, dyn


# ---- per-run table ----------------------------------------------------------------------------------

def test_basic_two_runs_all_numbers(logs):
    _, muon, dyn = logs
    ref_curve, dyn_curve = curve(1000, 100), curve(1000, 100, scale=1.5)
    target = ref_curve[800]
    ref_steps = 800
    dyn_steps = min(s for s, x in dyn_curve.items() if x <= target)
    assert dyn_steps < ref_steps
    # "dyn" sorts before "muon": the Muon run is the reference whatever the order
    for argv in ((muon, dyn), (dyn, muon)):
        rc, out, err = run_cli(*argv)
        assert rc == 0 and err == "", err
        rows, head_lines = table(out)
        assert head_lines[0] == "reference: muon  T: 1000  steps_to_target: 800  ms/step: 200.00"
        h = header(head_lines)
        assert h["chosen"] == "the Muon run among the logs"
        assert h["target"] == f"{target:.4f} (val loss of muon at step 800 (80% of 1000))"
        assert list(rows) == ["muon", "dyn"]  # the reference first
        assert rows["muon"] == {"run": "muon", "evals": "11", "last/T": "1000/1000",
                                "best_val": f"{ref_curve[1000]:.4f}", "@step": "1000",
                                "target": f"{target:.4f}", "reached": "800", "saving": "0.0%",
                                "ms/step": "200.00", "ms_ratio": "1.000"}
        assert rows["dyn"] == {"run": "dyn", "evals": "11", "last/T": "1000/1000",
                               "best_val": f"{dyn_curve[1000]:.4f}", "@step": "1000",
                               "target": f"{target:.4f}", "reached": str(dyn_steps),
                               "saving": f"{100 * (ref_steps - dyn_steps) / ref_steps:.1f}%",
                               "ms/step": "210.00", "ms_ratio": f"{210 / 200:.3f}"}


def test_json_matches_and_code_lines_ignored(logs):
    _, muon, dyn = logs
    rc, out, _ = run_cli(dyn, muon, "--json")
    assert rc == 0
    res = json.loads(out)
    target = curve(1000, 100)[800]
    assert res["target"] == pytest.approx(target) and res["target_given"] is False
    assert res["reference"] == {"name": "muon", "steps_to_target": 800, "ms_per_step": 200.0,
                                "total_steps": 1000, "path": str(muon),
                                "chosen_by": "the Muon run among the logs", "notes": []}
    assert res["warnings"] == []
    m, d = res["runs"]
    assert (m["name"], m["optimizer"], d["name"], d["optimizer"]) == ("muon", "muon", "dyn", "dynmuon")
    # the code copy at the top holds a literal with real numbers (1.2345): never a data point
    assert d["num_evals"] == 11 and d["best_val_loss"] == pytest.approx(curve(1000, 100, 1.5)[1000])
    assert d["final_val_loss"] == pytest.approx(curve(1000, 100, 1.5)[1000])
    assert d["steps_to_target"] == 600 and d["step_saving_pct"] == pytest.approx(25.0)
    assert d["step_saving_reason"] is None
    assert d["ms_per_step"] == 210.0 and d["ms_ratio"] == pytest.approx(1.05)
    assert d["logged_target"] == 3.4444 and d["logged_reached_at_step"] == 600
    assert m["logged_target"] is None


def test_markdown_table(logs):
    _, muon, dyn = logs
    rc, out, _ = run_cli(dyn, muon, "--markdown")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "- reference: muon  T: 1000  steps_to_target: 800  ms/step: 200.00"
    i = lines.index("| run | evals | last/T | best_val | @step | target | reached | saving | ms/step | ms_ratio |")
    assert lines[i + 1] == "|---|---|---|---|---|---|---|---|---|---|"
    assert lines[i + 2].startswith("| muon | 11 | 1000/1000 |") and lines[i + 3].startswith("| dyn | 11 |")
    rc, _, err = run_cli(muon, "--markdown", "--json")
    assert rc == 2 and "not allowed with" in err


def experiment(tmp_path):
    """An experiment folder whose alphabetically first logs are not Muon runs."""
    d = tmp_path / "exp"
    d.mkdir()
    return [make_log(d / "adamw.txt", 1000, curve(1000, 100, 0.6), ms=90.0, opt="adamw"),
            make_log(d / "dynmuon.txt", 1000, curve(1000, 100, 1.5), ms=105.0, opt="dynmuon"),
            make_log(d / "muon.txt", 1000, curve(1000, 100), ms=100.0, opt="muon"),
            make_log(d / "normuon.txt", 1000, curve(1000, 100, 1.2), ms=102.0, opt="normuon")]


def test_reference_is_the_muon_run_in_any_order(tmp_path, capsys):
    paths = experiment(tmp_path)
    outputs = set()
    for perm in itertools.permutations(paths):
        rc, out, err = run_main(capsys, *perm)
        assert rc == 0 and err == ""
        outputs.add(out)
    assert len(outputs) == 1  # the command line's order changes nothing
    rows, head_lines = table(outputs.pop())
    assert head_lines[0].startswith("reference: muon  T: 1000  steps_to_target: 800")
    assert list(rows) == ["muon", "adamw", "dynmuon", "normuon"]
    assert rows["muon"]["saving"] == "0.0%" and rows["adamw"]["reached"] == "not reached"
    assert rows["dynmuon"]["saving"] == "25.0%"  # 600 vs 800 steps
    rc, out, _ = run_main(capsys, *paths, "--json")
    assert json.loads(out)["reference"]["name"] == "muon"


def test_no_muon_run_warns_and_takes_first_by_name(tmp_path, capsys):
    paths = [p for p in experiment(tmp_path) if p.stem != "muon"]
    for perm in ([paths[2], paths[0], paths[1]], paths[::-1]):
        rc, out, err = run_main(capsys, *perm)
        assert rc == 0
        assert err == ("compare.py: warning: no Muon run among the logs (config optimizer 'muon'): "
                       "using adamw as reference\n")
        rows, head_lines = table(out)
        assert head_lines[0].startswith("reference: adamw  T: 1000")
        assert header(head_lines)["chosen"] == "first LOG by run name (no Muon run among the logs)"
        assert list(rows) == ["adamw", "dynmuon", "normuon"]
    rc, out, err = run_main(capsys, *paths, "--json")
    res = json.loads(out)  # the warning goes to stderr, so stdout stays JSON
    assert "no Muon run" in err and res["warnings"] == [err.split("warning: ")[1].strip()]
    # --reference makes the choice: no warning
    rc, out, err = run_main(capsys, *paths, "--reference", paths[1])
    assert rc == 0 and err == "" and table(out)[1][0].startswith("reference: dynmuon")


def test_several_muon_runs(tmp_path, capsys):
    d = tmp_path / "exp"
    d.mkdir()
    # a short smoke run with the lowest loss of all; the 1000-step runs are the majority
    make_log(d / "muon_smoke.txt", 30, {0: 9.0, 10: 3.0, 20: 2.9, 30: 2.8}, opt="muon")
    make_log(d / "muon_a.txt", 1000, curve(1000, 100, 1.0, floor=3.1), opt="muon")
    make_log(d / "muon_b.txt", 1000, curve(1000, 100, 1.0, floor=3.05), opt="muon")
    make_log(d / "muon_c.txt", 1000, curve(1000, 100, 1.0, floor=3.05), opt="muon")  # tie: by name
    make_log(d / "dyn.txt", 1000, curve(1000, 100, 1.5), opt="dynmuon")
    make_log(d / "dyn2.txt", 1000, curve(1000, 100, 1.5), opt="dynmuon")
    files = sorted(d.glob("*.txt"))
    for perm in (files, files[::-1]):
        rc, out, err = run_main(capsys, *perm)
        rows, head_lines = table(out)
        assert rc == 0 and head_lines[0].startswith("reference: muon_b  T: 1000")
        assert header(head_lines)["chosen"] == \
            "lowest best val of the 3 Muon runs with T=1000, the most common T"
        assert rows["muon_smoke"]["saving"] == "n/a (T=30 vs reference T=1000)"
    # without a Muon run of the common length, the lowest best val of all Muon runs
    make_log(d / "muon_smoke2.txt", 50, {0: 9.0, 25: 3.0, 50: 2.9}, opt="muon")
    rc, out, _ = run_main(capsys, d / "muon_smoke2.txt", d / "muon_smoke.txt", d / "dyn.txt", d / "dyn2.txt")
    rows, head_lines = table(out)
    assert head_lines[0].startswith("reference: muon_smoke  T: 30")
    assert header(head_lines)["chosen"] == \
        "lowest best val of the 2 Muon runs (none has the most common T=1000)"
    assert rows["dyn"]["saving"] == "n/a (T=1000 vs reference T=30)"


def test_config_sources():
    text = CODE + "\n".join(config_lines("dynmuon", 100, "r")) + "\nstep:0/100 val_loss:9.0000\n"
    assert compare.parse_text(text).config["optimizer"] == "dynmuon"
    assert compare.parse_text(text).optimizer == "dynmuon"
    # modded-nanoGPT: code, a rule, other text, no JSON: no configuration
    modded = CODE + RULE + "\nRunning Python 3.12\n" + RULE + "\nstep:0/100 val_loss:9.0000\n"
    assert compare.parse_text(modded).config is None and compare.parse_text(modded).optimizer is None
    broken = CODE + RULE + '\n{\n "config": {"optimizer": \n' + RULE + "\nstep:0/100 val_loss:9.0\n"
    assert compare.parse_text(broken).config is None
    cut = CODE + RULE + '\n{\n "config": {}\nstep:0/100 val_loss:9.0\n'
    assert compare.parse_text(cut).config is None


def test_config_from_jsonl_next_to_log(tmp_path):
    log = make_log(tmp_path / "run.txt", 100, {0: 9.0, 100: 4.0})
    assert compare.parse_log(log).optimizer is None
    (tmp_path / "run.jsonl").write_text(json.dumps(dict(event="config", config=dict(optimizer="muon")))
                                        + "\n" + json.dumps(dict(event="val", step=0)) + "\n")
    assert compare.parse_log(log).optimizer == "muon"
    (tmp_path / "run.jsonl").write_text(json.dumps(dict(event="val", step=0)) + "\n")
    assert compare.parse_log(log).optimizer is None
    # the block inside the .txt wins over the .jsonl
    make_log(log, 100, {0: 9.0, 100: 4.0}, opt="adamw")
    (tmp_path / "run.jsonl").write_text(json.dumps(dict(event="config", config=dict(optimizer="muon"))))
    assert compare.parse_log(log).optimizer == "adamw"


def test_mismatched_T_gets_no_saving(tmp_path):
    ref = make_log(tmp_path / "muon.txt", 1000, curve(1000, 100), opt="muon")
    # a 30-step run whose losses lie below the target: at the default target it must not
    # claim a 97% saving against a 1000-step run
    short = make_log(tmp_path / "short.txt", 30, {0: 9.0, 10: 3.5, 20: 3.3, 30: 3.2}, opt="dynmuon")
    target = curve(1000, 100)[800]
    assert 3.3 < target
    rc, out, _ = run_cli(short, ref)
    rows, _ = table(out)
    assert rc == 0 and rows["short"]["reached"] == "20"
    assert rows["short"]["saving"] == "n/a (T=30 vs reference T=1000)"
    res = json.loads(run_cli(short, ref, "--json")[1])
    s = res["runs"][1]
    assert s["name"] == "short" and s["steps_to_target"] == 20 and s["step_saving_pct"] is None
    assert s["step_saving_reason"] == "T=30 vs reference T=1000"
    # an explicit target restores the saving, and a note says why it is there
    rc, out, _ = run_cli(short, ref, "--target", target)
    rows, head_lines = table(out)
    assert rows["short"]["saving"] == f"{100 * (800 - 20) / 800:.1f}%"
    assert header(head_lines)["note"] == \
        "runs with T=30 (reference T=1000) get a step saving only because --target was given"
    res = json.loads(run_cli(short, ref, "--json", "--target", target)[1])
    assert res["target_given"] is True and res["runs"][1]["step_saving_pct"] == pytest.approx(97.5)


def test_mismatched_T_against_records(tmp_path):
    short = make_log(tmp_path / "short.txt", 30, {0: 9.0, 10: 3.5, 20: 3.3, 30: 3.2}, opt="dynmuon")
    # a records folder holding a 20000-step Muon run
    rec = tmp_path / "records"
    folder = rec / "2026-01-01_muon"
    folder.mkdir(parents=True)
    make_log(folder / "log.txt", 20000, curve(20000, 1000, 0.01), opt="muon")
    rc, out, _ = run_cli(short, "--reference", folder)
    rows, head_lines = table(out)
    assert rc == 0 and head_lines[0].startswith("reference: 2026-01-01_muon  T: 20000")
    assert rows["short"]["saving"] == "n/a (T=30 vs reference T=20000)"
    # a paper entry (T from num_iterations) with an explicit target: the saving is the user's call
    rc, out, _ = run_cli(short, "--reference", "paper_10B_127M", "--target", 3.3)
    rows, head_lines = table(out)
    assert rows["short"]["saving"] == f"{100 * (16000 - 20) / 16000:.1f}%"
    assert "T: 20000" in head_lines[0] and "T=30 (reference T=20000)" in header(head_lines)["note"]


def test_target_never_reached(tmp_path):
    ref = make_log(tmp_path / "ref.txt", 1000, curve(1000, 100), opt="muon")
    slow = make_log(tmp_path / "a_slow.txt", 1000, curve(1000, 100, scale=0.5), opt="dynmuon")
    rc, out, _ = run_cli(ref, slow)
    assert rc == 0
    rows, _ = table(out)
    assert rows["a_slow"]["reached"] == "not reached" and rows["a_slow"]["saving"] == "n/a"
    assert rows["a_slow"]["best_val"] == f"{curve(1000, 100, 0.5)[1000]:.4f}"
    rc, out, _ = run_cli(ref, slow, "--target", "2.5")  # nobody reaches it
    rows, head_lines = table(out)
    assert "steps_to_target: not reached" in head_lines[0] and "(given)" in header(head_lines)["target"]
    assert all(r["reached"] == "not reached" and r["saving"] == "n/a" for r in rows.values())
    res = json.loads(run_cli(ref, slow, "--target", "2.5", "--json")[1])
    assert [r["step_saving_reason"] for r in res["runs"]] == ["target not reached"] * 2


def test_single_evaluation(tmp_path):
    ref = make_log(tmp_path / "ref.txt", 1000, curve(1000, 100), opt="muon")
    one = make_log(tmp_path / "one.txt", 1000, {1000: 3.1}, opt="dynmuon")
    rc, out, _ = run_cli(ref, one)
    assert rc == 0
    r = table(out)[0]["one"]
    assert (r["evals"], r["last/T"], r["best_val"], r["@step"], r["reached"], r["saving"]) == \
           ("1", "1000/1000", "3.1000", "1000", "1000", "-25.0%")
    # as the reference it gives no loss at 80%: clear error unless --target is given
    rc, _, err = run_cli(ref, "--reference", one)
    assert rc == 2 and "no evaluation at or before step 800" in err and len(err.splitlines()) == 1
    rc, out, _ = run_cli(ref, "--reference", one, "--target", "3.5")
    rows, head_lines = table(out)
    assert rc == 0 and "steps_to_target: 1000" in head_lines[0]
    ref_steps = min(s for s, x in curve(1000, 100).items() if x <= 3.5)
    assert rows["ref"]["reached"] == str(ref_steps)
    assert rows["ref"]["saving"] == f"{100 * (1000 - ref_steps) / 1000:.1f}%"


def test_cut_mid_line_and_in_progress(tmp_path):
    ev = curve(1000, 100)
    part = {s: x for s, x in ev.items() if s <= 800}
    p = make_log(tmp_path / "cut.txt", 1000, part, extra="step:900/1000 val_loss:3.1", newline=False)
    run = compare.parse_log(p)
    assert run.last_step == 800 and len(run.evals) == 9 and run.total_steps == 1000
    # cut after the number: the value is complete, so it counts
    p2 = make_log(tmp_path / "cut2.txt", 1000, part, extra="step:900/1000 val_loss:3.1000 train_ti",
                  newline=False)
    assert compare.parse_log(p2).evals[-1] == (900, 3.1)
    assert compare.parse_text("step:0/10 val_loss:9.0000\ntarget:3.28 reached_at", "x").logged_target is None
    ref = make_log(tmp_path / "ref.txt", 1000, ev, opt="muon")
    rc, out, _ = run_cli(ref, p)
    r = table(out)[0]["cut"]
    assert rc == 0 and r["last/T"] == "800/1000" and r["evals"] == "9" and r["reached"] == "800"
    rc, _, err = run_cli(tmp_path / "cut.txt")  # in progress at 80%: fine, 800 is evaluated
    assert rc == 0
    early = make_log(tmp_path / "early.txt", 1000, {s: x for s, x in ev.items() if s <= 500})
    rc, _, err = run_cli(ref, "--reference", early)
    assert rc == 2 and "stops at step 500" in err


def test_different_cadences(tmp_path):
    # reference evaluated every 150 steps: no evaluation at 800, the one at 750 is used
    ref_ev = {s: round(3.0 + 8.0 / (1 + s / 50), 4) for s in [*range(0, 1000, 150), 1000]}
    other_ev = {s: round(2.98 + 8.0 / (1 + s / 40), 4) for s in range(0, 1001, 40)}
    ref = make_log(tmp_path / "ref.txt", 1000, ref_ev, opt="muon")
    other = make_log(tmp_path / "other.txt", 1000, other_ev, code=True)
    target, step, note = compare.target_from_reference(compare.parse_log(ref))
    assert (target, step) == (ref_ev[750], 750) and "no evaluation at step 800" in note
    rc, out, _ = run_cli(ref, other)
    rows, head_lines = table(out)
    h = header(head_lines)
    assert "used the last one before it" in h["target"] and f"{ref_ev[750]:.4f}" in h["target"]
    steps = min(s for s, x in other_ev.items() if x <= ref_ev[750])
    assert rows["ref"]["reached"] == "750" and rows["other"]["reached"] == str(steps)
    assert rows["other"]["evals"] == str(len(other_ev))
    assert rows["other"]["saving"] == f"{100 * (750 - steps) / 750:.1f}%"


def test_reference_records_dir(tmp_path):
    rec = tmp_path / "records"
    d = rec / "2026-01-01_muon_127M"
    d.mkdir(parents=True)
    make_log(d / "0f3c.txt", 1000, curve(1000, 100), ms=200.0, opt="muon")
    (d / "config.json").write_text("{}")
    (d / "summary.md").write_text("# muon\n")
    (rec / "records.json").write_text("{}")
    mine = make_log(tmp_path / "mine.txt", 1000, curve(1000, 100, 1.5), ms=220.0)
    for ref in (d, str(d) + "/", "2026-01-01_muon_127M"):
        rc, out, err = run_cli(mine, "--reference", ref, "--records", rec / "records.json")
        assert rc == 0, err
        rows, head_lines = table(out)
        assert "2026-01-01_muon_127M" in head_lines[0] and "steps_to_target: 800" in head_lines[0]
        assert header(head_lines)["chosen"] == "--reference"
        assert rows["mine"]["reached"] == "600" and rows["mine"]["saving"] == "25.0%"
        assert rows["mine"]["ms_ratio"] == "1.100" and "muon" not in rows
    # a records folder is also accepted as a LOG, named by the folder
    rc, out, _ = run_cli(mine, d)
    assert rc == 0 and table(out)[1][0].startswith("reference: 2026-01-01_muon_127M")
    (d / "other.txt").write_text("")
    rc, _, err = run_cli(mine, "--reference", d)
    assert rc == 2 and "exactly one .txt" in err and "other.txt): give one of them" in err


def test_reference_records_json_entries(tmp_path):
    mine = make_log(tmp_path / "mine.txt", 20000, curve(20000, 500), ms=1150.3)
    rc, _, err = run_cli(mine, "--reference", "paper_10B_127M")  # paper: no target loss
    assert rc == 2 and "--target" in err and len(err.splitlines()) == 1
    target = curve(20000, 500)[12500]
    rc, out, err = run_cli(mine, "--reference", "paper_10B_127M", "--target", target)
    assert rc == 0, err
    rows, head_lines = table(out)
    assert head_lines[0] == "reference: paper_10B_127M:muon  T: 20000  steps_to_target: 16000  ms/step: 1142.40"
    assert "note" not in header(head_lines)  # same T: nothing to say
    assert rows["mine"]["reached"] == "12500" and rows["mine"]["saving"] == "21.9%"
    assert rows["mine"]["ms_ratio"] == f"{1150.3 / 1142.4:.3f}"
    # track 3 publishes a target but no T: its fixed target is compared as published
    rc, out, _ = run_cli(mine, "--reference", "modded_nanogpt_track3:dynmuon")
    rows, head_lines = table(out)
    assert rc == 0 and "T: n/a  steps_to_target: 3175" in head_lines[0] and "ms/step: n/a" in head_lines[0]
    assert rows["mine"]["target"] == "3.2800" and rows["mine"]["ms_ratio"] == "n/a"
    steps = min(s for s, x in curve(20000, 500).items() if x <= 3.28)
    assert rows["mine"]["saving"] == f"{100 * (3175 - steps) / 3175:.1f}%"


def test_bad_input_exit_2(tmp_path):
    good = make_log(tmp_path / "good.txt", 1000, curve(1000, 100))
    code_only = tmp_path / "code.txt"
    code_only.write_text(CODE + "step:5/1000 train_loss:3.0000 train_time:1ms step_avg:1.00ms\n")
    for args in ([tmp_path / "missing.txt"], [good, "--reference", "no_such_record"],
                 [good, "--reference", "paper_10B_127M:adam"], [code_only],
                 [good, "--reference", tmp_path / "missing.txt"],
                 [good, "--group", "--ref_variant", "nope"], [good, "--group", "--vs", "nope"]):
        rc, out, err = run_cli(*args)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
        assert err.startswith("compare.py: error: ") and "Traceback" not in err
    assert "unknown reference 'no_such_record'" in run_cli(good, "--reference", "no_such_record")[2]
    assert "unknown variant 'nope' (variants: good)" in run_cli(good, "--group", "--ref_variant", "nope")[2]
    # flags that only make sense together: argparse's usage error, status 2
    for args, msg in (([good, "--vs", "good"], "need --group"), ([good, "--ref_variant", "good"], "need --group"),
                      ([good, "--group", "--reference", good], "use --ref_variant")):
        rc, out, err = run_cli(*args)
        assert rc == 2 and out == "" and msg in err and "Traceback" not in err


def test_pure_functions():
    text = CODE + "\n".join([
        "step:0/100 val_loss:10.8258 train_time:0ms step_avg:nanms",
        "step:10/100 train_loss:5.0000 train_time:10ms step_avg:1.00ms",
        "  # step:20/100 val_loss:0.0001 a commented example",
        "step:50/100 val_loss:nan train_time:50ms step_avg:1.00ms",
        "step:80/100 val_loss:3.5000",                      # older logs: no timing fields
        "step:100/100 val_loss:3.4000 train_time:100ms step_avg:1.25ms",
        "target:3.5 not_reached"]) + "\n"
    run = compare.parse_text(text, "r")
    assert run.total_steps == 100 and run.step_avg_ms == 1.25 and run.config is None
    assert [s for s, _ in run.evals] == [0, 50, 80, 100] and math.isnan(run.evals[1][1])
    assert compare.best_val(run) == (3.4, 100) and compare.final_val(run) == 3.4
    assert compare.steps_to_target(run, 3.5) == 80 and compare.steps_to_target(run, 3.0) is None
    assert compare.target_from_reference(run)[:2] == (3.5, 80)
    assert (run.logged_target, run.logged_reached) == (3.5, None)
    with pytest.raises(compare.LogError):
        compare.parse_text(CODE, "code")


def test_records_json_consistent():
    rec = json.loads((ROOT / "records" / "records.json").read_text())
    paper = {k: v for k, v in rec.items() if k.startswith("paper_")}
    assert sorted(paper) == sorted(f"paper_{t}_{m}" for t in ("10B", "20B")
                                   for m in ("127M", "601M", "1.1B"))
    for k, v in paper.items():
        assert v["source"] == "arXiv 2605.17109 Table 1" and v["target_loss"] is None
        assert v["num_iterations"] == (20000 if "_10B_" in k else 38000)
        ms, ds = v["muon"]["steps_to_target"], v["dynmuon"]["steps_to_target"]
        assert ms == (16000 if "_10B_" in k else 30400)
        assert v["step_saving_pct"] == pytest.approx(100 * (ms - ds) / ms, abs=0.05)
        assert v["dynmuon"]["best_val_loss"] < v["muon"]["best_val_loss"]
        assert v["muon"]["ms_per_step"] > 0 and v["dynmuon"]["ms_per_step"] > 0
    assert rec["paper_10B_127M"]["dynmuon"]["steps_to_target"] == 12500
    t3 = rec["modded_nanogpt_track3"]
    assert (t3["target_loss"], t3["muon"]["steps_to_target"],
            t3["dynmuon"]["steps_to_target"]) == (3.28, 3250, 3175)


# ---- groups over seeds -------------------------------------------------------------------------------

HEAD = [9.0, 7.0, 6.0, 5.5, 5.2, 5.0, 4.9, 4.8]  # val loss at 0, 10%, ..., 70% of T, all runs
# name: (optimizer, T, val loss at 80%, 90% and 100% of T)
GROUP_RUNS = {
    "muon_lr0.02_seed0": ("muon", 100, (4.60, 4.52, 4.50)),
    "muon_seed1_lr0.02": ("muon", 100, (4.63, 4.50, 4.51)),    # seed token in the middle
    "muon_lr0.02_seed2": ("muon", 100, (4.58, 4.53, 4.49)),
    "muon_lr0.04_seed0": ("muon", 100, (4.65, 4.56, 4.55)),
    "muon_lr0.04_seed1": ("muon", 100, (4.64, 4.57, 4.54)),
    "dynmuon_seed0": ("dynmuon", 100, (4.55, 4.47, 4.46)),
    "dynmuon_seed1": ("dynmuon", 100, (4.57, 4.44, 4.45)),     # best 4.44 before final 4.45
    "seed2_dynmuon": ("dynmuon", 100, (4.59, 4.48, 4.47)),     # seed token first
    "dynmuon_seed3_dseed1": ("dynmuon", 100, (4.61, 4.46, 4.43)),
    "dynmuon_T200_seed0": ("dynmuon", 200, (4.52, 4.44, 4.42)),
    "dynmuon_T200_seed1": ("dynmuon", 200, (4.50, 4.45, 4.41)),
    "adamw_lr0.001_seed0": ("adamw", 100, (4.79, 4.78, 4.77)),
}
# target = mean over muon_lr0.02's runs of the val loss at 80% of T = (4.60 + 4.63 + 4.58) / 3
GROUP_TARGET = 4.6033333333333335

# The expected statistics below were computed once with the system python3's numpy/scipy 1.17
# (np.mean, np.std(ddof=1), scipy.stats.ttest_ind(a, b, equal_var=False).pvalue) from the values
# above, and are hard-coded here.
EXPECTED = {  # variant: n, final (mean, std), best (mean, std), steps (mean, std, reached)
    "muon_lr0.02": (3, (4.5, 0.009999999999999787), (4.496666666666667, 0.005773502691896135),
                    (83.33333333333333, 5.773502691896257, 3)),
    "muon_lr0.04": (2, (4.545, 0.007071067811865324), (4.545, 0.007071067811865324), (90.0, 0.0, 2)),
    "dynmuon": (4, (4.4525, 0.017078251276599357), (4.45, 0.01825741858350547), (82.5, 5.0, 4)),
    "dynmuon_T200": (2, (4.415, 0.007071067811865324), (4.415, 0.007071067811865324), (160.0, 0.0, 2)),
    "adamw_lr0.001": (1, (4.77, None), (4.77, None), (None, None, 0)),
}
P_VS_MUON = {  # variant: p of final val, best val, steps-to-target against muon_lr0.02
    "muon_lr0.04": (0.010907121270021925, 0.017533145087218323, 0.18350341907227372),
    "dynmuon": (0.006252864197051392, 0.010107685842827221, 0.8511627527132352),
    "dynmuon_T200": (0.0018617482427240966, 0.006562095268766013, None),  # T differs
}
P_VS_DYNMUON = {
    "muon_lr0.02": (0.006252864197051392, 0.010107685842827221, 0.8511627527132352),
    "muon_lr0.04": (0.0007297633970311555, 0.00080686758321058, 0.0576688856224373),
    "dynmuon_T200": (0.019279445044792856, 0.02831957849023448, None),
}


def assert_close(got, want, rel=1e-9):
    """Element-wise pytest.approx where None (no value) must stay None."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None and w is None) or (w is not None and g == pytest.approx(w, rel=rel, abs=1e-12)), (got, want)


def group_logs(tmp_path):
    paths = []
    for name, (opt, T, tail) in GROUP_RUNS.items():
        values = HEAD + list(tail)
        paths.append(make_log(tmp_path / f"{name}.txt", T, {T * i // 10: x for i, x in enumerate(values)},
                              opt=opt))
    return paths


def test_variant_names():
    variant = lambda name: compare.Run(name, "", 1, [(0, 1.0)]).variant
    assert variant("muon_lr0.02_seed0") == variant("muon_lr0.02_seed1") == "muon_lr0.02"
    assert variant("seed3_muon_lr0.02") == variant("muon_seed12_lr0.02") == "muon_lr0.02"
    assert variant("dynmuon_seed3_dseed1") == variant("dynmuon-seed2") == "dynmuon"
    assert variant("muon_lr0.02") == "muon_lr0.02" and variant("reseed1_muon") == "reseed1_muon"
    assert variant("seed0") == "(seed only)"


def test_group_numbers(tmp_path, capsys):
    paths = group_logs(tmp_path)
    rc, out, err = run_main(capsys, *paths, "--group", "--json")
    assert rc == 0 and err == ""
    g = json.loads(out)["groups"]
    assert g["reference_variant"] == "muon_lr0.02"
    assert g["chosen_by"] == "lowest mean final val of the 2 Muon variants"
    assert g["target"] == pytest.approx(GROUP_TARGET, rel=1e-12) and g["target_given"] is False
    assert [v["variant"] for v in g["variants"]] == \
        ["muon_lr0.02", "adamw_lr0.001", "dynmuon", "dynmuon_T200", "muon_lr0.04"]
    by_name = {v["variant"]: v for v in g["variants"]}
    for name, (n, final, best, steps) in EXPECTED.items():
        v = by_name[name]
        assert v["n"] == n and len(v["runs"]) == n
        assert_close([v["final_val"]["mean"], v["final_val"]["std"]], final)
        assert_close([v["best_val"]["mean"], v["best_val"]["std"]], best)
        s = v["steps_to_target"]
        assert_close([s["mean"], s["std"], s["reached"]], steps)
    assert by_name["dynmuon"]["runs"] == ["dynmuon_seed0", "dynmuon_seed1", "dynmuon_seed3_dseed1",
                                          "seed2_dynmuon"]
    assert by_name["dynmuon"]["steps_to_target"]["per_run"] == [80, 80, 90, 80]
    assert by_name["adamw_lr0.001"]["steps_to_target"]["per_run"] == [None]
    assert by_name["dynmuon_T200"]["total_steps"] == [200] and by_name["dynmuon"]["optimizer"] == ["dynmuon"]
    for name, ps in P_VS_MUON.items():
        tests = by_name[name]["p"]["muon_lr0.02"]
        assert_close([tests[k]["p"] for k in ("final_val", "best_val", "steps_to_target")], ps, rel=1e-6)
    assert by_name["dynmuon_T200"]["p"]["muon_lr0.02"]["steps_to_target"]["reason"] == \
        "T=200 vs T=100: runs of different length"
    # the t statistic is variant minus reference; the df is Welch-Satterthwaite's (scipy's values)
    t = by_name["dynmuon"]["p"]["muon_lr0.02"]["final_val"]
    assert (t["t"], t["df"]) == pytest.approx((-4.608176875690384, 4.8495960223741115), rel=1e-9)
    assert by_name["muon_lr0.02"]["p"]["muon_lr0.02"]["final_val"]["reason"] == "same variant"


def test_group_vs_second_variant(tmp_path, capsys):
    paths = group_logs(tmp_path)
    rc, out, _ = run_main(capsys, *paths, "--group", "--json", "--vs", "dynmuon")
    by_name = {v["variant"]: v for v in json.loads(out)["groups"]["variants"]}
    for name, ps in P_VS_DYNMUON.items():
        tests = by_name[name]["p"]["dynmuon"]
        assert_close([tests[k]["p"] for k in ("final_val", "best_val", "steps_to_target")], ps, rel=1e-6)
    # text table: one p column per quantity and compared variant
    rc, out, _ = run_main(capsys, *paths, "--group", "--vs", "dynmuon")
    rows, head_lines = table(out)
    assert list(rows["dynmuon"]) == ["variant", "T", "n", "final val", "best val", "steps to target",
                                     "reached", "p final", "p best", "p steps", "p final vs dynmuon",
                                     "p best vs dynmuon", "p steps vs dynmuon"]
    assert [rows["muon_lr0.04"][c] for c in ("p final vs dynmuon", "p best vs dynmuon", "p steps vs dynmuon")] \
        == ["0.0007", "0.0008", "0.0577"]
    assert [rows["dynmuon"][c] for c in ("p final vs dynmuon", "p best vs dynmuon")] == ["-", "-"]
    assert header(head_lines)["p"] == \
        "two-sided Welch t-test against muon_lr0.02; 'vs dynmuon' columns against dynmuon"


def test_group_text_table_and_order(tmp_path, capsys):
    paths = group_logs(tmp_path)
    outputs = {run_main(capsys, *perm, "--group")[1]
               for perm in (paths, paths[::-1], paths[5:] + paths[:5])}
    assert len(outputs) == 1
    out = outputs.pop()
    rows, head_lines = table(out)
    h = header(head_lines)
    assert head_lines[0] == "reference: muon_lr0.02 (lowest mean final val of the 2 Muon variants)"
    assert h["target"] == (f"{GROUP_TARGET:.4f} (mean over the 3 runs of muon_lr0.02 of the "
                           "val loss at 80% of T: 4.6000 @80/100, 4.5800 @80/100, 4.6300 @80/100)")
    assert rows["muon_lr0.02"] == {
        "variant": "muon_lr0.02", "T": "100", "n": "3", "final val": "4.5000 ± 0.0100",
        "best val": "4.4967 ± 0.0058", "steps to target": "83.3 ± 5.8", "reached": "3/3",
        "p final": "-", "p best": "-", "p steps": "-"}
    assert rows["dynmuon"] == {
        "variant": "dynmuon", "T": "100", "n": "4", "final val": "4.4525 ± 0.0171",
        "best val": "4.4500 ± 0.0183", "steps to target": "82.5 ± 5.0", "reached": "4/4",
        "p final": "0.0063", "p best": "0.0101", "p steps": "0.8512"}
    # n < 2: n/a with a numbered reason under the table; not reached: its own reason
    assert rows["adamw_lr0.001"] == {
        "variant": "adamw_lr0.001", "T": "100", "n": "1", "final val": "4.7700", "best val": "4.7700",
        "steps to target": "-", "reached": "0/1", "p final": "n/a (1)", "p best": "n/a (1)",
        "p steps": "n/a (2)"}
    assert rows["dynmuon_T200"]["p steps"] == "n/a (3)" and rows["dynmuon_T200"]["p final"] == "0.0019"
    lines = out.splitlines()
    assert lines[-3:] == ["(1) n/a: n=1 vs n=3: needs 2 runs or more on each side",
                          "(2) n/a: not every run reached the target",
                          "(3) n/a: T=200 vs T=100: runs of different length"]


def test_group_markdown(tmp_path, capsys):
    paths = group_logs(tmp_path)
    rc, out, _ = run_main(capsys, *paths, "--group", "--markdown")
    lines = out.splitlines()
    assert rc == 0 and lines[0] == "- reference: muon_lr0.02 (lowest mean final val of the 2 Muon variants)"
    i = lines.index("| variant | T | n | final val | best val | steps to target | reached | p final | "
                    "p best | p steps |")
    assert lines[i + 1] == "|" + "---|" * 10
    assert lines[i + 3] == "| adamw_lr0.001 | 100 | 1 | 4.7700 | 4.7700 | - | 0/1 | n/a (1) | n/a (1) | n/a (2) |"
    assert lines[-3] == "- (1) n/a: n=1 vs n=3: needs 2 runs or more on each side"


def test_group_ref_variant_and_target(tmp_path, capsys):
    paths = group_logs(tmp_path)
    rc, out, _ = run_main(capsys, *paths, "--group", "--json", "--ref_variant", "dynmuon", "--target", 4.5)
    g = json.loads(out)["groups"]
    assert g["reference_variant"] == "dynmuon" and g["chosen_by"] == "--ref_variant"
    assert g["target"] == 4.5 and g["target_note"] == "given" and g["target_given"] is True
    by_name = {v["variant"]: v for v in g["variants"]}
    assert by_name["dynmuon"]["steps_to_target"]["per_run"] == [90, 90, 90, 90]
    # an explicit target compares runs of another T too (dynmuon_T200 reaches 4.5 at 180 and 160);
    # scipy's p for [180, 160] vs [90, 90, 90, 90], hard-coded: 0.07916684832113109
    t200 = by_name["dynmuon_T200"]
    assert t200["steps_to_target"]["per_run"] == [180, 160]
    assert t200["p"]["dynmuon"]["steps_to_target"]["p"] == pytest.approx(0.07916684832113109, rel=1e-6)
    assert by_name["muon_lr0.02"]["p"]["dynmuon"]["final_val"]["p"] == \
        pytest.approx(P_VS_DYNMUON["muon_lr0.02"][0], rel=1e-6)
    rc, _, err = run_main(capsys, *paths, "--group", "--ref_variant", "dynmuon", "--vs", "dynmuon")
    assert rc == 2 and "is the reference variant already" in err


def test_group_without_muon_variant_warns(tmp_path, capsys):
    paths = [p for p in group_logs(tmp_path) if not p.stem.startswith("muon")]
    rc, out, err = run_main(capsys, *paths, "--group")
    assert rc == 0 and "no Muon variant among the logs" in err and "using adamw_lr0.001 as reference" in err
    assert table(out)[1][0] == "reference: adamw_lr0.001 (first variant by name (no Muon variant))"


def test_welch_edge_cases():
    assert compare.welch_test([1.0], [1.0, 2.0]) == dict(
        t=None, df=None, p=None, reason="n=1 vs n=2: needs 2 runs or more on each side")
    for a, b in (([1.0, 1.0], [1.0, 1.0]), ([1.0, 1.0], [2.0, 2.0, 2.0])):
        r = compare.welch_test(a, b)
        assert r["p"] is None and r["reason"] == "zero spread on both sides: the t statistic is undefined"
    assert compare.welch_test([1.0, math.nan], [1.0, 2.0])["reason"] == "a value is not finite (diverged run)"
    # zero spread on one side only: df = n-1 of the other; scipy (hard-coded): 0.015587358121496146
    r = compare.welch_test([1.0, 1.0, 1.0], [1.5, 2.0, 2.5, 2.25])
    assert r["p"] == pytest.approx(0.015587358121496146, rel=1e-9) and r["df"] == pytest.approx(3.0)
    assert compare.mean_std([2.0]) == (2.0, None) and compare.mean_std([]) == (None, None)


def test_incomplete_beta_and_t_tail():
    # scipy.special.betainc and 2*scipy.stats.t.sf, computed once and hard-coded
    assert compare.reg_inc_beta(2.5, 0.5, 0.3) == pytest.approx(0.018927124071945658, rel=1e-10)
    assert compare.reg_inc_beta(0.7, 3.0, 0.9) == pytest.approx(0.9994517816245749, rel=1e-10)
    assert compare.reg_inc_beta(40.0, 0.5, 0.999) == pytest.approx(0.777919867635688, rel=1e-10)
    assert compare.t_two_sided_p(2.0, 3.5) == pytest.approx(0.12613852257591343, rel=1e-10)
    assert compare.t_two_sided_p(-12.0, 1.0) == pytest.approx(0.052929352119179755, rel=1e-10)
    assert compare.t_two_sided_p(8.0, 60.0) == pytest.approx(4.900265147950212e-11, rel=1e-8)
    assert compare.t_two_sided_p(0.0, 5.0) == 1.0
    # tiny t, large df: 1 - x = t^2/(df+t^2) would round to 0, so it is passed exactly
    assert 1.0 - compare.t_two_sided_p(1e-6, 20000.0) == pytest.approx(7.978745872883053e-07, rel=1e-6)


def test_group_json_nan_is_null(tmp_path, capsys):
    make_log(tmp_path / "muon_seed0.txt", 100, {0: 9.0, 80: 4.6, 100: 4.5}, opt="muon")
    make_log(tmp_path / "muon_seed1.txt", 100, {0: 9.0, 80: 4.7, 100: 4.4}, opt="muon")
    (tmp_path / "dyn_seed0.txt").write_text("step:0/100 val_loss:9.0\nstep:80/100 val_loss:4.5\n"
                                            "step:100/100 val_loss:nan\n")
    make_log(tmp_path / "dyn_seed1.txt", 100, {0: 9.0, 80: 4.5, 100: 4.3}, opt="dynmuon")
    rc, out, _ = run_main(capsys, *sorted(tmp_path.glob("*.txt")), "--group", "--json")
    assert rc == 0 and "NaN" not in out
    g = json.loads(out)["groups"]
    assert g["reference_variant"] == "muon" and g["chosen_by"] == "the Muon variant among the logs"
    dyn = g["variants"][1]
    assert dyn["variant"] == "dyn" and dyn["final_val"]["values"] == [None, 4.3]
    assert dyn["final_val"]["mean"] is None and dyn["best_val"]["values"] == [4.5, 4.3]
    assert dyn["p"]["muon"]["final_val"]["reason"] == "a value is not finite (diverged run)"
    assert dyn["p"]["muon"]["best_val"]["p"] is not None


def test_group_notes_runs_in_progress(tmp_path, capsys):
    make_log(tmp_path / "muon_seed0.txt", 100, {0: 9.0, 80: 4.6, 100: 4.5}, opt="muon")
    make_log(tmp_path / "muon_seed1.txt", 100, {0: 9.0, 80: 4.7}, opt="muon")  # still running
    rc, out, _ = run_main(capsys, tmp_path / "muon_seed1.txt", tmp_path / "muon_seed0.txt", "--group")
    rows, head_lines = table(out)
    assert rc == 0 and header(head_lines)["note"] == "muon_seed1 stopped at step 80 of 100: its final val is that step's"
    assert rows["muon"]["final val"] == f"4.6000 ± {math.sqrt(0.02):.4f}"


# ---- plots -----------------------------------------------------------------------------------------

def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    good = make_log(tmp_path / "good.txt", 1000, curve(1000, 100))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert compare.main([str(good), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_plot(logs, capsys):
    pytest.importorskip("matplotlib")
    tmp_path, muon, dyn = logs
    out = tmp_path / "curves.png"
    assert compare.main([str(muon), str(dyn), "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    out.unlink()
    assert compare.main([str(muon), str(dyn), "--group", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_into_missing_folder_and_bad_frac_exit_2_before_output(logs, capsys):
    pytest.importorskip("matplotlib")
    tmp_path, muon, dyn = logs
    assert compare.main([str(muon), "--plot", str(tmp_path / "no_such_dir" / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no_such_dir does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(muon), "--frac", "0"])
    assert exit_info.value.code == 2 and "--frac must lie in (0, 1]" in capsys.readouterr().err
