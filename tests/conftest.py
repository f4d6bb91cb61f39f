"""Shared fixtures: a tiny learnable token stream in shards, and a runner for the trainer."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused kernels run on CPU, before triton loads

import train_gpt  # noqa: E402

TINY_VOCAB = 256


def markov_tokens(n, vocab=TINY_VOCAB, seed=0):
    """A low-entropy Markov chain: each token has 2 likely successors, so a tiny model learns it fast."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 2))
    picks = rng.integers(0, 2, size=n)
    out = np.empty(n, dtype=np.int64)
    out[0] = 0
    for i in range(1, n):
        out[i] = successors[out[i - 1], picks[i]]
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_data")
    tokens = markov_tokens(60_000)
    train_gpt.write_shard(d / "fineweb_val_000000.bin", tokens[:8_000])
    train_gpt.write_shard(d / "fineweb_train_000001.bin", tokens[8_000:34_000])
    train_gpt.write_shard(d / "fineweb_train_000002.bin", tokens[34_000:])
    return d


def tiny_flags(data_dir, log_dir, **overrides):
    """Flags of a tiny CPU run: 2 layers, d=32, 16-token sequences, 8 sequences per step."""
    flags = dict(model="tiny", model_dim=32, n_head=2, vocab_size=TINY_VOCAB, device="cpu",
                 data_dir=data_dir, log_dir=log_dir, batch_size=8, device_batch_size=4, micro_batch_size=2,
                 sequence_length=16, num_iterations=12, val_loss_every=4, val_tokens=512, warmup_ratio=0.1,
                 run_name="run", lr=0.02, scalar_lr=0.01)
    flags.update(overrides)
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None and v is not False:
            out += [f"--{k}", str(v)]
    return out


def run_trainer(flags, nproc=1, timeout=300, check=True, env_extra=None):
    """Run train_gpt.py as a process (or under torchrun with nproc gloo ranks)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "train_gpt.py"), *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "train_gpt.py"), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_cli(monkeypatch, capsys, *flags):
    """train_gpt's command line in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_gpt.py", *map(str, flags)])
    with pytest.raises(SystemExit) as exit_info:
        train_gpt.cli()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def read_events(log_dir, run_name="run"):
    import json
    lines = (Path(log_dir) / f"{run_name}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(log_dir, run_name="run"):
    return [(e["step"], e["train_loss"]) for e in read_events(log_dir, run_name) if e["event"] == "train"]


def val_losses(log_dir, run_name="run"):
    return [(e["step"], e["val_loss"]) for e in read_events(log_dir, run_name) if e["event"] == "val"]
