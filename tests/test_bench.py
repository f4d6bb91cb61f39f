"""bench/ scripts on CPU: the planned configurations and FLOPs (the timings need a GPU)."""
import json
import subprocess
import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_step  # noqa: E402


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
    table = bench_step.profile_step(lambda: a @ b, rows=5)
    assert "aten::mm" in table
