"""bench/ scripts on CPU: the planned configurations and FLOPs (the timings need a GPU)."""
import json
import subprocess
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_step  # noqa: E402
import scaling  # noqa: E402


def test_bench_step_dry_run_plans_every_preset(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_step.py"), "--dry_run", "--models",
                           "127M,601M", "--attention", "cudnn", "--fp8", "all", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(out.read_text())
    assert (plan["meta"]["fp8"], plan["meta"]["attention"]) == ("all", "cudnn")
    rows = plan["rows"]
    assert [(r["model"], r["opt"], r["micro_batch"], r["accum"]) for r in rows] == [
        ("127M", "muon", 64, 8), ("127M", "dynmuon", 64, 8), ("601M", "muon", 32, 16), ("601M", "dynmuon", 32, 16)]
    # 6 N tokens + attention, N = the 127M preset without its embedding (SPEC's 127,008,768 - 50304 * 512)
    n = 127_008_768 - 50304 * 512
    assert rows[0]["non_embedding_params"] == n
    assert rows[0]["flops_per_step"] == 6 * n * 512 * 1024 + 12 * 24 * 512 * 1024 * 512 * 1024
    assert proc.stdout.rstrip().splitlines()[-1].lstrip().startswith("601M | dynmuon |")  # the table comes last


def test_bench_step_rejects_unknown_preset():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_step.py"), "--dry_run", "--models", "7B"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown ['7B']" in proc.stderr


def test_profile_step_names_the_kernels_of_the_step():
    a, b = torch.randn(64, 48), torch.randn(48, 32)
    calls = []
    table = bench_step.profile_step(lambda: calls.append(torch.relu(a @ b)), rows=5)
    assert len(calls) == 1 and "aten::mm" in table and "aten::relu" in table
    rows = [line for line in table.splitlines() if line.strip().startswith("aten::")]
    assert 2 <= len(rows) <= 5  # row_limit


def test_scaling_dry_run_joins_one_and_n_gpu_plans(tmp_path):
    out = tmp_path / "runs" / "scaling.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scaling.py"), "--nproc", "8", "--dry_run",
                           "--models", "127M", "--optimizers", "dynmuon", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["opt"], r["world"], r["accum_1"], r["accum_n"]) for r in rows] == [
        ("127M", "dynmuon", 8, 8, 1)]
    assert rows[0]["efficiency"] is None  # a dry run times nothing
    assert sorted(p.name for p in out.parent.iterdir()) == ["scaling.json", "scaling_1gpu.json", "scaling_8gpu.json"]
    assert proc.stdout.rstrip().splitlines()[-1].lstrip().startswith("127M | dynmuon | 64 |       8/1")


def test_scaling_efficiency_is_per_gpu_throughput_ratio():
    def run(world, tokens_s):
        return dict(rows=[dict(model="601M", opt="muon", world=world, micro_batch=64, accum=8 // world, ms_step=1.0,
                               tokens_s_gpu=tokens_s, peak_gib=90.0, dyn_over_muon=None)])
    (row,) = scaling.join_rows(run(1, 1000.0), run(2, 950.0))
    assert row["efficiency"] == 0.95 and (row["accum_1"], row["accum_n"]) == (8, 4)
    assert "95.0%" in scaling.format_table([row])


def test_scaling_rejects_flags_it_does_not_pass_on():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "scaling.py"), "--nproc", "2", "--bogus_flag", "8"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a bench_step.py flag passed on" in proc.stderr
