"""Never lose a run: kill / SIGTERM / corruption, then resume bitwise; bad inputs refused with exit 2."""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, read_events, run_trainer, tiny_flags, train_losses, val_losses
import train_gpt as tg

RUN = dict(num_iterations=24, val_loss_every=6, model_dim=64, sequence_length=32, batch_size=8,
           device_batch_size=4, micro_batch_size=4)


def start(flags, nproc=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([sys.executable, *launcher, str(REPO / "train_gpt.py"), *flags], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_tree(pid):
    """SIGKILL pid and every process below it: torchrun's workers run in sessions of their own, so killing
    torchrun's process group leaves them running (orphaned) to finish the run."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(path, proc, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"trainer ended early: {proc.communicate()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def snapshot(*dirs):
    """sha256 of every file under the given folders."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs if d.exists()
            for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".lock"}  # a lock records its last holder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """An uninterrupted run, with checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("reference")
    run_trainer(tiny_flags(tiny_data, out / "logs", checkpoint_dir=out / "ckpt", checkpoint_freq=4, **RUN))
    assert [p.name for p in sorted((out / "ckpt").glob("step_*.pt"))] == [  # --keep_checkpoints 3
        "step_000016.pt", "step_000020.pt", "step_000024.pt"]
    return out


def assert_same_run(logs, reference):
    assert train_losses(logs) == train_losses(reference / "logs")
    assert val_losses(logs) == val_losses(reference / "logs")


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, tiny_data, reference, nproc):
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=4,
                       resume="auto", **RUN)
    proc = start(flags, nproc)
    wait_for(tmp_path / "ckpt" / "step_000012.json", proc)
    kill_tree(proc.pid)
    proc.wait()
    time.sleep(2)  # a survivor would write its next checkpoint (every 4 steps) within this
    assert not (tmp_path / "ckpt" / "step_000024.json").exists()  # really killed mid-way
    out = run_trainer(flags, nproc=nproc)
    assert "resumed from" in out.stdout
    assert_same_run(tmp_path / "logs", reference)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # what a kill mid-write leaves is removed at the next start
    assert all(j.with_suffix(".pt").exists() for j in (tmp_path / "ckpt").glob("step_*.json"))
    lines = (tmp_path / "logs" / "run.txt").read_text().splitlines()
    assert sum(l.startswith("step:24/24 val_loss") for l in lines) == 1  # log cut back, then appended


def test_sigterm_checkpoints_and_resumes(tmp_path, tiny_data, reference):
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=100,
                       resume="auto", **RUN)
    proc = start(flags)
    wait_for(tmp_path / "logs" / "run.jsonl", proc)
    while True:
        try:
            if len(train_losses(tmp_path / "logs")) >= 2:
                break
        except ValueError:  # a line caught half-written
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    saved = sorted((tmp_path / "ckpt").glob("step_*.pt"))
    assert len(saved) == 1 and "rerun with --resume auto" in stdout
    run_trainer(flags)
    assert_same_run(tmp_path / "logs", reference)


def children(pid):
    """Process ids of pid's children (Linux /proc)."""
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


@pytest.mark.parametrize("target", ["one_rank", "launcher_and_ranks"])
def test_sigterm_to_some_or_all_processes_of_two_ranks(tmp_path, tiny_data, reference, target):
    """one_rank: the other rank learns of it at the step's all-reduce and both checkpoint the same step.
    launcher_and_ranks (a job scheduler's stop): every rank gets the signal twice, from the scheduler and
    from torchrun, and still checkpoints once. Resuming then gives the uninterrupted run."""
    moved_data = tmp_path / "moved_data"  # the resumed run reads a copy: a moved folder is the same data
    shutil.copytree(tiny_data, moved_data)
    flags = dict(checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=100, resume="auto", **RUN)
    proc = start(tiny_flags(tiny_data, tmp_path / "logs", **flags), nproc=2)
    wait_for(tmp_path / "logs" / "run.jsonl", proc)
    deadline = time.time() + 240
    while len((tmp_path / "logs" / "run.txt").read_text().split("train_loss")) < 3:  # 2 steps done
        assert proc.poll() is None and time.time() < deadline, "the trainer ended or stalled before step 2"
        time.sleep(0.01)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    for pid in ranks[:1] if target == "one_rank" else [proc.pid, *ranks]:
        os.kill(pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    # torchrun prints a traceback of its own (a child exited non-zero); the ranks must not
    assert not re.search(r"^\[rank\d\]:.*(Traceback|KeyboardInterrupt)", stderr, re.M), stderr
    (saved,) = sorted((tmp_path / "ckpt").glob("step_*.pt"))
    assert f"stopped: signal 15 at step {int(saved.stem[5:])}" in (tmp_path / "logs" / "run.txt").read_text()
    run_trainer(tiny_flags(moved_data, tmp_path / "logs", **flags), nproc=2)
    assert_same_run(tmp_path / "logs", reference)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, tiny_data, reference):
    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    shutil.copytree(reference / "logs", tmp_path / "logs")
    for step in (24, 20):  # newest: bytes flipped; next: truncated
        pt = tmp_path / "ckpt" / f"step_{step:06d}.pt"
        data = bytearray(pt.read_bytes())
        if step == 24:
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        pt.write_bytes(bytes(data))
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=4,
                       resume="auto", **RUN)
    out = run_trainer(flags)
    assert out.stdout.count("skipping checkpoint") == 2 and "resumed from" in out.stdout
    assert "step_000016.pt at step 16" in out.stdout
    assert_same_run(tmp_path / "logs", reference)


