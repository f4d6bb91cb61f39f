"""Flags, presets, the LR and p schedules, and the anchoring branch chosen at each step."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_cli, tiny_flags
import train_gpt as tg


@pytest.fixture
def dry_run(monkeypatch, capsys):
    def count(*flags):
        code, out, _ = run_cli(monkeypatch, capsys, "--dry_run", *flags)
        assert code == 0
        line = [l for l in out.splitlines() if l.startswith("parameters:")][0]
        return int(line.split()[1].replace(",", ""))
    return count


@pytest.mark.parametrize("preset,expected,tol", [("127M", 127.0e6, 0.05e6), ("601M", 601e6, 1e6),
                                                 ("1.1B", 1.11e9, 0.01e9)])
def test_preset_parameter_counts(dry_run, preset, expected, tol):
    assert abs(dry_run("--model", preset) - expected) <= tol


PAPER_COMMAND = """torchrun --standalone --nproc_per_node=1 train_gpt.py --optimizer dynmuon --scalar_opt adamw
    --lr 0.01 --batch_size 512 --device_batch_size 64 --sequence_length 1024 --num_iterations 20000 --model_dim 512
    --n_layer 24 --n_head 8 --dynmuon_pmax 1.0 --dynmuon_pmin -0.25 --dynmuon_w 0.04 --dynmuon_tau 0.04"""


def test_the_papers_readme_command_runs_as_is():
    """The command of the paper's README, verbatim (under torchrun, with --dry_run appended): accepted, with its
    meaning, and the 127M model of the paper's table."""
    argv = PAPER_COMMAND.split()
    flags = argv[argv.index("train_gpt.py") + 1:]
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), *flags, "--dry_run"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, WORLD_SIZE="1"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout[:proc.stdout.index("\n}\n") + 3])
    assert "parameters: 127,008,768 (127.0M)" in proc.stdout
    assert (config["optimizer"], config["scalar_opt"], config["lr"], config["num_iterations"]) == (
        "dynmuon", "adamw", 0.01, 20000)
    assert (config["dynmuon_pmax"], config["dynmuon_pmin"], config["dynmuon_w"], config["dynmuon_tau"]) == (
        1.0, -0.25, 0.04, 0.04)
    assert (config["batch_size"], config["device_batch_size"], config["adjust_lr"]) == (512, 64, "spectral_norm")
    assert "tokens: 10,485,760,000" in proc.stdout and "checkpoint:" in proc.stdout


def test_paper_flags_keep_their_meaning():
    args = tg.resolve_config(["--device", "cpu", "--no_triton", "--no_wandb", "--wandb_project_name", "p",
                              "--wandb_job_name", "j", "--fs_size", "1", "--tp_size", "1", "--adjust_lr", "rms_norm",
                              "--scalar_opt", "lion"])
    assert (args.kernels, args.wandb, args.wandb_project_name, args.wandb_job_name) == ("torch", False, "p", "j")
    assert tg.LR_ADJUST["rms_norm"](1536, 384) == pytest.approx(0.2 * math.sqrt(1536))
    assert tg.LR_ADJUST["spectral_norm"](1536, 384) == pytest.approx(2.0)
    model = tg.build_model(tg.resolve_config(["--model", "tiny", "--device", "cpu", "--scalar_opt", "lion"]))
    scalar_opt, muon = tg.build_optimizers(model, tg.resolve_config(["--model", "tiny", "--device", "cpu",
                                                                     "--scalar_opt", "lion"]))
    assert isinstance(scalar_opt, tg.Lion) and scalar_opt.param_groups[0]["betas"] == tg.ADAM_BETAS


def test_explicit_dims_override_preset(dry_run):
    # 127M preset with 12 layers: embeddings 2*50304*512 plus 12 blocks of 12 d^2
    assert dry_run("--model", "127M", "--n_layer", "12") == 2 * 50304 * 512 + 12 * 12 * 512 ** 2


def test_defaults_follow_spec():
    args = tg.resolve_config(["--device", "cpu", "--batch_size", "512", "--device_batch_size", "64",  # the GPU
                              "--sequence_length", "1024", "--val_tokens", "10485760"])  # defaults (not CPU's)
    parser = tg.build_arg_parser()
    assert [parser.get_default(f) for f in ("batch_size", "device_batch_size", "sequence_length", "val_tokens")] == [
        512, 64, 1024, 10_485_760]  # on a GPU the micro-batch is sized to its memory
    assert (args.lr, args.mu, args.weight_decay, args.scalar_lr) == (0.01, 0.95, 0.01, 0.001)
    assert (args.dynmuon_pmax, args.dynmuon_pmin, args.dynmuon_tau, args.dynmuon_w) == (1.0, -0.25, 0.04, 0.04)
    assert (args.batch_size, args.device_batch_size, args.sequence_length) == (512, 64, 1024)
    assert (args.warmup_ratio, args.warmdown_ratio, args.lr_schedule) == (0.01, 0.2, "wsd")
    assert args.val_tokens == 10_485_760 and args.micro_batch_size == 64
    assert (args.num_iterations, args.val_loss_every, args.vocab_size) == (20000, 50, 50304)
    assert (args.optimizer, args.p_schedule, args.spectral, args.arch, args.rope_base) == (
        "dynmuon", "logistic", "taylor", "gpt", 10000.0)
    assert tg.resolve_config(["--optimizer", "adamw"]).lr == 0.002


