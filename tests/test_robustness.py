"""Never lose a run, part 2: one writer per run, folders checked before training, a full disk or an error part-way
stops with one line (also the log's last line) and leaves every earlier checkpoint and log line as it was.

Stand-ins: a full disk is a file-size limit (RLIMIT_FSIZE with SIGXFSZ ignored, set in the child before exec:
writes past it fail with EFBIG, as ENOSPC would); a folder that cannot be written is a path under a file (ENOTDIR,
works as root, where chmod does not), and a read-only bind mount (EROFS) where this process may mount (root);
host memory running out is an address-space limit (RLIMIT_AS)."""
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, markov_tokens, read_events, run_cli, run_trainer, tiny_flags, train_losses, val_losses
import train_gpt as tg

RUN = dict(num_iterations=24, val_loss_every=6, model_dim=64, sequence_length=32, batch_size=8,
           device_batch_size=4, micro_batch_size=4)


def trainer(flags, fsize=None, address_space=None, timeout=300):
    """train_gpt.py as a process, optionally under a file-size or address-space limit."""
    def limits():
        if fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py"), *map(str, flags)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO, preexec_fn=limits)


def sha(path, upto=None):
    return hashlib.sha256(path.read_bytes()[:upto]).hexdigest()


def snapshot(folder):
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.suffix != ".lock"}


def one_line(err):
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    return err.strip()


def last_stop(logs, code, reason=None):
    """The .jsonl ends with the stop event; the .txt with its `stopped:` line when reason is given."""
    last = read_events(logs)[-1]
    assert last["event"] == "stop" and last["exit_code"] == code, last
    if reason is not None:
        assert (logs / "run.txt").read_text().splitlines()[-1] == f"stopped: {last['reason']}"
        assert reason in last["reason"]
    return last["reason"]


def no_leftovers(ckpt):
    assert not list(ckpt.glob("*.tmp"))
    assert all(j.with_suffix(".pt").exists() for j in ckpt.glob("step_*.json"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """An uninterrupted run with checkpoints every 4 steps (16, 20, 24 kept)."""
    out = tmp_path_factory.mktemp("reference")
    run_trainer(tiny_flags(tiny_data, out / "logs", checkpoint_dir=out / "ckpt", checkpoint_freq=4, **RUN))
    return out


@pytest.fixture
def killed_after_16(tmp_path, reference):
    """The folders of the reference run as if it had been killed right after its checkpoint at step 16."""
    shutil.copytree(reference / "ckpt", tmp_path / "ckpt")
    shutil.copytree(reference / "logs", tmp_path / "logs")
    for step in (20, 24):
        for ext in (".pt", ".json"):
            (tmp_path / "ckpt" / f"step_{step:06d}{ext}").unlink()
    return tmp_path


def resume_flags(folder, tiny_data, **changes):
    return tiny_flags(tiny_data, folder / "logs", checkpoint_dir=folder / "ckpt", resume="auto",
                      **{**RUN, "checkpoint_freq": 4, **changes})


def log_offsets(ckpt_pt):
    return torch.load(ckpt_pt, weights_only=True)["log_offsets"]


# ---- one writer per run ----------------------------------------------------------------------------------------

def test_second_process_of_a_live_run_is_refused_and_the_first_loses_nothing(tmp_path, tiny_data):
    """Run A (--resume auto, empty checkpoint folder) is live. The same command (B1) is refused by the checkpoint
    folder's lock; the same run name with another checkpoint folder, under torchrun (B2), by the log's lock, on
    both ranks and without hanging. A then ends (SIGTERM) with every step and evaluation in its log."""
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=50,
                       resume="auto", num_iterations=100_000, val_loss_every=50)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(tmp_path / "a.out", "w") as a_out:
        a = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py"), *flags], cwd=REPO, env=env,
                             stdout=a_out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "logs" / "run.jsonl").exists() or "train_loss" not in (
                tmp_path / "logs" / "run.jsonl").read_text():
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.out").read_text()
            time.sleep(0.05)
        b1 = run_trainer(flags, check=False)
        assert b1.returncode == 2
        assert one_line(b1.stderr) == (
            f"error: {tmp_path / 'ckpt' / 'run.lock'}: this run is live in another process (host "
            f"{os.uname().nodename}, pid {a.pid}, since {json.loads((tmp_path / 'ckpt' / 'run.lock').read_text())['since']}"
            f"): wait for it to end, or give another --checkpoint_dir")
        started = time.time()
        b2 = run_trainer(tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=tmp_path / "ckpt_b",
                                    resume="auto", num_iterations=100_000, batch_size=8, device_batch_size=4),
                         nproc=2, check=False, timeout=120)
        assert b2.returncode != 0 and time.time() - started < 60
        refusal = f"{tmp_path / 'logs' / 'run.lock'}: this run is live in another process"
        assert b2.stderr.count(refusal) >= 2 and f"pid {a.pid}" in b2.stderr, b2.stderr  # rank 0, and rank 1
        assert a.poll() is None
    finally:
        a.send_signal(signal.SIGTERM)
        a.wait(timeout=120)
    assert a.returncode == 128 + signal.SIGTERM, (tmp_path / "a.out").read_text()
    logs = tmp_path / "logs"
    reason = last_stop(logs, 128 + signal.SIGTERM, "signal 15 at step")
    n = int(re.search(r"at step (\d+)", reason)[1])
    events = read_events(logs)
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, n + 1))
    assert [e["step"] for e in events if e["event"] == "val"] == list(range(0, n + 1, 50))
    txt = (logs / "run.txt").read_text()
    assert [int(s) for s in re.findall(r"^step:(\d+)/100000 val_loss", txt, re.M)] == list(range(0, n + 1, 50))
    assert sorted(p.name for p in logs.iterdir()) == ["run.jsonl", "run.lock", "run.txt"]  # nothing set aside
    assert (tmp_path / "ckpt" / f"step_{n:06d}.pt").exists()
    no_leftovers(tmp_path / "ckpt")