def test_resume_auto_without_checkpoint_starts_again_and_keeps_earlier_logs(tmp_path, tiny_data, reference):
    """An attempt that died before its first checkpoint left only logs: rerunning the same command starts at
    step 0 and renames those logs instead of refusing (or overwriting) them."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "run.txt").write_text("attempt 1 text log\n")
    (logs / "run.jsonl").write_text('{"attempt": 1}\n')
    (logs / "run.attempt1.txt").write_text("attempt 0 text log\n")  # an older set-aside log is kept too
    flags = tiny_flags(tiny_data, logs, checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=4, resume="auto", **RUN)
    out = run_trainer(flags)
    assert "no checkpoint to resume" in out.stdout and "run.attempt2.txt" in out.stdout
    assert (logs / "run.attempt2.txt").read_text() == "attempt 1 text log\n"
    assert (logs / "run.attempt2.jsonl").read_text() == '{"attempt": 1}\n'
    assert (logs / "run.attempt1.txt").read_text() == "attempt 0 text log\n"
    assert_same_run(logs, reference)


@pytest.mark.parametrize("nproc", [1, 2])
def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path, tiny_data, nproc):
    """Every rank names the checkpoint written before the loss went non-finite (rank 1 used to say 'none'),
    and so does the log's last line."""
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=1,
                       optimizer="adamw", lr=1e20, scalar_lr=1e20, weight_decay=0, warmup_ratio=0, **RUN)
    proc = run_trainer(flags, nproc=nproc, check=False)
    newest = sorted((tmp_path / "ckpt").glob("step_*.pt"))[-1]
    message = f"non-finite train loss (nan) at step 2; last good checkpoint: {newest}"
    assert proc.stderr.count(f"error: {message}") == nproc, proc.stderr  # ranks' lines may interleave
    assert proc.returncode == 3 or nproc > 1  # torchrun's own status is 1
    if nproc == 1:
        assert proc.stderr == f"error: {message}\n"
    assert (tmp_path / "logs" / "run.txt").read_text().splitlines()[-1] == f"stopped: {message}"
    stop = read_events(tmp_path / "logs")[-1]
    assert stop["event"] == "stop" and stop["exit_code"] == 3


@pytest.mark.parametrize("change,message", [
    (dict(model_dim=32), "--model_dim 64 (checkpoint) vs 32 (now)"),
    (dict(lr=0.05), "cannot resume: --lr"),
    (dict(optimizer="muon"), "--optimizer dynmuon (checkpoint) vs muon (now)"),
    (dict(dynmuon_tau=0.08), "--dynmuon_tau 0.04 (checkpoint) vs 0.08 (now)"),
    (dict(fp8="blocks"), "--fp8 none (checkpoint) vs blocks (now)"),  # FP8 matmuls change what is trained
    (dict(resume="CORRUPT"), "truncated or corrupt"),
    (dict(resume=None), "already exists: choose another --run_name"),
    (dict(resume=None, run_name="other"), "already holds checkpoints: use --resume auto"),
    ("ALL_CORRUPT", "none of them is usable"),
    ("OTHER_DATA", "cannot resume: the shards in --data_dir"),
])
def test_invalid_resume_exits_2_and_clobbers_nothing(tmp_path, tiny_data, reference, change, message):
    shutil.copytree(reference, tmp_path / "ref")
    ckpt, logs = tmp_path / "ref" / "ckpt", tmp_path / "ref" / "logs"
    bad = tmp_path / "bad.pt"
    bad.write_bytes((ckpt / "step_000024.pt").read_bytes()[:1000])
    (tmp_path / "bad.json").write_text((ckpt / "step_000024.json").read_text())
    if change == "ALL_CORRUPT":  # --resume auto finds no usable checkpoint among several
        for pt in ckpt.glob("step_*.pt"):
            pt.write_bytes(pt.read_bytes()[:1000])
        change = {}
    if change == "OTHER_DATA":  # the same shard names, one of them shortened
        other = tmp_path / "other_data"
        shutil.copytree(tiny_data, other)
        shard = sorted(other.glob("*_train_*.bin"))[-1]
        tg.write_shard(shard, np.array(tg.read_shard(shard)[:-1000]))  # a copy: not the memory map
        change = dict(data_dir=other)
    settings = {**RUN, "checkpoint_dir": ckpt, "checkpoint_freq": 4, "resume": "auto", **change}
    if settings["resume"] == "CORRUPT":
        settings["resume"] = bad
    before = snapshot(ckpt, logs)
    proc = run_trainer(tiny_flags(settings.pop("data_dir", tiny_data), logs, **settings), check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert snapshot(ckpt, logs) == before
