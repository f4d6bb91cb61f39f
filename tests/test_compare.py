"""Tests for records/compare.py (steps-to-target comparison of training logs)."""
import importlib.util
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
'''


def make_log(path, T, evals, ms=100.0, code=False, train_every=0, extra="", newline=True):
    """Write a log: `evals` maps step -> val loss; train lines every `train_every` steps."""
    lines = ([*CODE.splitlines(), "=" * 100] if code else [])
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
    Path(path).write_text(text)
    return Path(path)


def run_cli(*args):
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                       capture_output=True, text=True, timeout=30)
    return p.returncode, p.stdout, p.stderr


def table(out):
    """Parse the printed table into {run name: {column: cell}}, plus the header lines."""
    lines = out.splitlines()
    i = next(k for k, l in enumerate(lines) if l.startswith("run "))
    head = re.split(r"\s{2,}", lines[i].strip())
    rows = {}
    for l in lines[i + 1:]:
        if l.strip():
            cells = re.split(r"\s{2,}", l.strip())
            assert len(cells) == len(head), l
            rows[cells[0]] = dict(zip(head, cells))
    return rows, lines[:i]


def curve(T, every, scale=1.0, floor=3.0):
    """A decreasing synthetic val-loss curve, rounded to 4 decimals as in a log."""
    return {s: round(floor + 8.0 / (1 + scale * s / 50), 4) for s in range(0, T + 1, every)}


@pytest.fixture
def logs(tmp_path):
    muon = make_log(tmp_path / "muon.txt", 1000, curve(1000, 100), ms=200.0, train_every=25)
    dyn = make_log(tmp_path / "dyn.txt", 1000, curve(1000, 100, scale=1.5), ms=210.0,
                   code=True, train_every=25,
                   extra="target:3.4444 reached_at_step:600\n")
    return tmp_path, muon, dyn


def test_basic_two_runs_all_numbers(logs):
    _, muon, dyn = logs
    ref_curve, dyn_curve = curve(1000, 100), curve(1000, 100, scale=1.5)
    target = ref_curve[800]
    rc, out, err = run_cli(muon, dyn)
    assert rc == 0, err
    rows, header = table(out)
    ref_steps = 800
    dyn_steps = min(s for s, x in dyn_curve.items() if x <= target)
    assert f"steps_to_target: {ref_steps}" in header[0] and "ms/step: 200.00" in header[0]
    assert header[1].startswith(f"target:    {target:.4f} (val loss of muon at step 800 (80% of 1000))")
    m, d = rows["muon"], rows["dyn"]
    assert m == {"run": "muon", "evals": "11", "last/T": "1000/1000",
                 "best_val": f"{ref_curve[1000]:.4f}", "@step": "1000", "target": f"{target:.4f}",
                 "reached": "800", "saving": "0.0%", "ms/step": "200.00", "ms_ratio": "1.000"}
    assert d == {"run": "dyn", "evals": "11", "last/T": "1000/1000",
                 "best_val": f"{dyn_curve[1000]:.4f}", "@step": "1000", "target": f"{target:.4f}",
                 "reached": str(dyn_steps),
                 "saving": f"{100 * (ref_steps - dyn_steps) / ref_steps:.1f}%",
                 "ms/step": "210.00", "ms_ratio": f"{210 / 200:.3f}"}
    assert dyn_steps < ref_steps


def test_json_matches_and_code_lines_ignored(logs):
    _, muon, dyn = logs
    rc, out, _ = run_cli(muon, dyn, "--json")
    assert rc == 0
    res = json.loads(out)
    target = curve(1000, 100)[800]
    assert res["target"] == pytest.approx(target)
    assert res["reference"] == {"name": "muon", "steps_to_target": 800, "ms_per_step": 200.0,
                                "path": str(muon), "notes": []}
    d = res["runs"][1]
    # the code copy at the top holds a literal with real numbers (1.2345): never a data point
    assert d["num_evals"] == 11 and d["best_val_loss"] == pytest.approx(curve(1000, 100, 1.5)[1000])
    assert d["steps_to_target"] == 600 and d["step_saving_pct"] == pytest.approx(25.0)
    assert d["ms_per_step"] == 210.0 and d["ms_ratio"] == pytest.approx(1.05)
    assert d["logged_target"] == 3.4444 and d["logged_reached_at_step"] == 600
    assert res["runs"][0]["logged_target"] is None


def test_target_never_reached(tmp_path):
    ref = make_log(tmp_path / "ref.txt", 1000, curve(1000, 100))
    slow = make_log(tmp_path / "slow.txt", 1000, curve(1000, 100, scale=0.5))
    rc, out, _ = run_cli(ref, slow)
    assert rc == 0
    rows, _ = table(out)
    assert rows["slow"]["reached"] == "not reached" and rows["slow"]["saving"] == "n/a"
    assert rows["slow"]["best_val"] == f"{curve(1000, 100, 0.5)[1000]:.4f}"
    rc, out, _ = run_cli(ref, slow, "--target", "2.5")  # nobody reaches it
    rows, header = table(out)
    assert "steps_to_target: not reached" in header[0] and "(given)" in header[1]
    assert all(r["reached"] == "not reached" and r["saving"] == "n/a" for r in rows.values())


def test_single_evaluation(tmp_path):
    ref = make_log(tmp_path / "ref.txt", 1000, curve(1000, 100))
    one = make_log(tmp_path / "one.txt", 1000, {1000: 3.1})
    rc, out, _ = run_cli(ref, one)
    assert rc == 0
    r = table(out)[0]["one"]
    assert (r["evals"], r["last/T"], r["best_val"], r["@step"], r["reached"], r["saving"]) == \
           ("1", "1000/1000", "3.1000", "1000", "1000", "-25.0%")
    # as the reference it gives no loss at 80%: clear error unless --target is given
    rc, _, err = run_cli(one, ref)
    assert rc == 2 and "no evaluation at or before step 800" in err and len(err.splitlines()) == 1
    rc, out, _ = run_cli(one, ref, "--target", "3.5")
    rows, header = table(out)
    assert rc == 0 and "steps_to_target: 1000" in header[0]
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
    ref = make_log(tmp_path / "ref.txt", 1000, ev)
    rc, out, _ = run_cli(ref, p)
    r = table(out)[0]["cut"]
    assert rc == 0 and r["last/T"] == "800/1000" and r["evals"] == "9" and r["reached"] == "800"
    rc, _, err = run_cli(tmp_path / "cut.txt")  # in progress at 80%: fine, 800 is evaluated
    assert rc == 0
    early = make_log(tmp_path / "early.txt", 1000, {s: x for s, x in ev.items() if s <= 500})
    rc, _, err = run_cli(early, ref)
    assert rc == 2 and "stops at step 500" in err


def test_different_cadences(tmp_path):
    # reference evaluated every 150 steps: no evaluation at 800, the one at 750 is used
    ref_ev = {s: round(3.0 + 8.0 / (1 + s / 50), 4) for s in [*range(0, 1000, 150), 1000]}
    other_ev = {s: round(2.98 + 8.0 / (1 + s / 40), 4) for s in range(0, 1001, 40)}
    ref = make_log(tmp_path / "ref.txt", 1000, ref_ev)
    other = make_log(tmp_path / "other.txt", 1000, other_ev, code=True)
    target, step, note = compare.target_from_reference(compare.parse_log(ref))
    assert (target, step) == (ref_ev[750], 750) and "no evaluation at step 800" in note
    rc, out, _ = run_cli(ref, other)
    rows, header = table(out)
    assert "used the last one before it" in header[1] and f"{ref_ev[750]:.4f}" in header[1]
    steps = min(s for s, x in other_ev.items() if x <= ref_ev[750])
    assert rows["ref"]["reached"] == "750" and rows["other"]["reached"] == str(steps)
    assert rows["other"]["evals"] == str(len(other_ev))
    assert rows["other"]["saving"] == f"{100 * (750 - steps) / 750:.1f}%"


def test_reference_records_dir(tmp_path):
    rec = tmp_path / "records"
    d = rec / "2026-01-01_muon_127M"
    d.mkdir(parents=True)
    make_log(d / "0f3c.txt", 1000, curve(1000, 100), ms=200.0)
    (d / "config.json").write_text("{}")
    (d / "summary.md").write_text("# muon\n")
    (rec / "records.json").write_text("{}")
    mine = make_log(tmp_path / "mine.txt", 1000, curve(1000, 100, 1.5), ms=220.0)
    for ref in (d, str(d) + "/", "2026-01-01_muon_127M"):
        rc, out, err = run_cli(mine, "--reference", ref, "--records", rec / "records.json")
        assert rc == 0, err
        rows, header = table(out)
        assert "2026-01-01_muon_127M" in header[0] and "steps_to_target: 800" in header[0]
        assert rows["mine"]["reached"] == "600" and rows["mine"]["saving"] == "25.0%"
        assert rows["mine"]["ms_ratio"] == "1.100" and "muon" not in rows
    # a records folder is also accepted as a LOG, named by the folder
    rc, out, _ = run_cli(d, mine)
    assert rc == 0 and "2026-01-01_muon_127M" in table(out)[0]
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
    rows, header = table(out)
    assert "paper_10B_127M:muon" in header[0] and "steps_to_target: 16000" in header[0]
    assert "ms/step: 1142.40" in header[0]
    assert rows["mine"]["reached"] == "12500" and rows["mine"]["saving"] == "21.9%"
    assert rows["mine"]["ms_ratio"] == f"{1150.3 / 1142.4:.3f}"
    rc, out, _ = run_cli(mine, "--reference", "modded_nanogpt_track3:dynmuon")
    rows, header = table(out)
    assert rc == 0 and "steps_to_target: 3175" in header[0] and "ms/step: n/a" in header[0]
    assert rows["mine"]["target"] == "3.2800" and rows["mine"]["ms_ratio"] == "n/a"
    steps = min(s for s, x in curve(20000, 500).items() if x <= 3.28)
    assert rows["mine"]["saving"] == f"{100 * (3175 - steps) / 3175:.1f}%"


def test_bad_input_exit_2(tmp_path):
    good = make_log(tmp_path / "good.txt", 1000, curve(1000, 100))
    code_only = tmp_path / "code.txt"
    code_only.write_text(CODE + "step:5/1000 train_loss:3.0000 train_time:1ms step_avg:1.00ms\n")
    for args in ([tmp_path / "missing.txt"], [good, "--reference", "no_such_record"],
                 [good, "--reference", "paper_10B_127M:adam"], [code_only],
                 [good, "--reference", tmp_path / "missing.txt"]):
        rc, out, err = run_cli(*args)
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (args, err)
    assert "unknown reference 'no_such_record'" in run_cli(good, "--reference", "no_such_record")[2]


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
    assert run.total_steps == 100 and run.step_avg_ms == 1.25
    assert [s for s, _ in run.evals] == [0, 50, 80, 100] and math.isnan(run.evals[1][1])
    assert compare.best_val(run) == (3.4, 100)
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


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    good = make_log(tmp_path / "good.txt", 1000, curve(1000, 100))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert compare.main([str(good), "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_plot(logs):
    pytest.importorskip("matplotlib")
    tmp_path, muon, dyn = logs
    out = tmp_path / "curves.png"
    assert compare.main([str(muon), str(dyn), "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_into_missing_folder_and_bad_frac_exit_2_before_output(logs, capsys):
    pytest.importorskip("matplotlib")
    tmp_path, muon, dyn = logs
    assert compare.main([str(muon), "--plot", str(tmp_path / "no_such_dir" / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no_such_dir does not exist" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(muon), "--frac", "0"])
    assert exit_info.value.code == 2 and "--frac must lie in (0, 1]" in capsys.readouterr().err
