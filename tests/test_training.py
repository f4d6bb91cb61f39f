"""The training loop end to end on CPU: loss falls, logs, targets, and gloo ranks == accumulation."""
import json
import re
import subprocess
import sys

import pytest

import train_gpt as tg
from conftest import REPO, read_events, run_trainer, tiny_flags, train_losses, val_losses


def test_tiny_run_loss_falls_and_logs(tmp_path, tiny_data):
    logs = tmp_path / "logs"
    proc = run_trainer(tiny_flags(tiny_data, logs, num_iterations=30, val_loss_every=10, target_loss=5.0))
    vals = val_losses(logs)
    assert [s for s, _ in vals] == [0, 10, 20, 30]
    assert vals[-1][1] < vals[0][1] - 1.0  # learns the Markov chain: 2.3 nats here; bf16 moves it by ~1e-3
    assert len(train_losses(logs)) == 30

    txt = (logs / "run.txt").read_text()
    assert txt.startswith((REPO / "train_gpt.py").read_text())  # the code of the run, first
    assert '"optimizer": "dynmuon"' in txt and '"python":' in txt and '"world_size": 1' in txt
    assert re.search(r"^step:30/30 val_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d\dms", txt, re.M)
    assert re.search(r"^step:1/30 train_loss:\d+\.\d{4} lr_mult:\S+ p:0\.\d{4} factor:[\d.]+/[\d.]+/[\d.]+ "
                     r"tokens/s:\d+", txt, re.M)
    for e in (e for e in read_events(logs) if e["event"] == "train"):  # DynMuon's effective LR factor
        assert 0 < e["factor_min"] <= e["factor_mean"] <= e["factor_max"], e
        if 0 <= e["p"] < tg.ANCHOR_RAW:
            assert e["factor_min"] == e["factor_max"] == 1.0  # the NS stage: Muon's step
    reached = [s for s, v in vals if v <= 5.0]
    expected = f"target:5.0000 reached_at_step:{reached[0]}" if reached else "target:5.0000 not_reached"
    assert txt.rstrip().endswith(expected)
    assert "val_loss" in proc.stdout  # console progress

    summary = subprocess.run([sys.executable, str(REPO / "records" / "compare.py"), str(logs / "run.txt"),
                              "--target", "5.0", "--json"], capture_output=True, text=True)
    assert summary.returncode == 0, summary.stderr
    row = json.loads(summary.stdout)["runs"][0]
    assert row["best_val_loss"] == pytest.approx(min(v for _, v in vals), abs=1e-4)  # printed to 4 decimals: 5e-5


@pytest.mark.parametrize("record,target", [
    ("modded_nanogpt_track3", "3.2800"),  # a records.json entry with a published target
    ("records/2026-11-23_prose127M_200steps/prose127M_muon_200.txt", "4.5824"),  # a log: its 80% val loss
])
def test_record_sets_the_target(tmp_path, tiny_data, record, target):
    logs = tmp_path / "logs"
    run_trainer(tiny_flags(tiny_data, logs, num_iterations=2, val_loss_every=2, record=record))
    assert re.search(rf"^target:{target} (reached_at_step:\d+|not_reached)$", (logs / "run.txt").read_text(), re.M)


@pytest.mark.parametrize("optimizer", ["dynmuon", "normuon"])
def test_two_gloo_ranks_equal_one_process_with_accumulation(tmp_path, tiny_data, optimizer):
    """Global batch of 4: one process runs 2 micro-batches of 2, two ranks run one each.
    The gradient averages are the same sums in the same order, so losses match bitwise."""
    flags = dict(batch_size=4, device_batch_size=2, micro_batch_size=2, num_iterations=8, optimizer=optimizer)
    run_trainer(tiny_flags(tiny_data, tmp_path / "one", **flags))
    run_trainer(tiny_flags(tiny_data, tmp_path / "two", **flags), nproc=2)
    assert train_losses(tmp_path / "two") == train_losses(tmp_path / "one")
    assert val_losses(tmp_path / "two") == val_losses(tmp_path / "one")


def test_eight_gloo_ranks_match_one_process(tmp_path, tiny_data):
    """The 8-rank code path (transform shards of uneven size across ranks, all-gather) on CPU."""
    flags = dict(batch_size=8, device_batch_size=1, micro_batch_size=1, num_iterations=3, val_loss_every=3)
    run_trainer(tiny_flags(tiny_data, tmp_path / "one", **flags))
    run_trainer(tiny_flags(tiny_data, tmp_path / "eight", **flags), nproc=8, timeout=600)
    one, eight = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
    assert [s for s, _ in eight] == [1, 2, 3]
    # 8 micro-batches summed in another order: equal up to float rounding, not bitwise. Step 1's loss is that sum
    # (8 x 2^-24 = 5e-7). Later ones follow updates from gradients a few 2^-24 apart, enough to move a bf16 rounding
    # of U, which Newton-Schulz carries on to ~1% of an update (test_optimizers): the loss moves by up to that share
    # of what the updates changed it (0.33 here): 1% x 0.33 / 5.75 = 6e-4, 2e-3; a wrong shard or gather is a wrong
    # update, off by the 0.07-0.26 a step moves the loss
    assert eight[0][1] == pytest.approx(one[0][1], rel=1e-5)
    assert [v for _, v in eight] == pytest.approx([v for _, v in one], rel=2e-3)