def test_optimizer_constants_are_specs_literals():
    """Written out here from SPEC section 1, so a mistyped constant in train_gpt.py cannot test itself."""
    assert tg.NS_COEFFS == ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                            (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
    assert tg.NORMUON_BETA2 == 0.95 and tg.ANCHOR_RAW == 0.25


H100, H200 = 79.6, 140.4  # GiB


@pytest.mark.parametrize("model,device,rank_batch,gpu_gib,expected", [
    ("127M", "cuda", 512, H100, 64), ("601M", "cuda", 512, H100, 32), ("1.1B", "cuda", 512, H100, 16),
    ("qwen171M", "cuda", 512, H100, 64), ("127M", "cuda", 512, H200, 128), ("127M", "cuda", 64, H200, 64),
    ("601M", "cuda", 512, H200, 64), ("1.1B", "cuda", 512, H200, 32), ("1.1B", "cuda", 24, H200, 8),
    ("601M", "cuda", 8, H100, 8), ("1.1B", "cuda", 64, 40.0, 8), ("601M", "cuda", 512, 40.0, 16),
    ("tiny", "cuda", 512, H100, 12), ("601M", "cpu", 512, None, 12)])
def test_default_micro_batch_fits_the_gpu_and_divides_the_rank_batch(model, device, rank_batch, gpu_gib, expected):
    """From the measured (micro-batch, peak): halved while peak > 90% of the GPU's memory (40 GiB rows), doubled
    while 2 x peak <= 90% of it, capped to a divisor of this process's share of the global batch;
    --device_batch_size (12 here) where memory does not decide (CPU, unmeasured presets)."""
    assert tg.default_micro_batch(model, device, 12, rank_batch, gpu_gib) == expected


def test_out_of_memory_names_the_flag_to_change(monkeypatch, tmp_path, tiny_data):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(tg, "train_step", oom)
    with pytest.raises(tg.TrainingError, match="rerun with --micro_batch_size 1 "):
        tg.main(tiny_flags(tiny_data, tmp_path / "logs"))


@pytest.mark.parametrize("flags,message", [
    (["--batch_size", "100"], "multiple of --device_batch_size"),
    (["--micro_batch_size", "48"], "--micro_batch_size 48 must divide each process's share"),
    (["--model_dim", "100", "--n_head", "8"], "heads of even size"),
    (["--dynmuon_tau", "0"], "must be > 0"),
    (["--dynmuon_w", "-1"], "must be > 0"),
    (["--dynmuon_pmin", "0.5", "--dynmuon_pmax", "0.2"], "must not exceed"),
    (["--dynmuon_pmin", "-3"], "[-1, 1]"),
    (["--warmup_ratio", "0.7", "--warmdown_ratio", "0.5"], "sum to at most 1"),
    (["--resume", "auto"], "needs --checkpoint_dir"),
    (["--fp8", "all", "--model_dim", "40", "--n_head", "4"], "model_dim"),
    (["--fp8", "all", "--vocab_size", "50257"], "['vocab_size'] are not"),
    (["--lr", "-0.01"], "--lr must be > 0, got -0.01"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--no_triton", "--kernels", "triton"], "--no_triton contradicts --kernels triton"),
    (["--fs_size", "2"], "--fs_size 2: this trainer has no sharded"),
    (["--tp_size", "4"], "--tp_size 4: this trainer has no sharded"),
    (["--dp_size", "2"], "--dp_size 2 but 1 processes"),
    (["--wandb", "--no_wandb"], "contradict each other"),
])
def test_bad_flags_exit_2_with_one_line(monkeypatch, capsys, flags, message):
    code, _, err = run_cli(monkeypatch, capsys, "--device", "cpu", *flags)
    assert code == 2
    assert message in err and err.strip().count("\n") == 0, err


def test_each_process_needs_a_val_sequence():
    """An empty val share would make every val loss NaN (0 / 0 in the all-reduced mean)."""
    args = tg.resolve_config(["--device", "cpu", "--val_tokens", str(4 * 1024), "--batch_size", "64",
                              "--device_batch_size", "8", "--sequence_length", "1024"])
    tg.validate_flags(args, world_size=4)
    with pytest.raises(tg.ConfigError, match=r"one sequence per process \(8 x --sequence_length 1024"):
        tg.validate_flags(args, world_size=8)


def test_auto_kernels_are_triton_only_where_they_run(monkeypatch):
    assert tg.resolve_config(["--device", "cpu"]).kernels == "torch"
    monkeypatch.setattr(tg, "validate_flags", lambda args, world_size=1: None)  # no GPU here to validate against
    assert tg.resolve_config(["--device", "cuda", "--micro_batch_size", "64"]).kernels == "triton"
    assert tg.resolve_config(["--device", "cuda", "--micro_batch_size", "64", "--no_triton"]).kernels == "torch"


def test_triton_kernels_on_cpu_need_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(tg, "TRITON_INTERPRET", False)
    code, _, err = run_cli(monkeypatch, capsys, "--device", "cpu", "--kernels", "triton")
    assert code == 2 and "--kernels triton needs triton and a CUDA device" in err, err


def test_bad_flag_exits_2_as_a_process():
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--device", "cpu", "--batch_size", "100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --batch_size 100"), proc.stderr


def test_wsd_lr_schedule():
    args = tg.resolve_config(["--num_iterations", "1000"])  # warmup 10 steps, warmdown 200
    assert tg.lr_multiplier(0, args) == pytest.approx(0.1)
    assert tg.lr_multiplier(9, args) == 1.0
    assert tg.lr_multiplier(500, args) == 1.0
    assert tg.lr_multiplier(799, args) == 1.0
    assert tg.lr_multiplier(800, args) == pytest.approx(1.0)
    assert tg.lr_multiplier(900, args) == pytest.approx(0.5)
    assert tg.lr_multiplier(999, args) == pytest.approx(1 / 200)


def test_cosine_lr_schedule():
    args = tg.resolve_config(["--num_iterations", "1010", "--lr_schedule", "cosine"])  # warmup 10
    assert tg.lr_multiplier(4, args) == pytest.approx(0.5)
    assert tg.lr_multiplier(10, args) == pytest.approx(1.0)
    assert tg.lr_multiplier(510, args) == pytest.approx(0.5)
    assert tg.lr_multiplier(1009, args) == pytest.approx(0.5 * (1 + math.cos(math.pi * 999 / 1000)))


def logistic_p(t, T=20000, tau=0.04, w=0.04, pmax=1.0, pmin=-0.25):
    return pmin + (pmax - pmin) / (1 + math.exp((t / T - tau) / w))


def test_logistic_p_schedule_values():
    p = tg.make_p_schedule(tg.resolve_config(["--num_iterations", "20000"]))
    for t in (1, 400, 800, 1124, 1125, 1910, 1911, 5000, 20000):
        assert p(t) == pytest.approx(logistic_p(t), abs=1e-12)
    assert p(800) == pytest.approx(0.375)  # t/T = tau: halfway between p_max and p_min
    assert p(20000) == pytest.approx(-0.25, abs=1e-9)


def test_anchoring_branch_at_each_step():
    """With T=20000: raw momentum until p drops under 0.25 (step 1125), NS until p < 0 (step 1910)."""
    p = tg.make_p_schedule(tg.resolve_config(["--num_iterations", "20000"]))

    def branch(t):
        return "raw" if p(t) >= tg.ANCHOR_RAW else ("ns" if p(t) >= 0 else "fast_spectral")
    assert [branch(t) for t in (1, 1124, 1125, 1909, 1910, 20000)] == \
        ["raw", "raw", "ns", "ns", "fast_spectral", "fast_spectral"]


def test_ablation_schedules():
    base = ["--num_iterations", "2000"]
    fixed = tg.make_p_schedule(tg.resolve_config(base + ["--p_schedule", "fixed"]))
    switch = tg.make_p_schedule(tg.resolve_config(base + ["--p_schedule", "switch", "--p_switch_step", "500"]))
    reverse = tg.make_p_schedule(tg.resolve_config(base + ["--p_schedule", "reverse"]))
    muon = tg.make_p_schedule(tg.resolve_config(base + ["--optimizer", "muon"]))
    assert fixed(1) == fixed(2000) == -0.25
    assert (switch(500), switch(501)) == (1.0, -0.25)
    assert reverse(1) == pytest.approx(1.0 - 0.25 - logistic_p(1, T=2000))
    assert reverse(2000) == pytest.approx(1.0, abs=1e-9)
    assert muon(1) == muon(2000) == 0.0
