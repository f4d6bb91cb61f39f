"""run.sh / experiments.sh: the commands `--list` prints, the run names, and (on CPU) real runs of the tiny preset.

    pytest tests/test_run_sh.py

Listing downloads and trains nothing. The CPU tests run run.sh's no-GPU path (NPROC=0: the tiny model on
synthetic shards) for a few steps each, with data, logs and checkpoints under tmp_path.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

PY = sys.executable  # run.sh's PYTHON: the system python3 may have no torch
EXPERIMENTS = {  # name -> number of runs
    "main_table": 18, "lr_sweep": 10, "pmin_ablation": 3, "tauw_ablation": 9, "schedule_ablation": 4,
    "svd_vs_taylor": 2, "fineweb_edu": 2, "token_budget": 8, "seeds": 6, "normuon": 2, "qwen": 2,
    "decomposition": 25,
}
CONSTANT_ENV = ("MODEL", "OPT", "TOKENS", "SEED", "LR", "WD", "MU", "SCALAR_LR", "PMAX", "PMIN", "TAU", "W", "SPECTRAL",
                "WARMUP", "WARMDOWN", "BATCH_SIZE", "SEQ_LEN", "DEVICE_BATCH_SIZE", "MICRO_BATCH", "VAL_EVERY",
                "VAL_TOKENS", "NUM_ITERATIONS", "DATA_SEED", "DATA_VARIANT", "DATA_ROOT", "LOG_DIR",
                "CHECKPOINT_ROOT", "CHECKPOINT_FREQ", "RUN_NAME", "NPROC", "PYTHON", "LIST_CONFIG",
                "CUDA_VISIBLE_DEVICES", "WORLD_SIZE")
# what run.sh must pass to a GPU run; everything else is the trainer's default unless set
MUST_FLAGS = {"--model", "--optimizer", "--data_dir", "--num_iterations", "--seed", "--log_dir", "--run_name",
              "--checkpoint_dir", "--checkpoint_freq", "--resume"}


def clean_env(**env):
    full = {k: v for k, v in os.environ.items() if k not in CONSTANT_ENV}
    full.update({"PYTHON": PY, **env})
    return full


def run_sh(*args, repo=REPO, timeout=120, **env):
    """Run run.sh with a clean set of constants plus `env`; NPROC=8 and LIST_CONFIG=0 unless given."""
    env = {"NPROC": "8", "LIST_CONFIG": "0", **env}
    return subprocess.run(["bash", str(repo / "run.sh"), *args], capture_output=True, text=True,
                          env=clean_env(**env), cwd=repo, timeout=timeout)


def listing(*args, **env):
    """The lines of `--list` output (asserting success)."""
    proc = run_sh(*args, "--list", **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def train_lines(lines):
    return [line for line in lines if "train_gpt.py" in line and not line.startswith("#")]


def trainer_flags(line):
    words = shlex.split(line)
    return words[words.index("train_gpt.py") + 1:]


def flag(line, name, default=None):
    """The value of the last `name` flag in a command line (argparse keeps the last)."""
    words = trainer_flags(line)
    idx = [i for i, w in enumerate(words) if w == name]
    if not idx:
        assert default is not None, f"{name} missing from {line}"
        return default
    return words[idx[-1] + 1]


def run_name(line):
    return flag(line, "--run_name")


def flag_names(line):
    return {w for w in trainer_flags(line) if w.startswith("--")}


# ----------------------------------------------------------------------------- experiments

@pytest.mark.parametrize("name,n_runs", sorted(EXPERIMENTS.items()))
def test_experiment_lists_one_command_per_run(name, n_runs):
    lines = listing(name)
    assert len(lines) == n_runs, lines
    parser = train_gpt.build_arg_parser()
    for line in lines:  # one line per run, the full command and nothing else
        assert line.startswith("torchrun --standalone --nproc_per_node=8 train_gpt.py "), line
        assert flag(line, "--log_dir") == f"logs/{name}"
        assert flag(line, "--checkpoint_dir") == f"checkpoints/{name}/{run_name(line)}"
        assert flag(line, "--resume") == "auto" and flag(line, "--checkpoint_freq") == "1000"
        parser.parse_args(trainer_flags(line))  # every flag is the trainer's
    names = [run_name(line) for line in lines]
    assert len(set(names)) == n_runs, "run names must be unique within an experiment"


def test_experiments_pass_only_what_they_change():
    for line in listing("main_table"):
        assert flag_names(line) == MUST_FLAGS, line
    for line in listing("seeds") + listing("normuon") + listing("qwen") + listing("token_budget"):
        assert flag_names(line) == MUST_FLAGS, line
    for line in listing("lr_sweep"):
        assert flag_names(line) == MUST_FLAGS | {"--lr"}, line


def test_main_table():
    lines = listing("main_table")
    for model in ("127M", "601M", "1.1B"):
        for opt in ("muon", "dynmuon", "adamw"):
            runs = [l for l in lines if flag(l, "--model") == model and flag(l, "--optimizer") == opt]
            assert sorted(flag(l, "--num_iterations") for l in runs) == ["20000", "38000"]
            assert sorted(run_name(l) for l in runs) == [f"{opt}_{model}_10B_seed0", f"{opt}_{model}_20B_seed0"]
    for line in lines:
        long_run = flag(line, "--num_iterations") == "38000"
        assert flag(line, "--data_dir") == ("data/fineweb100B" if long_run else "data/fineweb10B")
        micro = train_gpt.default_micro_batch(flag(line, "--model"), "cuda", 64, 512, gpu_gib=79.6)  # an H100
        assert micro == {"127M": 64, "601M": 32, "1.1B": 16}[flag(line, "--model")]
    assert sum("--optimizer adamw" in l for l in lines) == 6


def test_lr_sweep():
    lines = listing("lr_sweep")
    for opt in ("muon", "dynmuon"):
        runs = [l for l in lines if flag(l, "--optimizer") == opt]
        assert [flag(l, "--lr") for l in runs] == ["0.003", "0.005", "0.01", "0.02", "0.04"]
        assert [run_name(l) for l in runs] == [f"{opt}_127M_10B_lr{lr}_seed0"
                                               for lr in ("0.003", "0.005", "0.01", "0.02", "0.04")]
    assert all(flag(l, "--model") == "127M" and flag(l, "--num_iterations") == "20000" for l in lines)


def test_ablations():
    pmin = listing("pmin_ablation")
    assert [flag(l, "--dynmuon_pmin") for l in pmin] == ["-0.1", "-0.25", "-0.5"]
    assert [run_name(l) for l in pmin] == [f"dynmuon_127M_10B_pmin{p}_seed0" for p in ("-0.1", "-0.25", "-0.5")]
    tauw = listing("tauw_ablation")
    pairs = {(flag(l, "--dynmuon_tau"), flag(l, "--dynmuon_w")) for l in tauw}
    assert pairs == {(t, w) for t in ("0.02", "0.04", "0.08") for w in ("0.02", "0.04", "0.08")}
    assert "dynmuon_127M_10B_tau0.02_w0.08_seed0" in {run_name(l) for l in tauw}
    sched = listing("schedule_ablation")
    assert [flag(l, "--p_schedule") for l in sched] == ["logistic", "switch", "fixed", "reverse"]
    assert flag(sched[1], "--p_switch_step") == "500"
    assert run_name(sched[1]) == "dynmuon_127M_10B_sched-switch_switch500_seed0"
    assert not any("--dynmuon_pmin" in l or "--dynmuon_pmax" in l for l in sched)  # the trainer's defaults
    svd = listing("svd_vs_taylor")
    assert [flag(l, "--spectral") for l in svd] == ["taylor", "svd"]
    assert [run_name(l) for l in svd] == [f"dynmuon_127M_10B_spectral-{s}_seed0" for s in ("taylor", "svd")]


def test_data_model_and_seed_experiments():
    edu = listing("fineweb_edu")
    assert [flag(l, "--optimizer") for l in edu] == ["muon", "dynmuon"]
    assert all(flag(l, "--data_dir") == "data/finewebedu10B" for l in edu)
    assert [run_name(l) for l in edu] == ["muon_127M_10B_data-edu10B_seed0", "dynmuon_127M_10B_data-edu10B_seed0"]
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
    for line in listing("qwen"):  # the trainer picks the qwen block for the qwen171M preset
        assert flag(line, "--model") == "qwen171M" and "--arch" not in line


def test_decomposition_lists_25_runs_without_gpus():
    env = clean_env(LIST_CONFIG="0", CUDA_VISIBLE_DEVICES="")  # no NPROC, no GPU
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "decomposition", "--list"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU found: listing decomposition for NPROC=8" in proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 * (4 + 4) + 1 == 25
    assert len({run_name(l) for l in lines}) == 25
    variants = []
    for line in lines:
        assert line.startswith("torchrun --standalone --nproc_per_node=8 train_gpt.py ")
        assert (flag(line, "--model"), flag(line, "--num_iterations"), flag(line, "--data_dir")) == (
            "127M", "20000", "data/fineweb10B")
        assert flag(line, "--data_seed") == flag(line, "--seed")
        assert run_name(line).endswith(f"_dseed{flag(line, '--seed')}_seed{flag(line, '--seed')}")
        opt = flag(line, "--optimizer")
        variants.append((opt, flag(line, "--lr", "-"), flag(line, "--spectral", "-"), flag(line, "--seed")))
        if opt != "muon":
            assert "--lr" not in line  # the trainer's default lr
        if opt != "dynmuon":
            assert "--spectral" not in line
    expected = [("muon", lr, "-", s) for s in "012" for lr in ("0.01", "0.015", "0.02", "0.03")]
    expected += [("dynmuon", "-", sp, s) for s in "012" for sp in ("-", "scalar", "polar", "exact")]
    expected += [("adamw", "-", "-", "0")]
    assert sorted(variants) == sorted(expected)
    assert "muon_127M_10B_lr0.015_dseed2_seed2" in {run_name(l) for l in lines}
    assert "dynmuon_127M_10B_spectral-polar_dseed1_seed1" in {run_name(l) for l in lines}


def test_small_scale_keeps_its_names_and_names_its_folder(tmp_path):
    lines = listing("small_scale", NPROC="1", DATA_ROOT=str(tmp_path))
    assert lines[0].startswith(f"{PY} data/tokenize_shards.py ") and lines[-1].startswith("# then, at the best lr")
    runs = train_lines(lines)
    assert [run_name(l) for l in runs] == [f"{o}_lr{lr}_seed0" for o in ("muon", "dynmuon")
                                           for lr in ("0.005", "0.01", "0.02", "0.04")] + \
        [f"adamw_lr{lr}_seed0" for lr in ("0.001", "0.002", "0.004")]  # records/small_scale_table.py reads these
    for line in runs:
        assert line.startswith(f"{PY} train_gpt.py ") and flag(line, "--log_dir") == "logs/small_scale"
        assert flag(line, "--checkpoint_dir") == f"checkpoints/small_scale/{run_name(line)}"
        assert flag(line, "--resume") == "auto" and "--warmup_ratio" not in line
    runs = train_lines(listing("small_scale", "--lr_schedule", "cosine", NPROC="1", WD="0.05", LR="0.3"))
    assert {flag(l, "--log_dir") for l in runs} == {"logs/small_scale_wd0.05_lrsched-cosine"}  # lr: the study's
    assert all(flag(l, "--weight_decay") == "0.05" and flag(l, "--lr") != "0.3" for l in runs)


# ----------------------------------------------------------------------------- run names and constants

def test_default_run_passes_only_what_it_must():
    (line,) = train_lines(listing())
    assert flag_names(line) == MUST_FLAGS
    assert line.startswith("torchrun --standalone --nproc_per_node=8 train_gpt.py ")
    for text in ("--model 127M", "--optimizer dynmuon", "--data_dir data/fineweb10B", "--num_iterations 20000",
                 "--seed 0", "--log_dir logs", "--run_name dynmuon_127M_10B_seed0",
                 "--checkpoint_dir checkpoints/dynmuon_127M_10B_seed0", "--checkpoint_freq 1000", "--resume auto"):
        assert f" {text}" in line, text


@pytest.mark.parametrize("env,args", [({"LR": "0.02"}, ()), ({}, ("--lr", "0.02")), ({}, ("--lr=0.02",)),
                                      ({"LR": "0.05"}, ("--lr", "0.02"))])
def test_a_changed_lr_names_the_run(env, args):
    (line,) = train_lines(listing(*args, **env))
    assert run_name(line) == "dynmuon_127M_10B_lr0.02_seed0"
    assert flag(line, "--checkpoint_dir") == "checkpoints/dynmuon_127M_10B_lr0.02_seed0"
    assert train_gpt.build_arg_parser().parse_args(trainer_flags(line)).lr == 0.02


def test_run_names_follow_every_change():
    def name(*args, **env):
        (line,) = train_lines(listing(*args, **env))
        return run_name(line)
    assert name(PMIN="-0.5", LR="0.02") == name("--dynmuon_pmin", "-0.5", "--lr", "0.02") == \
        name("--lr", "0.02", "--dynmuon_pmin=-0.5") == "dynmuon_127M_10B_lr0.02_pmin-0.5_seed0"
    assert name(MODEL="601M", TOKENS="20B", OPT="muon", SEED="3") == "muon_601M_20B_seed3"
    assert name("--optimizer", "muon", "--seed", "2") == "muon_127M_10B_seed2"  # named as the trainer sees them
    assert name(WD="0.05", DATA_SEED="1", SPECTRAL="scalar") == "dynmuon_127M_10B_wd0.05_spectral-scalar_dseed1_seed0"
    assert name("--p_schedule", "reverse", "--vocab_size", "50432") == \
        "dynmuon_127M_10B_sched-reverse_vocab_size50432_seed0"  # a flag without a tag: <flag><value>
    assert name(NUM_ITERATIONS="100") == "dynmuon_127M_10B_iters100_seed0"
    assert name("--fp8", "blocks") == "dynmuon_127M_10B_fp8-blocks_seed0"  # FP8 matmuls change what is trained
    # flags that leave the math alone do not make a new run
    assert name("--no_compile", "--kernels", "torch", "--micro_batch_size", "8", "--val_loss_every", "250",
                MICRO_BATCH="16", DEVICE_BATCH_SIZE="32") == "dynmuon_127M_10B_seed0"
    # dynmuon's constants do not reach (or rename) the other optimizers' runs
    (line,) = train_lines(listing(OPT="muon", PMIN="-0.5", TAU="0.08", SPECTRAL="svd"))
    assert run_name(line) == "muon_127M_10B_seed0" and "--dynmuon_pmin" not in line and "--spectral" not in line
    assert name(RUN_NAME="mine", LR="0.02") == "mine"


def test_long_run_names_end_in_a_hash():
    base = ["--lr", "0.02", "--weight_decay", "0.05", "--dynmuon_pmin", "-0.5", "--dynmuon_tau", "0.08",
            "--dynmuon_w", "0.02", "--p_schedule", "switch", "--p_switch_step", "700"]
    names = []
    for spectral in ("exact", "svd"):
        (line,) = train_lines(listing(*base, "--spectral", spectral))
        names.append(run_name(line))
    for name in names:
        assert len(name) <= 80 and name.startswith("dynmuon_127M_10B_lr0.02_wd0.05_") and name.endswith("_seed0")
        assert re.search(r"_[0-9a-f]{8}_seed0$", name), name
    assert names[0] != names[1]  # the hash covers the changes that no longer fit
    (line,) = train_lines(listing(*reversed_pairs(base), "--spectral", "exact"))
    assert run_name(line) == names[0]  # the order of the flags does not matter


def reversed_pairs(flags):
    pairs = [flags[i:i + 2] for i in range(0, len(flags), 2)]
    return [w for pair in reversed(pairs) for w in pair]


def test_env_overrides():
    (line,) = train_lines(listing(MODEL="601M", TOKENS="20B", OPT="muon", SEED="3", MICRO_BATCH="8"))
    for text in ("--model 601M", "--optimizer muon", "--num_iterations 38000", "--data_dir data/fineweb100B",
                 "--seed 3", "--micro_batch_size 8", "--run_name muon_601M_20B_seed3"):
        assert f" {text} " in line, text
    (line,) = train_lines(listing(MODEL="qwen171M"))
    assert " --model qwen171M " in line
    lines = listing("lr_sweep", NPROC="4", WD="0.025")
    assert all(l.startswith("torchrun --standalone --nproc_per_node=4 ") and flag(l, "--weight_decay") == "0.025"
               and "_wd0.025_" in run_name(l) for l in lines)
    (line,) = train_lines(listing(CHECKPOINT_ROOT="/ck", LOG_DIR="/lg", CHECKPOINT_FREQ="50"))
    assert (flag(line, "--checkpoint_dir"), flag(line, "--log_dir"), flag(line, "--checkpoint_freq")) == (
        "/ck/dynmuon_127M_10B_seed0", "/lg", "50")


def test_appended_args_come_last():
    (line,) = train_lines(listing("--num_iterations", "100", "--no_compile"))
    assert line.endswith(" --num_iterations 100 --no_compile")
    assert train_gpt.build_arg_parser().parse_args(trainer_flags(line)).num_iterations == 100
    for line in listing("seeds", "--val_loss_every", "250"):
        assert line.endswith(" --val_loss_every 250") and flag(line, "--val_loss_every") == "250"


def test_a_flag_that_merges_an_experiments_runs_is_refused():
    for args in (("lr_sweep", "--list", "--lr", "0.05"), ("lr_sweep", "--lr", "0.05")):
        proc = run_sh(*args)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert "both named muon_127M_10B_lr0.05_seed0" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_flags_run_sh_sets_itself_are_refused():
    for args, text in ((("--log_dir", "x"), "LOG_DIR"), (("--checkpoint_dir", "x"), "CHECKPOINT_ROOT"),
                       (("--resume", "auto"), "--resume auto"), (("seeds", "--run_name", "x"), "names its runs"),
                       (("--lr", "0.02", "stray"), "unexpected argument")):
        proc = run_sh(*args, "--list")
        assert proc.returncode == 2 and proc.stdout == "" and text in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1
    proc = run_sh("seeds", "--list", RUN_NAME="x")
    assert proc.returncode == 2 and "unset RUN_NAME" in proc.stderr


def test_neutral_flags_match_the_trainer():
    text = (REPO / "run.sh").read_text()
    block = re.search(r'NEUTRAL_FLAGS=" (.*?) "\n', text, re.S).group(1)
    assert set(block.split()) == train_gpt.RESUME_NEUTRAL_FLAGS


def test_constants_are_trainer_flags_and_documented():
    text = (REPO / "run.sh").read_text()
    pairs = re.search(r'CONSTANT_FLAGS="(.*?)"', text, re.S).group(1).split()
    dests = set(vars(train_gpt.build_arg_parser().parse_args([])))
    for pair in pairs:
        assert pair.split(":")[1] in dests, pair
    help_text = run_sh("--help").stdout
    assigned = re.findall(r"^([A-Z_]+)=\$\{", text, re.M)
    for const in [p.split(":")[0] for p in pairs] + assigned + ["NPROC"]:
        assert re.search(rf"\b{const}\b", help_text), const
    for const in CONSTANT_ENV[:-2]:  # CUDA_VISIBLE_DEVICES, WORLD_SIZE are not run.sh's
        assert re.search(rf"\b{const}\b", help_text), const


# ----------------------------------------------------------------------------- --list and the trainer's config

def test_list_fetches_nothing_and_names_the_shards(tmp_path):
    lines = listing(DATA_ROOT=str(tmp_path), LIST_CONFIG="1")
    assert lines[0] == f"{PY} data/cached_fineweb10B.py 103 --variant 10B --out_dir {tmp_path}/fineweb10B"
    assert not any(tmp_path.iterdir())
    lines = listing(DATA_ROOT=str(tmp_path), TOKENS="20B", LIST_CONFIG="1")
    assert lines[0].startswith(f"{PY} data/cached_fineweb10B.py 200 --variant 100B ")  # ceil(38000*512*1024/1e8)
    lines = listing("--data_dir", str(tmp_path), LIST_CONFIG="1")  # the user's own shards: nothing to fetch
    assert lines[0].startswith("torchrun ")


def test_list_shows_the_trainers_resolved_config():
    lines = listing("svd_vs_taylor", LIST_CONFIG="1")
    commands = [i for i, l in enumerate(lines) if l.startswith("torchrun")]
    assert len(commands) == 2
    for i, spectral in zip(commands, ("taylor", "svd")):
        summary = lines[i + 1]
        assert summary.startswith("#  lr=0.01 wd=0.01 mu=0.95 ") and f" spectral={spectral} " in summary
        assert " pmin=-0.25 " in summary and " batch=512x1024 " in summary
        assert lines[i + 2].startswith("#  tokens: 10,485,760,000 (20000 steps x 512 x 1024)")
        assert lines[i + 3].startswith("#  estimated time: ")
    muon = listing(OPT="muon", LIST_CONFIG="1")
    assert "pmin=" not in muon[2] and muon[2].startswith("#  lr=0.01 wd=0.01 mu=0.95")


def test_list_says_when_the_trainer_refuses_a_command():
    lines = listing(NPROC="3", LIST_CONFIG="1")  # 512 sequences do not split over 3 GPUs x 64
    assert any(l.startswith("#  the trainer refuses this command: error: --batch_size 512 must be a multiple")
               for l in lines), lines


def test_list_without_torch_prints_the_command_and_a_note(tmp_path):
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("needs a python3 without torch")
    lines = listing(PYTHON=bare, LIST_CONFIG="1", DATA_ROOT=str(tmp_path))
    assert lines[0].startswith("# first: data/cached_fineweb10B.py fetches the missing shards of 10B")
    assert lines[1].startswith("torchrun ") and "cannot import torch" in lines[2]


@pytest.fixture
def repo_copy(tmp_path):
    """train_gpt.py, run.sh, experiments.sh and data/ in tmp_path (to change the copy's trainer)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("train_gpt.py", "run.sh", "experiments.sh"):
        shutil.copy2(REPO / name, copy / name)
    shutil.copytree(REPO / "data", copy / "data", ignore=shutil.ignore_patterns("fineweb*", "tiny*", "__pycache__"))
    return copy


def test_a_changed_trainer_default_shows_in_the_next_list(repo_copy):
    lines = listing(repo=repo_copy, LIST_CONFIG="1")
    assert " wd=0.01 " in lines[2], lines
    trainer = repo_copy / "train_gpt.py"
    text = trainer.read_text()
    old = 'a("--weight_decay", type=float, default=0.01,'
    assert text.count(old) == 1, "the trainer's --weight_decay line changed: update this test"
    trainer.write_text(text.replace(old, old.replace("0.01", "0.02")))
    for env in ({}, {"NPROC": "0", "DATA_ROOT": str(repo_copy / "d")}):  # a GPU run and the CPU smoke run
        proc = run_sh("--list", repo=repo_copy, LIST_CONFIG="1", **env)
        assert proc.returncode == 0, proc.stderr
        (line,) = train_lines(proc.stdout.splitlines())
        assert "--weight_decay" not in line and run_name(line).endswith("_seed0") and "_wd" not in run_name(line)
        summary = proc.stdout.splitlines()[proc.stdout.splitlines().index(line) + 1]
        assert summary.startswith("#  lr=0.01 wd=0.02 "), summary


def test_decomposition_small_hands_over_to_the_study(repo_copy):
    proc = run_sh("decomposition_small", "--list", repo=repo_copy)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1 and "does not exist yet" in proc.stdout
    proc = run_sh("decomposition_small", repo=repo_copy, NPROC="2")
    assert proc.returncode == 2 and "does not exist yet" in proc.stderr
    study = repo_copy / "records/2026-11-30_decomposition/study.py"
    study.parent.mkdir(parents=True)
    study.write_text("import sys\nprint('study', *sys.argv[1:])\nsys.exit(0)\n")
    lines = listing("decomposition_small", "--data_dir", "d", repo=repo_copy, NPROC="2")
    assert lines == ["study --gpus 2 --data_dir d --list"]
    proc = run_sh("decomposition_small", "--out_dir", "o", repo=repo_copy, NPROC="1")
    assert proc.returncode == 0 and proc.stdout.strip() == "study --gpus 1 --out_dir o", proc.stderr
    study.write_text("import sys\nsys.exit(5)\n")
    proc = run_sh("decomposition_small", repo=repo_copy, NPROC="1")
    assert proc.returncode == 5  # the study's status


# ----------------------------------------------------------------------------- errors and GPUs

def test_unknown_experiment_exits_2():
    proc = run_sh("no_such_experiment", "--list")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown experiment" in proc.stderr and "main_table" in proc.stderr and "decomposition" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_help_lists_experiments():
    proc = run_sh("--help")
    assert proc.returncode == 0
    for name in [*EXPERIMENTS, "decomposition_small", "small_scale"]:
        assert f"  {name} " in proc.stdout


def test_cpu_fallback_list(tmp_path):
    proc = run_sh("--list", NPROC="0", DATA_ROOT=str(tmp_path))
    assert proc.returncode == 0
    assert "no CUDA GPU" in proc.stderr
    gen, train = proc.stdout.splitlines()
    assert gen.startswith(f"{PY} data/make_synthetic_shards.py --out_dir ")
    assert not any(tmp_path.iterdir())
    assert "torchrun" not in train
    args = train_gpt.build_arg_parser().parse_args(trainer_flags(train))
    assert (args.model, args.device, args.data_dir) == ("tiny", "cpu", f"{tmp_path}/tiny_synthetic")
    assert args.val_tokens + 1 <= 262_145 and args.vocab_size == 50304  # synthetic ids span the GPT-2 vocab
    assert args.resume == "auto" and args.checkpoint_dir == f"checkpoints/{args.run_name}"
    assert args.run_name == "dynmuon_tiny_cpu_seed0"


def test_flags_the_trainer_refuses_stop_before_any_download(tmp_path):
    proc = run_sh(NPROC="3", DATA_ROOT=str(tmp_path))  # the batch does not split over 3 processes
    assert proc.returncode == 2, proc.stderr
    assert re.search(r"must be a multiple of --device_batch_size \d+ x 3 processes", proc.stderr), proc.stderr
    assert "nothing was downloaded or run" in proc.stderr.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def test_experiment_without_gpus_refuses_to_run():
    proc = run_sh("seeds", NPROC="0")
    assert proc.returncode == 2 and proc.stdout == "" and "NPROC" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_nproc_from_cuda_visible_devices():
    env = clean_env(CUDA_VISIBLE_DEVICES="0,1,2,3", LIST_CONFIG="0")
    proc = subprocess.run(["bash", str(REPO / "run.sh"), "--list"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "--nproc_per_node=4 " in proc.stdout


# ----------------------------------------------------------------------------- real CPU runs (NPROC=0)

def cpu_env(tmp_path, **env):
    """The no-GPU path, a few steps a run, with everything it writes under tmp_path."""
    return {"NPROC": "0", "LIST_CONFIG": "1", "DATA_ROOT": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"),
            "CHECKPOINT_ROOT": str(tmp_path / "ckpt"), "NUM_ITERATIONS": "3", "OMP_NUM_THREADS": "2", **env}


def logged_config(tmp_path, name):
    events = [json.loads(l) for l in (tmp_path / "logs" / f"{name}.jsonl").read_text().splitlines()]
    return next(e["config"] for e in events if e["event"] == "config")


def test_cpu_runs_end_to_end(tmp_path):
    env = cpu_env(tmp_path)
    base = "dynmuon_tiny_cpu_iters3_seed0"
    proc = run_sh(timeout=300, **env)  # a fresh run: trains to the end
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / base / "step_000003.pt").is_file()
    assert logged_config(tmp_path, base)["lr"] == 0.01 and "finished" not in proc.stdout

    proc = run_sh(timeout=300, **env)  # unchanged: the trainer says it is finished, naming its log
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = tmp_path / "logs" / f"{base}.txt"
    assert f"{base} is finished (step 3 in " in proc.stdout and f"its log is {log}: nothing to do" in proc.stdout

    changed = "dynmuon_tiny_cpu_lr0.02_iters3_seed0"
    proc = run_sh(timeout=300, LR="0.02", **env)  # a changed constant is a new run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is finished" not in proc.stdout and logged_config(tmp_path, changed)["lr"] == 0.02
    assert (tmp_path / "ckpt" / changed / "step_000003.pt").is_file()

    proc = run_sh("--lr", "0.02", timeout=300, **env)  # the same change as a flag: the same run, finished
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{changed} is finished (step 3 in {tmp_path / 'ckpt' / changed / 'step_000003.pt'}); its log is " \
           f"{tmp_path / 'logs' / changed}.txt: nothing to do" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([base, changed])

    proc = run_sh("--lr", "0.03", timeout=300, RUN_NAME=changed, **env)  # another config under the same name
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--lr 0.02 (checkpoint) vs 0.03 (now)" in proc.stderr
    assert logged_config(tmp_path, changed)["lr"] == 0.02


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_sigterm_reaches_the_trainer(tmp_path, launcher):
    """SIGTERM to run.sh: the trainer checkpoints and exits 143, and so does run.sh (under torchrun too, which
    itself exits 1 after passing the signal on)."""
    env = cpu_env(tmp_path, NUM_ITERATIONS="2000", LIST_CONFIG="0")
    args = []
    if launcher == "torchrun":  # one CPU rank under torchrun, on the synthetic shards
        data = tmp_path / "data" / "tiny_synthetic"
        subprocess.run([PY, "data/make_synthetic_shards.py", "--out_dir", str(data), "--train_shards", "2",
                        "--shard_tokens", "1048576", "--val_tokens", "262145"], cwd=REPO, check=True,
                       capture_output=True)
        env.update(NPROC="1", PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
        args = ["--model", "tiny", "--data_dir", str(data), "--batch_size", "8", "--device_batch_size", "8",
                "--sequence_length", "64", "--val_tokens", "4096"]
    out, err = tmp_path / "stdout", tmp_path / "stderr"  # files, not pipes: an orphaned trainer would hold those
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(["bash", str(REPO / "run.sh"), *args], stdout=stdout, stderr=stderr,
                                env=clean_env(**env), cwd=REPO, start_new_session=True)  # own group: see finally
    try:
        deadline = time.monotonic() + 240
        while not any('"train"' in p.read_text() for p in (tmp_path / "logs").glob("*.jsonl")):  # training
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "the trainer did not start training"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # to run.sh only
        proc.wait(timeout=240)
    finally:  # a trainer left running (the bug this test catches) goes with run.sh's process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = out.read_text() + err.read_text()
    assert proc.returncode == 143, log[-3000:]  # the trainer's status, not run.sh killed by the signal (-15)
    assert re.search(r"stopped.*signal 15", log), log[-3000:]
    (checkpoint,) = (tmp_path / "ckpt").glob("*/step_*.pt")
    assert int(checkpoint.stem.split("_")[1]) < 2000
    assert "the trainer exited with status 143" in log