def test_ddp_takes_the_bucket_size_flag(tmp_path):
    import torch.distributed as dist
    import train_gpt as tg
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for flags, mb in (([], tg.DDP_BUCKET_MB), (["--ddp_bucket_mb", "3"], 3)):
            args = tg.resolve_config(["--model", "tiny", "--model_dim", "8", "--n_head", "2", "--device", "cpu",
                                      *flags])
            ddp = tg.wrap_model(tg.build_model(args), args, world=2, local=0, compile_model=False)
            assert ddp.bucket_bytes_cap == int(mb * 2 ** 20)
    finally:
        dist.destroy_process_group()


def test_more_ranks_than_batch_allows_is_refused(tmp_path, tiny_data):
    proc = run_trainer(tiny_flags(tiny_data, tmp_path / "logs", batch_size=4, device_batch_size=4), nproc=2,
                       check=False)
    assert proc.returncode != 0
    assert "must be a multiple of --device_batch_size 4 x 2 processes" in proc.stderr


def test_ranks_leave_without_interpreter_shutdown(tmp_path, tiny_data):
    """gloo's worker threads outlive destroy_process_group; an interpreter shutting down under them can abort a
    rank (SIGABRT, torchrun exit 1) after a finished run. So each rank leaves with os._exit once its log is
    closed: an atexit hook, which runs only in an interpreter's shutdown, must never fire in a rank."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import atexit, os, pathlib\n"
        "if 'LOCAL_RANK' in os.environ:  # a rank, not the torchrun launcher\n"
        f"    atexit.register(pathlib.Path({str(tmp_path)!r}, 'shutdown_' + os.environ['LOCAL_RANK']).touch)\n")
    proc = run_trainer(tiny_flags(tiny_data, tmp_path / "logs", num_iterations=4), nproc=2,
                       env_extra={"PYTHONPATH": str(hooks)})
    assert "done: 4 steps" in proc.stdout
    assert val_losses(tmp_path / "logs")[-1][0] == 4
    assert sorted(p.name for p in tmp_path.glob("shutdown_*")) == []


def test_two_ranks_match_plain_one_process(tmp_path, tiny_data):
    """--attention math on 2 gloo ranks, whose all-gathers of the optimizer run asynchronously, against the
    plain path in one process."""
    flags = dict(batch_size=4, device_batch_size=2, micro_batch_size=2, num_iterations=8)
    run_trainer(tiny_flags(tiny_data, tmp_path / "plain", **flags))
    run_trainer(tiny_flags(tiny_data, tmp_path / "fast", attention="math", **flags), nproc=2)
    plain, fast = train_losses(tmp_path / "plain"), train_losses(tmp_path / "fast")
    assert [s for s, _ in fast] == list(range(1, 9))
    # as with eight ranks: fp32 sums in other orders (attention, all-reduce) move bf16 roundings of U, NS carries
    # them to ~1% of an update, the loss moves by <= 1% of the ~1 nat the updates changed it over 8 steps: 2e-3
    assert [v for _, v in fast] == pytest.approx([v for _, v in plain], rel=2e-3)
    assert [v for _, v in val_losses(tmp_path / "fast")] == pytest.approx(
        [v for _, v in val_losses(tmp_path / "plain")], rel=2e-3)


def test_lion_scalar_optimizer_and_rms_norm_lr_train(tmp_path, tiny_data):
    """The paper's --scalar_opt lion and --adjust_lr rms_norm run end to end and still learn."""
    logs = tmp_path / "logs"
    run_trainer(tiny_flags(tiny_data, logs, num_iterations=20, val_loss_every=10, scalar_opt="lion",
                           adjust_lr="rms_norm", lr=0.005))
    vals = val_losses(logs)
    assert vals[-1][1] < vals[0][1] - 0.5
    config = next(e for e in read_events(logs) if e["event"] == "config")["config"]
    assert (config["scalar_opt"], config["adjust_lr"]) == ("lion", "rms_norm")


def test_wandb_logging_offline(tmp_path, tiny_data):
    """--wandb with WANDB_MODE=offline (as CI runs it): the run logs its config and metrics to a local wandb run."""
    pytest.importorskip("wandb", reason="wandb is optional; .ci/run installs it so that this runs in CI")
    logs = tmp_path / "logs"
    run_trainer(tiny_flags(tiny_data, logs, num_iterations=4, val_loss_every=2, wandb=True,
                           wandb_project_name="ci", wandb_job_name="tiny"),
                env_extra=dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
    wandb_files = [p for p in runs[0].rglob("*.wandb")]
    assert wandb_files and b"val_loss" in wandb_files[0].read_bytes()  # the metrics reached wandb's record
    assert len(val_losses(logs)) == 3  # the file logs are still written