def test_lock_names_its_holder_and_goes_with_it(monkeypatch, capsys, tmp_path, tiny_data):
    """The lock file says who holds it; closing the holder's descriptor (what the OS does when a process dies,
    even by SIGKILL) frees it: no stale lock. The trainer's own lock records this process."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    fd = os.open(ckpt / "run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps(dict(host="node7", pid=4242, since="2026-01-01 00:00:00")).encode())
    flags = tiny_flags(tiny_data, tmp_path / "logs", checkpoint_dir=ckpt, resume="auto", num_iterations=4)
    code, out, err = run_cli(monkeypatch, capsys, *flags)
    assert code == 2 and one_line(err) == (
        f"error: {ckpt / 'run.lock'}: this run is live in another process (host node7, pid 4242, since 2026-01-01 "
        f"00:00:00): wait for it to end, or give another --checkpoint_dir")
    assert not (tmp_path / "logs").exists() and out == ""  # refused before anything else
    os.close(fd)
    code, out, err = run_cli(monkeypatch, capsys, *flags)
    assert code == 0, err
    for lock in (ckpt / "run.lock", tmp_path / "logs" / "run.lock"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        probe = os.open(lock, os.O_RDWR)
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at the end of the run
        os.close(probe)


# ---- folders checked before training ---------------------------------------------------------------------------

@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only bind mount (EROFS even for root); skipped where this process may not mount."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a read-only bind mount")
    if subprocess.run(["mount", "--bind", src, ro], capture_output=True).returncode != 0:
        pytest.skip("mount --bind is not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", ro], capture_output=True).returncode != 0:
            pytest.skip("read-only remount is not permitted here")
        yield ro
    finally:
        subprocess.run(["umount", ro], capture_output=True)


@pytest.mark.parametrize("kind", ["not_a_dir", "read_only"])
@pytest.mark.parametrize("folder", ["log_dir", "checkpoint_dir"])
def test_unwritable_folder_is_refused_before_training(monkeypatch, capsys, request, tmp_path, tiny_data, kind,
                                                      folder):
    if kind == "not_a_dir":
        (tmp_path / "a_file").write_text("")
        bad, reason = tmp_path / "a_file" / "sub", "Not a directory (ENOTDIR)"
    else:
        bad, reason = request.getfixturevalue("read_only_dir"), "Read-only file system (EROFS)"
    dirs = {"log_dir": tmp_path / "logs", "checkpoint_dir": tmp_path / "ckpt", folder: bad}
    flags = tiny_flags(tiny_data, dirs["log_dir"], checkpoint_dir=dirs["checkpoint_dir"], checkpoint_freq=4)
    code, out, err = run_cli(monkeypatch, capsys, *flags)
    assert code == 2
    assert one_line(err) == f"error: cannot write in --{folder} {bad}: {reason}; give a writable folder"
    assert "step:" not in out  # before any training
    assert not (tmp_path / "logs" / "run.txt").exists() and not list((tmp_path / "ckpt").glob("step_*"))


def test_too_little_space_for_two_checkpoints_is_a_warning(monkeypatch, tmp_path):
    args = tg.resolve_config(["--model", "tiny", "--device", "cpu", "--log_dir", str(tmp_path / "logs"),
                              "--checkpoint_dir", str(tmp_path / "ckpt"), "--run_name", "r"])
    with torch.device("meta"):
        model = tg.build_model(args)
    size = tg.checkpoint_bytes(args, model)
    assert f"checkpoint: {size / 2 ** 30:.2f} GiB each, 3 kept" in tg.run_cost(args, 1, model)  # --dry_run's
    (tmp_path / "ckpt").mkdir()
    said = []
    try:
        monkeypatch.setattr(tg.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 0, 2 ** 30))
        tg.claim_log_dir(args, model, said.append)
        assert said == []
        tg.release_run_locks()
        monkeypatch.setattr(tg.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 12, 0, size))
        tg.claim_log_dir(args, model, said.append)
    finally:
        tg.release_run_locks()
    (warning,) = said
    assert warning.startswith(f"warning: {tmp_path / 'ckpt'} has {tg.byte_text(size)} free, but two checkpoints "
                              f"of this run take {tg.byte_text(2 * size)}: {tg.byte_text(size)} missing")


# ---- a full disk part-way -------------------------------------------------------------------------------------

def test_disk_full_at_a_checkpoint_keeps_the_last_one(killed_after_16, tiny_data, reference):
    """--resume auto under a size limit smaller than a checkpoint: exit 4 at step 20, one line naming the last good
    checkpoint; it, the log up to it, and nothing else is there (no .tmp). With space again the run completes
    as if never stopped."""
    ckpt, logs = killed_after_16 / "ckpt", killed_after_16 / "logs"
    before, (txt_off, jsonl_off) = snapshot(ckpt), log_offsets(ckpt / "step_000016.pt")
    txt_sha, jsonl_sha = sha(logs / "run.txt", txt_off), sha(logs / "run.jsonl", jsonl_off)
    proc = trainer(resume_flags(killed_after_16, tiny_data), fsize=600_000)  # a checkpoint is ~1.2 MB
    assert proc.returncode == 4, proc.stderr
    assert one_line(proc.stderr) == (
        f"error: cannot write {ckpt / 'step_000020.pt'}: File too large (EFBIG); no partial file is left, the last "
        f"good checkpoint, {ckpt / 'step_000016.pt'}, is intact: free space, then rerun with --resume auto")
    assert snapshot(ckpt) == before
    no_leftovers(ckpt)
    assert sha(logs / "run.txt", txt_off) == txt_sha and sha(logs / "run.jsonl", jsonl_off) == jsonl_sha
    last_stop(logs, 4, "cannot write")
    run_trainer(resume_flags(killed_after_16, tiny_data))
    assert train_losses(logs) == train_losses(reference / "logs")
    assert val_losses(logs) == val_losses(reference / "logs")


def test_disk_full_while_logging(killed_after_16, tiny_data):
    """The size limit is reached by the .txt log two lines after the resume point: exit 4 with one line, the
    .txt holds whole lines only and all of those before, the checkpoints are untouched, the .jsonl has the stop."""
    ckpt, logs = killed_after_16 / "ckpt", killed_after_16 / "logs"
    before, (txt_off, jsonl_off) = snapshot(ckpt), log_offsets(ckpt / "step_000016.pt")
    txt_sha = sha(logs / "run.txt", txt_off)
    resumed = f"resumed from {ckpt / 'step_000016.pt'} at step 16\n"
    proc = trainer(resume_flags(killed_after_16, tiny_data), fsize=txt_off + len(resumed) + 130)  # + a train line
    assert proc.returncode == 4, proc.stderr
    assert one_line(proc.stderr) == (
        f"error: cannot write the log {logs / 'run.txt'}: File too large (EFBIG); its earlier lines are intact: "
        f"free space (or give another --log_dir), then rerun with --resume auto")
    txt = (logs / "run.txt").read_bytes()
    assert sha(logs / "run.txt", txt_off) == txt_sha and txt.endswith(b"\n")
    assert [line.split(b" ")[0] for line in txt[txt_off:].splitlines()] == [b"resumed", b"step:17/24"]
    assert snapshot(ckpt) == before
    no_leftovers(ckpt)
    last_stop(logs, 4)


def test_leftovers_of_a_killed_checkpoint_write_are_removed(killed_after_16, tiny_data, reference):
    """What a SIGKILL in the middle of writing or rotating checkpoints leaves (made by hand here: a .pt.tmp, a
    .json.tmp, a .json whose .pt was removed) goes at the next start, in one line; the run resumes as usual."""
    ckpt = killed_after_16 / "ckpt"
    (ckpt / "step_000020.pt.tmp").write_bytes(b"\0" * 1000)
    (ckpt / "step_000020.json.tmp").write_text("{")
    (ckpt / "step_000012.json").write_text((ckpt / "step_000016.json").read_text())
    out = run_trainer(resume_flags(killed_after_16, tiny_data)).stdout
    assert f"removed 3 leftover(s) of an interrupted checkpoint write in {ckpt}: step_000012.json, " \
           f"step_000020.json.tmp, step_000020.pt.tmp\n" in out
    no_leftovers(ckpt)
    assert train_losses(killed_after_16 / "logs") == train_losses(reference / "logs")


# ---- errors go into the log ------------------------------------------------------------------------------------

def test_bad_token_in_a_later_shard_stops_with_the_log_saying_so(monkeypatch, capsys, tmp_path, tiny_data):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_data / "fineweb_val_000000.bin", data)
    tg.write_shard(data / "fineweb_train_000001.bin", markov_tokens(3 * 8 * 16 + 1))  # 3 steps
    bad = markov_tokens(2000)
    bad[1000] = 300  # >= --vocab_size 256
    tg.write_shard(data / "fineweb_train_000002.bin", bad)
    code, out, err = run_cli(monkeypatch, capsys, *tiny_flags(data, tmp_path / "logs"))
    assert code == 2
    assert one_line(err) == f"error: {data / 'fineweb_train_000002.bin'}: holds token id 300, but --vocab_size is " \
                            f"256: the shard was made with another tokenizer (use GPT-2's) or --vocab_size is too small"
    assert last_stop(tmp_path / "logs", 2, "holds token id 300") == err.strip()[len("error: "):]
    assert train_losses(tmp_path / "logs")[-1][0] == 3


def test_out_of_host_memory_names_the_batch_flags(tmp_path):
    """The issue's case: --model tiny on CPU at the GPU batch (micro-batches of 64 x 1024 tokens: 13 GB of
    logits), with the address space limited to 2 GiB more than torch needs to start."""
    data = tmp_path / "data"
    data.mkdir()
    tokens = markov_tokens(70_000)
    tg.write_shard(data / "fineweb_val_000000.bin", tokens[:2_000])
    tg.write_shard(data / "fineweb_train_000001.bin", tokens[2_000:])
    peak = subprocess.run([sys.executable, "-c", "import torch; print(open('/proc/self/status').read())"],
                          capture_output=True, text=True, check=True).stdout
    base = int(re.search(r"VmPeak:\s+(\d+) kB", peak)[1]) * 1024
    flags = ["--model", "tiny", "--device", "cpu", "--data_dir", data, "--log_dir", tmp_path / "logs", "--run_name",
             "run", "--batch_size", 64, "--device_batch_size", 64, "--sequence_length", 1024, "--val_tokens", 1024,
             "--num_iterations", 2]
    proc = trainer(flags, address_space=base + 2 * 2 ** 30)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert one_line(proc.stderr) == (
        "error: out of host memory at --micro_batch_size 64 x --sequence_length 1024: rerun with "
        "--micro_batch_size 32 (same math) or a smaller --batch_size / --sequence_length")
    last_stop(tmp_path / "logs", 3, "out of host memory")


def test_cpu_oom_error_in_process(monkeypatch, tmp_path, tiny_data):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 13194139533312 bytes.")
    monkeypatch.setattr(tg, "train_step", oom)
    with pytest.raises(tg.TrainingError, match=r"out of host memory at --micro_batch_size 2 x --sequence_length "
                                               r"16: rerun with --micro_batch_size 1 "):
        tg.main(tiny_flags(tiny_data, tmp_path / "logs"))
    assert read_events(tmp_path / "logs")[-1]["exit_code"] == 3


# ---- flags nobody can use --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--checkpoint_freq", "5"], "--checkpoint_freq 5 without --checkpoint_dir would write no checkpoint"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1 (the newest is the one to resume), got 0"),
    (["--checkpoint_freq", "-2"], "--checkpoint_freq must be >= 0 (0: only at the end), got -2"),
    (["--val_tokens", "1000"], "--val_tokens 1000 is not a multiple of --sequence_length 256: give 768"),
    (["--micro_batch_size", "16"], "--micro_batch_size 16 must divide each process's share"),
    (["--p_switch_step", "-1"], "--p_switch_step must be >= 0 (a step of the run), got -1"),
    (["--warmup_ratio", "1.5", "--warmdown_ratio", "0"], "--warmup_ratio is a fraction of --num_iterations: give a "
                                                         "value in [0, 1], got 1.5"),
    (["--warmdown_ratio", "-0.1"], "--warmdown_ratio is a fraction"),
    (["--ddp_bucket_mb", "0"], "--ddp_bucket_mb must be > 0"),
    (["--target_loss", "0"], "--target_loss must be > 0 (a cross-entropy loss), got 0.0"),
    (["--target_loss", "nan"], "--target_loss must be a finite number, got nan"),
    (["--lr", "inf", "--weight_decay", "0"], "--lr must be a finite number, got inf"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--rope_base", "0"], "--rope_base must be > 0, got 0.0"),
    (["--arch", "qwen", "--mlp_hidden", "-8"], "--mlp_hidden must be positive, got -8"),
    (["--attention", "cudnn"], "--attention cudnn needs CUDA: on --device cpu use auto, math or flash"),
    (["--run_name", "a/b"], "--run_name 'a/b' must be a file name"),
])
def test_flags_nobody_can_use_are_refused(monkeypatch, capsys, flags, message):
    code, _, err = run_cli(monkeypatch, capsys, "--device", "cpu", "--model", "tiny", *flags)
    assert code == 2 and message in one_line(err), err


# ---- CPU presets -----------------------------------------------------------------------------------------------

def test_cpu_preset_fits_a_laptop_unless_the_batch_is_given(monkeypatch, capsys):
    parser = tg.build_arg_parser()
    assert [parser.get_default(f) for f in tg.CPU_BATCH_DEFAULTS] == [512, 64, 1024, 10_485_760]  # GPU defaults
    code, out, _ = run_cli(monkeypatch, capsys, "--help")
    assert code == 0
    assert ("global batch, in sequences per optimizer step (8 on --device cpu unless given) (default: 512)"
            in re.sub(r"\s+", " ", out))
    args = tg.resolve_config(["--model", "tiny", "--device", "cpu"])
    assert (args.batch_size, args.device_batch_size, args.micro_batch_size, args.sequence_length,
            args.val_tokens) == (8, 8, 8, 256, 131_072)
    args = tg.resolve_config(["--device", "cpu", "--batch_size", "64", "--sequence_length", "1024"])
    assert (args.batch_size, args.device_batch_size, args.sequence_length) == (64, 8, 1024)
    assert tg.resolve_config(["--device", "cpu", "--sequence_length", "100"]).val_tokens == 131_000
    assert tg.resolve_config(["--device", "cpu", "--micro_batch_size", "2"]).micro_batch_size == 2


# ---- console ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("interval", [0.0, None])
def test_console_start_summary_and_progress_when_not_a_terminal(monkeypatch, capsys, tmp_path, tiny_data, interval):
    if interval is not None:
        monkeypatch.setattr(tg, "PROGRESS_INTERVAL_S", interval)
    code, out, err = run_cli(monkeypatch, capsys, *tiny_flags(tiny_data, tmp_path / "logs", target_loss=5.0,
                                                         checkpoint_dir=tmp_path / "ckpt", checkpoint_freq=4))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"log: {tmp_path / 'logs' / 'run.txt'} (and .jsonl); checkpoints: {tmp_path / 'ckpt'} "
                        f"(every 4 steps and at the end, newest 3 kept)")
    progress = [l for l in lines if l.startswith("run: step ")]
    assert len(progress) == (12 if interval == 0.0 else 0) and "\r" not in out
    vals = val_losses(tmp_path / "logs")
    best = min(vals, key=lambda sv: sv[1])
    reached = next((s for s, v in vals if v <= 5.0), None)
    assert re.fullmatch(
        rf"done: 12 steps; best val_loss {best[1]:.4f} at step {best[0]}; target 5\.0000 "
        + (f"reached at step {reached}" if reached is not None else "not reached")
        + rf"; train time [\d.]+ s, wall time [\d.]+ s \(this process\); log: {re.escape(str(tmp_path / 'logs'))}"
          rf"/run\.txt; last checkpoint: {re.escape(str(tmp_path / 'ckpt'))}/step_000012\.pt", lines[-1])
