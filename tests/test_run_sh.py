"""run.sh / experiments.sh: what `--list` prints, checked against the paper's settings and the trainer's parser.

    pytest tests/test_run_sh.py

Only `--list` (and errors) are exercised: nothing is downloaded or trained, so it runs on CPU in seconds.
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

EXPERIMENTS = {  # name -> number of runs
    "main_table": 18, "lr_sweep": 10, "pmin_ablation": 3, "tauw_ablation": 9, "schedule_ablation": 4,
    "svd_vs_taylor": 2, "fineweb_edu": 2, "token_budget": 8, "seeds": 6, "normuon": 2, "qwen": 2,
}
CONSTANT_ENV = ("MODEL", "OPT", "TOKENS", "BATCH_SIZE", "DEVICE_BATCH_SIZE", "SEQ_LEN", "LR", "WD", "MU",
                "SCALAR_LR", "PMAX", "PMIN", "TAU", "W", "WARMUP", "WARMDOWN", "VAL_EVERY", "VAL_TOKENS", "SEED",
                "CHECKPOINT_FREQ", "LOG_DIR", "RUN_NAME", "MICRO_BATCH", "NUM_ITERATIONS", "DATA_VARIANT",
                "DATA_ROOT", "NPROC", "CUDA_VISIBLE_DEVICES")


def run_sh(*args, **env):
    """Run ./run.sh with a clean set of constants plus `env`; NPROC=8 unless given."""
    full = {k: v for k, v in os.environ.items() if k not in CONSTANT_ENV}
    full.update({"NPROC": "8", **env})
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], capture_output=True, text=True, env=full,
                          cwd=REPO, timeout=60)


def listing(*args, **env):
    """The lines of `--list` output (asserting success)."""
    proc = run_sh(*args, "--list", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def train_lines(lines):
    return [line for line in lines if "train_gpt.py" in line]


def trainer_flags(line):
    words = shlex.split(line)
    return words[words.index("train_gpt.py") + 1:]


def flag(line, name):
    """The value of the last `name` flag in a command line (argparse keeps the last)."""
    words = trainer_flags(line)
    idx = [i for i, w in enumerate(words) if w == name]
    assert idx, f"{name} missing from {line}"
    return words[idx[-1] + 1]


# ----------------------------------------------------------------------------- experiments

@pytest.mark.parametrize("name,n_runs", sorted(EXPERIMENTS.items()))
def test_experiment_lists_one_command_per_run(name, n_runs):
    lines = listing(name)
    assert len(lines) == n_runs, lines
    for line in lines:  # one line per run, the full command and nothing else
        assert line.startswith("torchrun --standalone --nproc_per_node=8 train_gpt.py "), line
        assert flag(line, "--log_dir") == f"logs/{name}"
        assert flag(line, "--checkpoint_dir") == f"checkpoints/{name}/{flag(line, '--run_name')}"
        assert flag(line, "--resume") == "auto"
        assert flag(line, "--checkpoint_freq") == "1000"
    names = [flag(line, "--run_name") for line in lines]
    assert len(set(names)) == n_runs, "run names must be unique within an experiment"


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_listed_command_parses_with_the_trainer(name, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # as torchrun sets it: the default micro-batch divides a rank's share
    for line in listing(name):
        args = train_gpt.resolve_config(trainer_flags(line))
        train_gpt.validate_flags(args, world_size=8)  # presets, batch divisibility
        assert args.batch_size == 512 and args.sequence_length == 1024 and args.device_batch_size == 64
        assert args.batch_size % (args.device_batch_size * 8) == 0
        assert (args.batch_size // 8) % args.micro_batch_size == 0


def test_default_constants_present():
    (line,) = train_lines(listing())
    for text in ("--batch_size 512", "--sequence_length 1024", "--device_batch_size 64",
                 "--num_iterations 20000", "--weight_decay 0.01", "--mu 0.95", "--scalar_lr 0.001",
                 "--dynmuon_pmax 1", "--dynmuon_pmin -0.25", "--dynmuon_tau 0.04", "--dynmuon_w 0.04",
                 "--warmup_ratio 0.01", "--warmdown_ratio 0.2", "--val_loss_every 50", "--val_tokens 10485760",
                 "--seed 0", "--optimizer dynmuon", "--model 127M", "--data_dir data/fineweb10B",
                 "--run_name dynmuon_127M_10B_seed0", "--checkpoint_dir checkpoints/dynmuon_127M_10B_seed0",
                 "--checkpoint_freq 1000", "--resume auto"):
        assert f" {text}" in line, text
    assert "--lr " not in line  # LR empty: the trainer's per-optimizer default


def test_main_table():
    lines = listing("main_table")
    for model in ("127M", "601M", "1.1B"):
        for opt in ("muon", "dynmuon", "adamw"):
            runs = [l for l in lines if flag(l, "--model") == model and flag(l, "--optimizer") == opt]
            assert sorted(flag(l, "--num_iterations") for l in runs) == ["20000", "38000"]
    for line in lines:
        long_run = flag(line, "--num_iterations") == "38000"
        assert flag(line, "--data_dir") == ("data/fineweb100B" if long_run else "data/fineweb10B")
        assert "--micro_batch_size" not in line  # the trainer's per-preset default
        micro = train_gpt.default_micro_batch(flag(line, "--model"), "cuda", int(flag(line, "--device_batch_size")),
                                              int(flag(line, "--batch_size")), gpu_gib=79.6)  # an H100
        assert micro == {"127M": 64, "601M": 32, "1.1B": 16}[flag(line, "--model")]
        assert ("--dynmuon_tau" in line) == (flag(line, "--optimizer") == "dynmuon")
    assert sum("--optimizer adamw" in l for l in lines) == 6


def test_lr_sweep():
    lines = listing("lr_sweep")
    for opt in ("muon", "dynmuon"):
        lrs = [flag(l, "--lr") for l in lines if flag(l, "--optimizer") == opt]
        assert lrs == ["0.003", "0.005", "0.01", "0.02", "0.04"]
    assert all(flag(l, "--model") == "127M" and flag(l, "--num_iterations") == "20000" for l in lines)


def test_ablations():
    assert [flag(l, "--dynmuon_pmin") for l in listing("pmin_ablation")] == ["-0.1", "-0.25", "-0.5"]
    pairs = {(flag(l, "--dynmuon_tau"), flag(l, "--dynmuon_w")) for l in listing("tauw_ablation")}
    assert pairs == {(t, w) for t in ("0.02", "0.04", "0.08") for w in ("0.02", "0.04", "0.08")}
    sched = listing("schedule_ablation")
    assert [flag(l, "--p_schedule") for l in sched] == ["logistic", "switch", "fixed", "reverse"]
    assert flag(sched[1], "--p_switch_step") == "500"
    assert all(flag(l, "--dynmuon_pmin") == "-0.25" and flag(l, "--dynmuon_pmax") == "1" for l in sched)
    assert [flag(l, "--spectral") for l in listing("svd_vs_taylor")] == ["taylor", "svd"]


def test_data_model_and_seed_experiments():
    edu = listing("fineweb_edu")
    assert [flag(l, "--optimizer") for l in edu] == ["muon", "dynmuon"]
    assert all(flag(l, "--data_dir") == "data/finewebedu10B" for l in edu)
    budget = listing("token_budget")
    assert all(flag(l, "--model") == "601M" for l in budget)
    for opt in ("muon", "dynmuon"):
        steps = [flag(l, "--num_iterations") for l in budget if flag(l, "--optimizer") == opt]
        assert steps == ["5000", "10000", "20000", "38000"]
    assert {flag(l, "--data_dir") for l in budget if flag(l, "--num_iterations") == "38000"} == {"data/fineweb100B"}
    seeds = listing("seeds")
    assert sorted((flag(l, "--optimizer"), flag(l, "--seed")) for l in seeds) == sorted(
        (o, s) for o in ("muon", "dynmuon") for s in ("0", "1", "42"))
    assert [flag(l, "--optimizer") for l in listing("normuon")] == ["normuon", "dynmuon"]
    for line in listing("qwen"):
        assert " --arch qwen --model qwen171M " in line and "--micro_batch_size" not in line


# ----------------------------------------------------------------------------- overrides and errors

def test_env_overrides():
    (line,) = train_lines(listing(LR="0.02"))
    assert " --lr 0.02 " in line
    (line,) = train_lines(listing(MODEL="601M", TOKENS="20B", OPT="muon", SEED="3", MICRO_BATCH="8"))
    for text in ("--model 601M", "--optimizer muon", "--num_iterations 38000", "--data_dir data/fineweb100B",
                 "--seed 3", "--micro_batch_size 8", "--run_name muon_601M_20B_seed3"):
        assert f" {text} " in line, text
    assert "--dynmuon_tau" not in line
    (line,) = train_lines(listing(MODEL="qwen171M"))
    assert " --arch qwen --model qwen171M " in line
    lines = listing("lr_sweep", NPROC="4", WD="0.025")
    assert all(l.startswith("torchrun --standalone --nproc_per_node=4 ") and flag(l, "--weight_decay") == "0.025"
               for l in lines)


def test_appended_args_come_last():
    (line,) = train_lines(listing("--num_iterations", "100", "--no_compile"))
    assert line.endswith(" --num_iterations 100 --no_compile")
    assert train_gpt.build_arg_parser().parse_args(trainer_flags(line)).num_iterations == 100
    for line in listing("seeds", "--val_loss_every", "250"):
        assert line.endswith(" --val_loss_every 250") and flag(line, "--val_loss_every") == "250"


def test_list_fetches_nothing_and_names_the_shards(tmp_path):
    lines = listing(DATA_ROOT=str(tmp_path))
    assert lines[0] == f"python3 data/cached_fineweb10B.py 103 --variant 10B --out_dir {tmp_path}/fineweb10B"
    assert not any(tmp_path.iterdir())
    lines = listing(DATA_ROOT=str(tmp_path), TOKENS="20B")
    assert lines[0].startswith("python3 data/cached_fineweb10B.py 200 --variant 100B ")  # ceil(38000*512*1024/1e8)


def test_unknown_experiment_exits_2():
    proc = run_sh("no_such_experiment", "--list")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown experiment" in proc.stderr and "main_table" in proc.stderr and "qwen" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_experiments():
    proc = run_sh("--help")
    assert proc.returncode == 0
    for name in EXPERIMENTS:
        assert f"  {name} " in proc.stdout


def test_cpu_fallback_list(tmp_path):
    proc = run_sh("--list", NPROC="0", DATA_ROOT=str(tmp_path))
    assert proc.returncode == 0
    assert "no CUDA GPU" in proc.stderr
    gen, train = proc.stdout.splitlines()
    assert gen.startswith("python3 data/make_synthetic_shards.py --out_dir ")
    assert not any(tmp_path.iterdir())
    assert "torchrun" not in train
    args = train_gpt.build_arg_parser().parse_args(trainer_flags(train))
    assert (args.model, args.device, args.data_dir) == ("tiny", "cpu", f"{tmp_path}/tiny_synthetic")
    assert args.val_tokens + 1 <= 262_145 and args.vocab_size == 50304  # synthetic ids span the GPT-2 vocab
    assert args.resume == "auto" and args.checkpoint_dir


def test_flags_the_trainer_refuses_stop_before_any_download(tmp_path):
    proc = run_sh(NPROC="3", DATA_ROOT=str(tmp_path))  # 512 sequences do not split over 3 GPUs x 64
    assert proc.returncode == 2, proc.stderr
    assert "must be a multiple of --device_batch_size 64 x 3 processes" in proc.stderr
    assert "nothing was downloaded or run" in proc.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_experiment_without_gpus_refuses():
    proc = run_sh("seeds", "--list", NPROC="0")
    assert proc.returncode == 2 and proc.stdout == "" and "NPROC" in proc.stderr


def test_nproc_from_cuda_visible_devices():
    env = {k: v for k, v in os.environ.items() if k not in CONSTANT_ENV}
    env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "--list"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "--nproc_per_node=4 " in proc.stdout
