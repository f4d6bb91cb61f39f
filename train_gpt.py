"""DynMuon speedrun trainer: one file, read top to bottom.

Sections: hyperparameters, optimizer math, optimizers, model, kernels, data, checkpoints, training loop.
Reference behaviour: docs/algorithm.md (DynMuon, arXiv 2605.17109, on the modded-nanoGPT GPT and FineWeb).

    python train_gpt.py --model tiny --device cpu ...           # one process
    torchrun --standalone --nproc_per_node=8 train_gpt.py ...   # one process per GPU

Exit codes (each error is one line on stderr, `error: ...`, and, once the log is open, its last line):
    0        done (or nothing to do: the run is finished)
    2        bad input: a flag, the data, a checkpoint, a folder that cannot be written, a run already live
    3        training failed: non-finite loss, out of GPU or host memory
    4        storage failed (disk full, I/O error), at the start or part-way: the last checkpoint and the log's
             earlier lines are intact and no partial file is left; --resume auto once there is room
    128+sig  stopped by SIGTERM/SIGINT after checkpointing (a repeat after STOP_REPEAT_GRACE_S: at once, without)
    1        anything else is a bug: a Python traceback (its first line is the log's last line)
"""
import argparse
import contextlib
import errno
import fcntl
from functools import partial
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path needs no triton
    triton = None

# -----------------------------------------------------------------------------
# Hyperparameters

MODEL_PRESETS = {  # model_dim, n_layer, n_head
    "tiny": (64, 2, 4),
    "127M": (512, 24, 8),
    "601M": (1280, 24, 20),
    "1.1B": (1792, 24, 28),
    "qwen171M": (512, 24, 8),
}
ARCH_DEFAULTS = {  # n_kv_head (None: = n_head), mlp_hidden (None: 4d), rope_base
    "gpt": (None, None, 10000.0),
    "qwen": (2, 2816, 1e6),
}
MICRO_BATCH_PEAK = {"127M": (64, 45.9), "601M": (32, 54.1), "1.1B": (16, 45.9), "qwen171M": (32, 24.6)}
# (micro-batch, peak GiB allocated) measured on one H100 80 GB with the default kernels (qwen171M: before the
# cross-entropy kernel, which adds [micro-batch x 1024, vocab] bf16, 3.1 GiB at 32) (bench/NOTES.md)
MEMORY_HEADROOM = 0.9  # fraction of the GPU's memory the default micro-batch may plan to use
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",  # --attention: SDPBackend
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
FP8_SCOPES = {"none": (False, False), "blocks": (False, True), "all": (True, True)}  # --fp8: (lm_head, blocks)
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm needs every matrix dimension to be a multiple of this
VOCAB_SIZE = 50304  # GPT-2's 50257 padded to a multiple of 128
LR_DEFAULTS = {"dynmuon": 0.01, "muon": 0.01, "normuon": 0.01, "adamw": 0.002}
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
NORMUON_BETA2 = 0.95
DDP_BUCKET_MB = 200.0  # 2 x H200, 601M: 1.93x one GPU's tokens/s (torch's 25 MB: 1.79x) (bench/NOTES.md)
H200_MS_PER_STEP = {"127M": 905, "601M": 3551, "1.1B": 6111}  # DynMuon at the defaults (bench/NOTES.md)
STOP_REPEAT_GRACE_S = 5.0  # a stop signal repeated within this many seconds is the same request
CPU_BATCH_DEFAULTS = dict(batch_size=8, device_batch_size=8, sequence_length=256, val_tokens=131_072)
# --device cpu, for the flags not given: a laptop-sized step (the parser's defaults, 512 x 1024 tokens in
# micro-batches of 64, allocate 13 GB of logits at the GPT-2 vocabulary). Unless given, --val_tokens is
# rounded down to whole sequences on any device.
PROGRESS_INTERVAL_S = 60.0  # stdout not a terminal (a batch job's log): a progress line at most this often


class ConfigError(Exception):
    """A bad flag or a bad combination of flags; the message says what to do."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends a flag's default, except None and False: those flags' help says what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag: one line naming it and a --help hint (exit 2), not the whole usage text first."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_arg_parser():
    ap = ArgumentParser(
        description="Train a GPT on FineWeb shards with DynMuon, Muon, NorMuon or AdamW.",
        formatter_class=HelpFormatter)
    a = ap.add_argument
    # data and batch (flag names of the paper's released trainer)
    a("--data_dir", default="data/fineweb10B", help="folder of fineweb_val_*.bin / fineweb_train_*.bin shards")
    cpu = CPU_BATCH_DEFAULTS
    a("--batch_size", type=int, default=512,
      help=f"global batch, in sequences per optimizer step ({cpu['batch_size']} on --device cpu unless given)")
    a("--device_batch_size", type=int, default=64,
      help="the paper's sequences per forward pass on one device: --batch_size must be a multiple of it x the "
           f"processes; the micro-batch where memory does not choose it ({cpu['device_batch_size']} on "
           f"--device cpu unless given)")
    a("--micro_batch_size", type=int, default=0,
      help="sequences per forward pass; does not change the math. 0 = on CUDA the largest that fits this GPU by "
           "the preset's measured peak memory, up to one process's share of --batch_size (see "
           "default_micro_batch), else --device_batch_size")
    a("--sequence_length", type=int, default=1024,
      help=f"tokens per sequence ({cpu['sequence_length']} on --device cpu unless given)")
    a("--num_iterations", type=int, default=20000, help="optimizer steps T")
    a("--warmup_ratio", type=float, default=0.01, help="fraction of T with linear LR warmup")
    a("--warmdown_ratio", type=float, default=0.2, help="fraction of T with the final LR decay to 0")
    a("--lr_schedule", choices=["wsd", "cosine"], default="wsd",
      help="wsd: warmup, constant, linear decay (released code); cosine: warmup then cosine to 0")
    a("--val_loss_every", type=int, default=50, help="evaluate every N steps (also at step 0 and the last step)")
    a("--val_tokens", type=int, default=10_485_760,
      help=f"validation tokens, the first ones of the val shard; a multiple of --sequence_length "
           f"({cpu['val_tokens']:_} on --device cpu unless given; unless given, rounded down to one)")
    # model
    a("--model", choices=list(MODEL_PRESETS), default="127M", help="size preset; explicit dims override it")
    a("--model_dim", type=int, default=None, help="width d (overrides the preset)")
    a("--n_layer", type=int, default=None, help="number of blocks (overrides the preset)")
    a("--n_head", type=int, default=None, help="attention heads (overrides the preset)")
    a("--vocab_size", type=int, default=VOCAB_SIZE, help="embedding rows; keep 50304 for GPT-2 tokens")
    a("--arch", choices=list(ARCH_DEFAULTS), default=None,
      help="gpt: modded-nanoGPT block (ReLU^2, QK-norm); qwen: GQA, SwiGLU, learnable RMSNorm, qkv bias. "
           "Default: qwen for --model qwen171M, else gpt")
    a("--n_kv_head", type=int, default=None, help="key/value heads (grouped-query attention); arch default")
    a("--mlp_hidden", type=int, default=None, help="MLP hidden width; arch default (gpt 4d, qwen 2816)")
    a("--rope_base", type=float, default=None, help="RoPE theta; arch default (gpt 1e4, qwen 1e6)")
    # optimizer
    a("--optimizer", choices=["dynmuon", "muon", "normuon", "adamw"], default="dynmuon",
      help="optimizer of the hidden matrices (adamw: AdamW for every parameter)")
    a("--lr", type=float, default=None, help="matrix LR; default 0.01 for the Muon family, 0.002 for adamw")
    a("--mu", type=float, default=0.95, help="momentum of the Muon family")
    a("--weight_decay", type=float, default=0.01, help="decoupled weight decay of the hidden matrices")
    a("--scalar_lr", type=float, default=0.001, help="AdamW LR of embedding and lm_head")
    a("--dynmuon_pmax", type=float, default=1.0, help="p at the start of training")
    a("--dynmuon_pmin", type=float, default=-0.25, help="p at the end of training")
    a("--dynmuon_tau", type=float, default=0.04, help="centre of the logistic p schedule, as a fraction of T")
    a("--dynmuon_w", type=float, default=0.04, help="width of the logistic p schedule, as a fraction of T")
    a("--p_schedule", choices=["logistic", "fixed", "switch", "reverse"], default="logistic",
      help="fixed: p_min throughout; switch: p_max until --p_switch_step then p_min; reverse: p_min to p_max")
    a("--p_switch_step", type=int, default=500, help="step of the abrupt switch (--p_schedule switch)")
    a("--spectral", choices=list(NEGATIVE_STAGES), default="taylor",
      help="the p<0 stage: taylor = Fast-Spectral (paper); ablations: scalar = c0 |U|_F^p NS(U) (Fast-Spectral "
           "with A = 0), polar = plain NS (Muon), exact = U S^p V^T by a matmul iteration, svd = U S^p V^T by "
           "torch.linalg.svd in fp32 (slow reference)")
    a("--adjust_lr", choices=list(LR_ADJUST), default="spectral_norm",
      help="per-matrix LR factor s of W <- W - lr s O: spectral_norm = sqrt(out/in); rms_norm = 0.2 sqrt(max(out, in))")
    a("--scalar_opt", choices=["adamw", "lion"], default="adamw",
      help="optimizer of embedding and lm_head next to the Muon family (lion: betas 0.9/0.95, --scalar_lr, no wd)")
    a("--kernels", choices=["auto", "triton", "torch"], default="auto",
      help="fused Triton kernels (Newton-Schulz / Fast-Spectral, QK RMSNorm + RoPE, cross-entropy) or the plain "
           "torch reference ops; auto = triton on CUDA")
    a("--no_triton", action="store_true", help="the paper's spelling of --kernels torch")
    # run
    a("--seed", type=int, default=0, help="seed of the initialisation")
    a("--data_seed", type=int, default=None,
      help="shuffle the order of training batches (shards and windows in them) with this seed; default: the "
           "shards in order, as the paper")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--no_compile", action="store_true", help="do not torch.compile the model (always off on CPU)")
    a("--attention", choices=list(SDPA_BACKENDS), default="auto",
      help="scaled_dot_product_attention backend; auto = PyTorch's choice")
    a("--ddp_bucket_mb", type=float, default=DDP_BUCKET_MB,
      help="gradient all-reduce bucket size of DistributedDataParallel (several processes): each bucket's "
           "all-reduce overlaps the rest of the backward pass, and torch.compile splits its graph per bucket "
           "(torch's own default, 25, cost 601M 7%% of its 2-GPU step)")
    a("--fp8", choices=list(FP8_SCOPES), default="none",
      help="matmuls in FP8 (e4m3 weights/activations, e5m2 gradients, one dynamic scale per tensor; needs "
           "an sm_89+ GPU such as H100): blocks = the block matrices, all = those and lm_head. "
           "Changes the numerics: off by default")
    a("--log_dir", default="logs", help="folder of <run_name>.txt and <run_name>.jsonl")
    a("--run_name", default=None, help="default: <optimizer>_<model>_<date-time>")
    a("--wandb", action="store_true", help="also log to Weights & Biases (pip install wandb)")
    a("--no_wandb", action="store_true", help="do not log to Weights & Biases (the default; the paper's flag)")
    a("--wandb_project_name", default="dynmuon-speedrun", help="Weights & Biases project")
    a("--wandb_job_name", default=None, help="Weights & Biases run name; default: --run_name")
    a("--fs_size", type=int, default=None,
      help="the paper's fully-sharded mesh size: only 1 (this trainer is data-parallel; use torchrun's processes)")
    a("--tp_size", type=int, default=None,
      help="the paper's tensor-parallel mesh size: only 1 (this trainer is data-parallel)")
    a("--dp_size", type=int, default=None,
      help="the paper's data-parallel size: must equal the number of processes if given")
    a("--dry_run", action="store_true", help="check the flags (for WORLD_SIZE processes, as torchrun sets it), "
      "print the resolved configuration and parameter count, then exit")
    a("--target_loss", type=float, default=None, help="report at each evaluation whether this val loss is reached")
    a("--record", default=None,
      help="take --target_loss from a records entry: a records/records.json name or a records/<dir>/ run")
    # checkpoints
    a("--checkpoint_dir", default=None,
      help="folder of this run's checkpoints (one run per folder); without it no checkpoint is written")
    a("--checkpoint_freq", type=int, default=0,
      help="checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT)")
    a("--keep_checkpoints", type=int, default=3, help="how many of the newest checkpoints to keep")
    a("--resume", default=None, help="'auto': newest valid checkpoint in --checkpoint_dir (fresh start if none); "
                                      "or the path of a checkpoint .pt file. Without it: a fresh run")
    return ap


def resolve_config(argv=None):
    """Parse flags, apply presets and defaults, and check what can be checked without data."""
    ap = build_arg_parser()
    parser_defaults = {name: ap.get_default(name) for name in CPU_BATCH_DEFAULTS}
    # argparse fills in a default only where the namespace lacks the name: None here means not given (resolved
    # below, once the device is known), while --help still prints the parser's defaults
    args = ap.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(CPU_BATCH_DEFAULTS)))
    if args.arch is None:
        args.arch = "qwen" if args.model.startswith("qwen") else "gpt"
    for name, value in zip(("model_dim", "n_layer", "n_head"), MODEL_PRESETS[args.model]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in zip(("n_kv_head", "mlp_hidden", "rope_base"), ARCH_DEFAULTS[args.arch]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.n_kv_head = args.n_kv_head or args.n_head
    args.mlp_hidden = args.mlp_hidden or 4 * args.model_dim
    if args.lr is None:
        args.lr = LR_DEFAULTS[args.optimizer]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    val_tokens_given = args.val_tokens is not None
    for name, value in (CPU_BATCH_DEFAULTS if args.device == "cpu" else parser_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not val_tokens_given and args.sequence_length > 0:
        args.val_tokens -= args.val_tokens % args.sequence_length
    if args.micro_batch_size == 0:
        rank_batch = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
        args.micro_batch_size = default_micro_batch(args.model, args.device, args.device_batch_size, rank_batch)
    if args.run_name is None and args.resume is None:
        args.run_name = default_run_name(args)
    if args.no_triton:
        if args.kernels == "triton":
            raise ConfigError("--no_triton contradicts --kernels triton: give one")
        args.kernels = "torch"
    if args.kernels == "auto":
        args.kernels = "triton" if (args.device == "cuda" and triton is not None) else "torch"
    validate_flags(args)
    return args


def default_micro_batch(model, device, device_batch_size, rank_batch, gpu_gib=None):
    """On CUDA: the preset's measured micro-batch, halved while its peak does not fit MEMORY_HEADROOM of the
    GPU, or doubled while twice its peak (an upper bound, as only the activations grow) fits it, as a divisor
    of rank_batch (one process's share of the global batch; the micro-batch does not change the math). Else
    device_batch_size. gpu_gib: the GPU's memory (default: GPU 0's)."""
    if device != "cuda" or model not in MICRO_BATCH_PEAK:
        return device_batch_size
    if gpu_gib is None:
        gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    micro, peak = MICRO_BATCH_PEAK[model]
    while peak > MEMORY_HEADROOM * gpu_gib and micro > 1:  # a smaller GPU than the measurement's
        micro, peak = micro // 2, peak / 2
    while 2 * peak <= MEMORY_HEADROOM * gpu_gib and 2 * micro <= rank_batch:
        micro, peak = 2 * micro, 2 * peak
    return math.gcd(micro, rank_batch)


def default_run_name(args):
    return f"{args.optimizer}_{args.model}_{time.strftime('%Y%m%d-%H%M%S')}"


def validate_flags(args, world_size=1):
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    for name, value in vars(args).items():  # nan and inf pass comparisons like lr * wd < 1 (0 * inf, ...)
        need(not isinstance(value, float) or math.isfinite(value), f"--{name} must be a finite number, got {value}")
    for name in ("batch_size", "device_batch_size", "micro_batch_size", "sequence_length", "num_iterations",
                 "val_loss_every", "val_tokens", "model_dim", "n_layer", "n_head", "vocab_size", "mlp_hidden"):
        need(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")
    need(args.batch_size % (args.device_batch_size * world_size) == 0,
         f"--batch_size {args.batch_size} must be a multiple of --device_batch_size {args.device_batch_size} "
         f"x {world_size} processes: change one of them")
    need((args.batch_size // world_size) % args.micro_batch_size == 0,
         f"--micro_batch_size {args.micro_batch_size} must divide each process's share of the global batch "
         f"(--batch_size {args.batch_size} / {world_size} processes)")
    need(args.model_dim % args.n_head == 0 and (args.model_dim // args.n_head) % 2 == 0,
         f"--model_dim {args.model_dim} must split into --n_head {args.n_head} heads of even size")
    need(args.n_kv_head > 0 and args.n_head % args.n_kv_head == 0,
         f"--n_head {args.n_head} must be a multiple of --n_kv_head {args.n_kv_head}")
    need(args.arch == "qwen" or (args.n_kv_head == args.n_head and args.mlp_hidden == 4 * args.model_dim),
         "--n_kv_head and --mlp_hidden are for --arch qwen; the gpt block has n_kv_head = n_head, 4d MLP")
    for name in ("warmup_ratio", "warmdown_ratio"):
        need(0 <= getattr(args, name) <= 1, f"--{name} is a fraction of --num_iterations: give a value in [0, 1], "
             f"got {getattr(args, name)}")
    need(args.warmup_ratio + args.warmdown_ratio <= 1,
         f"--warmup_ratio {args.warmup_ratio} and --warmdown_ratio {args.warmdown_ratio} must sum to at most 1")
    need(args.val_tokens % args.sequence_length == 0,
         f"--val_tokens {args.val_tokens} is not a multiple of --sequence_length {args.sequence_length}: give "
         f"{max(args.val_tokens // args.sequence_length, 1) * args.sequence_length} (whole sequences)")
    need(args.p_switch_step >= 0, f"--p_switch_step must be >= 0 (a step of the run), got {args.p_switch_step}")
    need(args.rope_base > 0, f"--rope_base must be > 0, got {args.rope_base}")
    need(args.ddp_bucket_mb > 0, f"--ddp_bucket_mb must be > 0 (megabytes of gradient per all-reduce), "
         f"got {args.ddp_bucket_mb}")
    need(args.target_loss is None or args.target_loss > 0,
         f"--target_loss must be > 0 (a cross-entropy loss), got {args.target_loss}")
    need(args.run_name is None or (args.run_name.strip(".") and "/" not in args.run_name
                                   and os.sep not in args.run_name),
         f"--run_name {args.run_name!r} must be a file name (no '/', not '.' or '..'): it names "
         f"<log_dir>/<run_name>.txt")
    need(args.dynmuon_tau > 0 and args.dynmuon_w > 0,
         f"--dynmuon_tau and --dynmuon_w must be > 0, got {args.dynmuon_tau} and {args.dynmuon_w}")
    need(args.dynmuon_pmin <= args.dynmuon_pmax,
         f"--dynmuon_pmin {args.dynmuon_pmin} must not exceed --dynmuon_pmax {args.dynmuon_pmax}")
    need(-1 <= args.dynmuon_pmin and args.dynmuon_pmax <= 1,
         "--dynmuon_pmin/--dynmuon_pmax must lie in [-1, 1] (the Taylor correction is only sane there)")
    need(args.val_tokens >= world_size * args.sequence_length,
         f"--val_tokens must hold at least one sequence per process ({world_size} x --sequence_length "
         f"{args.sequence_length} = {world_size * args.sequence_length}); raise --val_tokens")
    need(args.device == "cpu" or torch.cuda.is_available(),
         "--device cuda asked for but no CUDA GPU is visible: use --device cpu or check CUDA_VISIBLE_DEVICES")
    need(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    need(args.scalar_lr > 0, f"--scalar_lr must be > 0, got {args.scalar_lr}")
    need(0 <= args.mu < 1, f"--mu must lie in [0, 1), got {args.mu}")
    need(args.weight_decay >= 0 and args.lr * args.weight_decay < 1,
         f"--weight_decay must be >= 0 with --lr x --weight_decay < 1 (W is multiplied by 1 - lr wd each step), "
         f"got --weight_decay {args.weight_decay} at --lr {args.lr}")
    need(args.checkpoint_freq >= 0, f"--checkpoint_freq must be >= 0 (0: only at the end), got {args.checkpoint_freq}")
    need(args.keep_checkpoints >= 1, f"--keep_checkpoints must be >= 1 (the newest is the one to resume), "
         f"got {args.keep_checkpoints}")
    need(args.checkpoint_freq == 0 or args.checkpoint_dir is not None,
         f"--checkpoint_freq {args.checkpoint_freq} without --checkpoint_dir would write no checkpoint: give "
         f"--checkpoint_dir DIR (or drop --checkpoint_freq)")
    need(args.resume is None or args.resume == "auto" or Path(args.resume).is_file(),
         f"--resume {args.resume}: no such checkpoint file (give a .pt path or 'auto')")
    need(args.resume != "auto" or args.checkpoint_dir is not None, "--resume auto needs --checkpoint_dir")
    need(args.target_loss is None or args.record is None, "give --target_loss or --record, not both")
    need(args.fp8 == "none" or not fp8_unfit_dims(args),
         f"--fp8 needs every matrix dimension to be a multiple of {FP8_DIM_MULTIPLE}: "
         f"{fp8_unfit_dims(args)} are not (change them or use --fp8 none)")
    need(args.fp8 == "none" or args.device == "cpu" or torch.cuda.get_device_capability() >= (8, 9),
         "--fp8 needs an FP8 tensor-core GPU (compute capability 8.9+: H100, H200, L40, RTX 4090): "
         "use --fp8 none on this GPU")
    need(args.kernels == "torch" or (triton is not None and (args.device == "cuda" or TRITON_INTERPRET)),
         "--kernels triton needs triton and a CUDA device (or TRITON_INTERPRET=1): use --kernels torch")
    need(not (args.wandb and args.no_wandb), "--wandb and --no_wandb contradict each other: give one")
    for mesh in ("fs_size", "tp_size"):
        need(getattr(args, mesh) in (None, 1), f"--{mesh} {getattr(args, mesh)}: this trainer has no sharded or "
             f"tensor-parallel mesh; drop --{mesh} and run data-parallel with torchrun --nproc_per_node=N "
             f"(the global batch and the math stay the same)")
    need(args.dp_size in (None, world_size), f"--dp_size {args.dp_size} but {world_size} processes: drop --dp_size "
         f"(torchrun --nproc_per_node sets the data-parallel size)")
    need(args.data_seed is None or args.data_seed >= 0, f"--data_seed must be >= 0, got {args.data_seed}")


def fp8_unfit_dims(args):
    """The dimensions (as flag names) of the --fp8 matmuls that torch._scaled_mm cannot take."""
    head_fp8, _ = FP8_SCOPES[args.fp8]
    dims = {"model_dim": args.model_dim, "mlp_hidden": args.mlp_hidden,
            "n_kv_head x head size": args.n_kv_head * (args.model_dim // args.n_head)}
    dims.update({"vocab_size": args.vocab_size} if head_fp8 else {})
    return [name for name, n in dims.items() if n % FP8_DIM_MULTIPLE]


def lr_multiplier(step, args):
    """LR multiplier for the update at 0-based step, applied to every parameter group."""
    T = args.num_iterations
    warmup = round(args.warmup_ratio * T)
    if step < warmup:
        return (step + 1) / warmup
    if args.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, T - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    warmdown = round(args.warmdown_ratio * T)
    if step >= T - warmdown:
        return (T - step) / warmdown
    return 1.0


def make_p_schedule(args):
    """p_t as a function of the 1-based update count t (SPEC §1). Muon and NorMuon: p = 0."""
    if args.optimizer in ("muon", "normuon"):
        return lambda t: 0.0
    T, pmax, pmin = args.num_iterations, args.dynmuon_pmax, args.dynmuon_pmin

    def logistic(t):
        u = (t / T - args.dynmuon_tau) / args.dynmuon_w
        a = 0.5 * (1 - math.tanh(u / 2))  # = 1/(1+exp(u)) without overflow
        return pmin + a * (pmax - pmin)
    return {
        "logistic": logistic,
        "fixed": lambda t: pmin,
        "switch": lambda t: pmax if t <= args.p_switch_step else pmin,
        "reverse": lambda t: pmax + pmin - logistic(t),
    }[args.p_schedule]


# -----------------------------------------------------------------------------
# Optimizer math: Newton-Schulz and spectral shaping, plain torch, batched over same-shape wide matrices

NS_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
ANCHOR_RAW = 0.25  # p >= this: the update is the momentum matrix itself


def newton_schulz(G):
    """Polar factor of each wide matrix in G [..., m, n] (m <= n) by 5 bf16 iterations.

    Returns (X, gram): X approximates U V^T, gram = Xn Xn^T of the first iteration, which
    Fast-Spectral reuses."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    gram = None
    for a, b, c in NS_COEFFS:
        A = X @ X.mT
        if gram is None:
            gram = A
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X, gram


def taylor_coeffs(p):
    """(d, g) of Fast-Spectral's C = I + d E + g E^2: d = p/2, g = d(d-1)/2."""
    d = p / 2
    return d, 0.5 * d * (d - 1)


def scalar_factor(p):
    """c0 = 1 - d + g: Fast-Spectral's C when A = Un Un^T is 0, i.e. E = -I. A's eigenvalues sum to 1, so for
    a matrix with many significant directions A is small and C is close to c0 I."""
    d, g = taylor_coeffs(p)
    return 1 - d + g


def fast_spectral(U, p, ns=newton_schulz):
    """Fast-Spectral(U, p) for wide U [..., m, n]: |U|_F^p (I + dE + g E^2) NS(U), E = Un Un^T - I: a
    second-order Taylor expansion of (Un Un^T)^(p/2)."""
    norm = U.float().norm(dim=(-2, -1), keepdim=True)
    Y, gram = ns(U)
    d, g = taylor_coeffs(p)
    eye = torch.eye(U.size(-2), device=U.device, dtype=torch.float32)
    E = gram.float() - eye
    C = eye + d * E + g * (E @ E)
    return (norm.pow(p) * (C @ Y.float())).bfloat16()


def scalar_spectral(U, p, ns=newton_schulz):
    """--spectral scalar: c0 |U|_F^p NS(U), Fast-Spectral with A replaced by 0 (no reshaping of directions,
    only a per-matrix step size that grows as |U|_F shrinks)."""
    norm = U.float().norm(dim=(-2, -1), keepdim=True)
    return (scalar_factor(p) * norm.pow(p) * ns(U)[0].float()).bfloat16()


def polar_spectral(U, p, ns=newton_schulz):
    """--spectral polar: plain NS for p < 0, so DynMuon is the raw-momentum phase followed by Muon."""
    return ns(U)[0]


def svd_spectral(U, p, ns=None):
    """Exact spectral shaping U S^p V^T by SVD in fp32 (slow reference); singular values below 1e-7 of
    the largest are treated as zero and stay zero."""
    u, s, vh = torch.linalg.svd(U.float(), full_matrices=False)
    s_p = torch.where(s > s.amax(-1, keepdim=True) * 1e-7, s.clamp_min(1e-30).pow(p), torch.zeros_like(s))
    return ((u * s_p.unsqueeze(-2)) @ vh).bfloat16()


# --spectral exact: U S^p V^T = (X X^T)^((p-1)/2) X without an SVD. f(l) = l^-a, a = (1 - p)/2, as a sum of
# resolvents from a quadrature of the Stieltjes integral
#     l^-a = sin(pi a)/pi * int_R e^((1-a)u) / (e^u + l) du        (0 < a <= 1),
# so f(A) = sum_k w_k (A + tau_k I)^-1: one batched float64 Cholesky per pole, no eigensolver, no iteration.
EXACT_FLOOR = 1e-7  # sigma / sigma_max below which exact_spectral rolls the output off to 0, as svd_spectral zeroes it
EXACT_STEP = 2.0    # quadrature step in log t: relative error of the rational approximation <= 2.1e-4


def stieltjes_poles(a, lo, hi, h=EXACT_STEP, tau_min=None):
    """Poles tau_k > 0 and weights w_k > 0 with sum_k w_k / (x + tau_k) ~ x^-a on [100 lo, hi / 10], 0 < a <= 1.

    Trapezoid rule of step h in u = log t on the Stieltjes integral above, nodes from lo to >= hi; the
    discretisation error is ~exp(-2 pi^2 / h), as the integrand's poles lie at distance pi from the real axis.
    Each infinite tail of nodes is lumped into one pole matching its first two moments, which leaves a
    relative error O((t/x)^2) for the tail below (above) x. tau_min (default lo / 100) keeps the lumped
    low pole off zero when a -> 1, where the integral's mass collapses to t = 0."""
    b = 1.0 - a
    c = math.sin(math.pi * a) / math.pi
    u0, n = math.log(lo), math.ceil((math.log(hi) - math.log(lo)) / h)
    us = [u0 + k * h for k in range(n + 1)]
    taus = [math.exp(u) for u in us]
    ws = [c * h * math.exp(b * u) for u in us]
    # low tail u_k = u0 - j h, j >= 1: s0 = sum w_k (-> 1 as a -> 1), s1 = sum w_k t_k
    s0 = 1.0 if b * h < 1e-12 else (math.sin(math.pi * b) / math.pi) * h * math.exp(b * u0) / math.expm1(b * h)
    s1 = c * h * math.exp((1 + b) * u0) / math.expm1((1 + b) * h)
    taus.insert(0, max(s1 / s0, lo / 100 if tau_min is None else tau_min))
    ws.insert(0, s0)
    # high tail u_k = u_n + j h: w/t ~ 1/t_k - x/t_k^2; s1 = sum w/t, s2 = sum w/t^2; pole s1/s2, weight s1^2/s2
    un = us[-1]
    s1 = c * h * math.exp((b - 1) * un) / math.expm1((1 - b) * h)
    s2 = c * h * math.exp((b - 2) * un) / math.expm1((2 - b) * h)
    taus.append(s1 / s2)
    ws.append(s1 * s1 / s2)
    return taus, ws


def lambda_max(A, iters=12):
    """Largest eigenvalue of each symmetric PSD A [..., m, m] by power iteration (a lower bound, close)."""
    m = A.size(-1)
    v = torch.cos(torch.arange(m, device=A.device, dtype=A.dtype) * 0.7) + 1.5  # fixed, no RNG state used
    v = v.expand(A.shape[:-1]).unsqueeze(-1)
    for _ in range(iters):
        v = A @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    rq = (v.mT @ A @ v).squeeze(-1)  # [..., 1]
    tr = A.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / m
    return torch.maximum(rq, tr).clamp_min(1e-300).unsqueeze(-1)  # [..., 1, 1]


def resolvent_sum(M, taus, ws, chunk_bytes=1 << 30):
    """F = sum_k w_k (M + tau_k I)^-1 for symmetric PSD M [..., m, m] (float64): batched Cholesky per pole,
    L^-1 by a triangular solve, (M + tau I)^-1 = L^-T L^-1. Poles go in chunks of ~chunk_bytes."""
    m = M.size(-1)
    eye = torch.eye(m, device=M.device, dtype=M.dtype)
    per = max(1, chunk_bytes // max(1, M.numel() * M.element_size()))
    F = torch.zeros_like(M)
    for i in range(0, len(taus), per):
        t = torch.tensor(taus[i:i + per], device=M.device, dtype=M.dtype).view(-1, *([1] * M.dim()))
        w = torch.tensor(ws[i:i + per], device=M.device, dtype=M.dtype).view(-1, *([1] * M.dim()))
        L = torch.linalg.cholesky_ex(M.unsqueeze(0) + t * eye)[0]  # no sync; PD by construction (tau > 0)
        Li = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
        F = F + ((w * Li).mT @ Li).sum(0)
    return F


def exact_spectral(X, p, ns=None, floor=EXACT_FLOOR, h=EXACT_STEP, out_dtype=torch.bfloat16):
    """U S^p V^T for wide X [..., m, n] (m <= n), -1 <= p < 1, as (X X^T)^((p-1)/2) X in float64.

    A = X X^T in float64 (its squared condition number is harmless at that precision), scaled by its top
    eigenvalue; f(A) = sum_k w_k (A + tau_k I)^-1 from stieltjes_poles over [floor^2, 10], one batched Cholesky
    per pole; D = f(A) X. Each singular value s >= 10 floor s_max gets s^p to the quadrature's accuracy (2e-4
    relative); below floor s_max the output rolls off to 0, so zero singular values stay zero as in
    svd_spectral. bench/NOTES.md has its accuracy and cost against svd_spectral and NS."""
    assert -1.0 <= p < 1.0, p
    X64 = X.double()
    A = X64 @ X64.mT
    lam = lambda_max(A)
    a = (1.0 - p) / 2
    taus, ws = stieltjes_poles(a, floor * floor, 10.0, h)
    F = resolvent_sum(A / lam, taus, ws)
    return (lam.pow(-a) * (F @ X64)).to(out_dtype)


NEGATIVE_STAGES = {  # --spectral: the transform of the p < 0 stage, f(U, p, ns)
    "taylor": fast_spectral, "scalar": scalar_spectral, "polar": polar_spectral, "exact": exact_spectral,
    "svd": svd_spectral,
}


def spectral_transform(U, p, negative=fast_spectral, ns=newton_schulz):
    """The stage-wise operator of DynMuon (positive anchoring) on a batch of wide bf16 matrices."""
    if p >= ANCHOR_RAW:
        return U
    if p >= 0:
        return ns(U)[0]
    return negative(U, p, ns)


def direction_factor(U, out, p, spectral):
    """Per matrix of the stack, the factor by which the update O multiplies NS(U)'s directions on average
    (what scales lr sqrt(out/in)): the raw stage |U|_F / sqrt(m) (U's RMS singular value), the NS stage and
    `polar` 1, `taylor` and `scalar` c0 |U|_F^p (Fast-Spectral's scalar part), `exact`/`svd` |O|_F / sqrt(m)."""
    m = U.size(-2)
    if p >= ANCHOR_RAW:
        return U.float().norm(dim=(-2, -1)) / math.sqrt(m)
    if p >= 0 or spectral == "polar":
        return torch.ones(U.shape[:-2], device=U.device)
    if spectral in ("taylor", "scalar"):
        return scalar_factor(p) * U.float().norm(dim=(-2, -1)).pow(p)
    return out.float().norm(dim=(-2, -1)) / math.sqrt(m)


# -----------------------------------------------------------------------------
# Optimizers

def as_wide(w):
    """A [..., out, in] tensor as a stack [k, rows <= cols] of its matrices, transposed if tall."""
    w = w.reshape(-1, *w.shape[-2:])
    return w.mT if w.size(-2) > w.size(-1) else w


LR_ADJUST = {  # --adjust_lr: the factor s of W <- W - lr s O for a matrix [out, in]
    "spectral_norm": lambda fan_out, fan_in: math.sqrt(fan_out / fan_in),  # O's spectral norm ~ sqrt(out/in)
    "rms_norm": lambda fan_out, fan_in: 0.2 * math.sqrt(max(fan_out, fan_in)),  # O's RMS ~ AdamW's, 0.2
}


class DynMuon(torch.optim.Optimizer):
    """Muon family for hidden matrices: DynMuon (p schedule), Muon (p = 0), NorMuon (normuon=True).

    A parameter of shape [..., out, in] is a stack of independent matrices. Per step:
    M <- mu M + G; U = bf16(mu M + G); O = transform(U); W <- W (1 - lr wd) - lr sqrt(out/in) O.
    Under torch.distributed every rank holds the averaged gradients and all momenta; the
    transforms of each same-shape group are split across ranks and all-gathered."""

    def __init__(self, params, lr, mu, weight_decay, p_schedule, spectral="taylor", normuon=False, fused=False,
                 adjust_lr="spectral_norm"):
        super().__init__(params, dict(lr=lr, mu=mu, weight_decay=weight_decay, step=0))
        self.p_schedule, self.spectral, self.normuon, self.lr_scale = p_schedule, spectral, normuon, LR_ADJUST[adjust_lr]
        self.ns = newton_schulz_fused if fused else newton_schulz
        self.negative = (FUSED_NEGATIVE_STAGES if fused else NEGATIVE_STAGES)[spectral]
        self.last_p = None
        self.last_factor = None  # direction_factor of every matrix at the last step (fp32, on the device)

    def _shape_groups(self):
        """(group, parameters) per param group and wide shape of the parameters' matrices."""
        groups = {}
        for i, group in enumerate(self.param_groups):
            for w in group["params"]:
                m, n = w.shape[-2:]
                groups.setdefault((i, min(m, n), max(m, n)), (group, []))[1].append(w)
        return groups.values()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] += 1
        p = self.last_p = self.p_schedule(self.param_groups[0]["step"])
        launched = []  # every shape group's transform is started (and its all-gather in flight) before any waits
        for group, params in self._shape_groups():
            updates = self._nesterov_updates(params, group["mu"])
            wide = torch.cat([as_wide(u) for u in updates]).bfloat16()
            launched.append((group, params, wide, *self._distributed_transform(wide, p)))
        factors = []
        for group, params, wide, out, gather in launched:
            if gather is not None:
                gather.wait()
            factors.append(direction_factor(wide, out, p, self.spectral))
            out = out.to(params[0].dtype)
            updates = [(o.mT if w.size(-2) > w.size(-1) else o).reshape(w.shape)
                       for w, o in zip(params, out.split([w[..., 0, 0].numel() for w in params]))]
            if self.normuon:
                updates = [self._normalize_rows(w, o) for w, o in zip(params, updates)]
            self._apply_updates(params, updates, group)
        self.last_factor = torch.cat(factors)

    def _nesterov_updates(self, params, mu):
        """M <- mu M + G for each parameter; returns the Nesterov updates mu M + G (fp32)."""
        for w in params:
            if "momentum" not in self.state[w]:
                self.state[w]["momentum"] = torch.zeros_like(w, dtype=torch.float32)
        momenta, grads = [self.state[w]["momentum"] for w in params], [w.grad.float() for w in params]
        torch._foreach_mul_(momenta, mu)
        torch._foreach_add_(momenta, grads)
        updates = torch._foreach_mul(momenta, mu)
        torch._foreach_add_(updates, grads)
        return updates

    def _apply_updates(self, params, updates, group):
        """W <- W (1 - lr wd) - lr s O with s = lr_scale(out, in), one foreach call per distinct s."""
        lr = group["lr"]
        by_scale = {}
        for w, o in zip(params, updates):
            by_scale.setdefault(self.lr_scale(*w.shape[-2:]), []).append((w, o))
        for scale, pairs in by_scale.items():
            ws, os_ = [w for w, _ in pairs], [o for _, o in pairs]
            torch._foreach_mul_(ws, 1 - lr * group["weight_decay"])
            torch._foreach_add_(ws, os_, alpha=-lr * scale)

    def _distributed_transform(self, wide, p):
        """(transformed stack, pending all-gather or None): this rank transforms its share of the stack and
        starts gathering the others' shares asynchronously; the stack is valid once the gather is waited on."""
        if p >= ANCHOR_RAW:  # identity: no work to split
            return wide, None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return spectral_transform(wide, p, self.negative, self.ns), None
        world, rank = dist.get_world_size(), dist.get_rank()
        count = wide.size(0)
        per_rank = -(-count // world)
        padded = torch.zeros(per_rank * world, *wide.shape[1:], dtype=wide.dtype, device=wide.device)
        padded[:count] = wide
        mine = spectral_transform(padded[rank * per_rank:(rank + 1) * per_rank], p, self.negative, self.ns)
        gathered = torch.empty_like(padded)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        return gathered[:count], gather(gathered, mine.contiguous(), async_op=True)

    def _normalize_rows(self, w, o):
        """NorMuon: divide each output row by the RMS of its running second moment, keep |O|_F."""
        state = self.state[w]
        o = o.float()
        if "row_var" not in state:
            state["row_var"] = torch.zeros(w.shape[:-1], dtype=torch.float32, device=w.device)
        V = state["row_var"]
        V.lerp_(o.square().mean(dim=-1), 1 - NORMUON_BETA2)
        norm_before = o.norm(dim=(-2, -1), keepdim=True)
        o = o / (V.sqrt().unsqueeze(-1) + 1e-8)
        return o * (norm_before / o.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30))


class Lion(torch.optim.Optimizer):
    """Lion (--scalar_opt lion): W <- W (1 - lr wd) - lr sign(b1 m + (1 - b1) g); then m <- b2 m + (1 - b2) g."""

    def __init__(self, params, lr, betas, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for w in group["params"]:
                if w.grad is None:
                    continue
                m = self.state[w].setdefault("exp_avg", torch.zeros_like(w))
                direction = m.lerp(w.grad, 1 - b1).sign_()
                w.mul_(1 - group["lr"] * group["weight_decay"]).add_(direction, alpha=-group["lr"])
                m.lerp_(w.grad, 1 - b2)


def build_optimizers(model, args):
    """(Dyn)Muon/NorMuon for the hidden matrices plus AdamW (or Lion) for embedding and head, or AdamW for all.
    Each group remembers its base lr in 'initial_lr'; the LR schedule multiplies it."""
    matrices = model.matrices()
    in_matrices = {id(p) for p in matrices}
    scalars = [p for p in model.parameters() if id(p) not in in_matrices]  # embedding, head, biases, norms
    adamw = dict(betas=ADAM_BETAS, eps=ADAM_EPS)
    if args.optimizer == "adamw":
        opts = [torch.optim.AdamW([dict(params=matrices, lr=args.lr, weight_decay=args.weight_decay),
                                   dict(params=scalars, lr=args.lr, weight_decay=0.0)], **adamw)]
    else:
        scalar_opt = (Lion(scalars, lr=args.scalar_lr, betas=ADAM_BETAS) if args.scalar_opt == "lion" else
                      torch.optim.AdamW(scalars, lr=args.scalar_lr, weight_decay=0.0, **adamw))
        opts = [scalar_opt, DynMuon(matrices, lr=args.lr, mu=args.mu, weight_decay=args.weight_decay,
                                    p_schedule=make_p_schedule(args), spectral=args.spectral,
                                    normuon=args.optimizer == "normuon", fused=args.kernels == "triton",
                                    adjust_lr=args.adjust_lr)]
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


# -----------------------------------------------------------------------------
# Model

def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def init_linear_(weight):
    """N(0, s^2) with s = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)) for a weight [..., out, in]."""
    fan_out, fan_in = weight.shape[-2:]
    nn.init.normal_(weight, std=fan_in ** -0.5 * min(1.0, math.sqrt(fan_out / fan_in)))


def rope(x, cos, sin):
    """Rotary position embedding of x [B, T, H, hd] (halves rotated as pairs) from fp32 tables [>= T, hd/2]."""
    T = x.size(1)
    cos, sin = cos[None, :T, None, :].to(x.dtype), sin[None, :T, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Rotary(nn.Module):
    """RoPE tables cos, sin [max_len, head_dim/2] (fp32); calling it ropes x [B, T, H, hd]."""

    def __init__(self, head_dim, max_len, base=10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x):  # x: [B, T, H, hd]
        return rope(x, self.cos, self.sin)


def qkv_norm_rope(qkv, cos, sin):
    """q, k RMS-normed and roped, and v, of the qkv projection [B, T, 3, H, hd]; cos, sin: fp32 [>= T, hd/2]."""
    return rope(rms_norm(qkv[:, :, 0]), cos, sin), rope(rms_norm(qkv[:, :, 1]), cos, sin), qkv[:, :, 2]


class CausalSelfAttention(nn.Module):
    """GPT attention: q, k, v, o of d x d, RMS QK-norm, RoPE, causal SDPA. fused: the norm and RoPE of q and k
    by a Triton kernel (qkv_norm_rope_fused) instead of torch ops."""

    def __init__(self, dim, n_head, max_len, rope_base, linear, fused):
        super().__init__()
        self.n_head, self.linear = n_head, linear
        self.norm_rope = qkv_norm_rope_fused if fused else qkv_norm_rope
        self.qkv = nn.Parameter(torch.empty(3, dim, dim))  # q, k, v: three matrices for the optimizer
        self.out = nn.Parameter(torch.empty(dim, dim))
        self.rotary = Rotary(dim // n_head, max_len, rope_base)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.linear(x, self.qkv.flatten(0, 1)).view(B, T, 3, self.n_head, D // self.n_head)
        q, k, v = self.norm_rope(qkv, self.rotary.cos, self.rotary.sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.linear(y.transpose(1, 2).reshape(B, T, D), self.out)


class MLP(nn.Module):
    def __init__(self, dim, hidden, linear):
        super().__init__()
        self.linear = linear
        self.fc = nn.Parameter(torch.empty(hidden, dim))
        self.proj = nn.Parameter(torch.empty(dim, hidden))

    def forward(self, x):
        return self.linear(F.relu(self.linear(x, self.fc)).square(), self.proj)


class Block(nn.Module):
    def __init__(self, dim, n_head, max_len, rope_base, hidden, linear, fused):
        super().__init__()
        self.attn = CausalSelfAttention(dim, n_head, max_len, rope_base, linear, fused)
        self.mlp = MLP(dim, hidden, linear)

    def forward(self, x):
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GQAttention(nn.Module):
    """Qwen attention: grouped-query (n_kv_head shared k/v heads), q/k/v with bias, no QK-norm."""

    def __init__(self, dim, n_head, n_kv_head, max_len, rope_base, linear):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.linear = linear
        kv_dim = n_kv_head * self.head_dim
        self.q = nn.Parameter(torch.empty(dim, dim))
        self.kv = nn.Parameter(torch.empty(2, kv_dim, dim))  # k, v: two matrices for the optimizer
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.kv_bias = nn.Parameter(torch.zeros(2 * kv_dim))  # 1-D: a bias, so AdamW's and zero at init
        self.out = nn.Parameter(torch.empty(dim, dim))
        self.rotary = Rotary(self.head_dim, max_len, rope_base)

    def forward(self, x):
        B, T, D = x.shape
        q = self.linear(x, self.q, self.q_bias).view(B, T, self.n_head, self.head_dim)
        k, v = self.linear(x, self.kv.flatten(0, 1), self.kv_bias).view(
            B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.linear(y.transpose(1, 2).reshape(B, T, D), self.out)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, linear):
        super().__init__()
        self.linear = linear
        self.gate_up = nn.Parameter(torch.empty(2, hidden, dim))  # gate, up: two matrices
        self.down = nn.Parameter(torch.empty(dim, hidden))

    def forward(self, x):
        gate, up = self.linear(x, self.gate_up.flatten(0, 1)).chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, self.down)


class QwenBlock(nn.Module):
    def __init__(self, dim, n_head, n_kv_head, max_len, rope_base, hidden, linear):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = GQAttention(dim, n_head, n_kv_head, max_len, rope_base, linear)
        self.mlp = SwiGLU(dim, hidden, linear)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


def at_least_fp32(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))


def linear_cross_entropy(h, weight, targets, linear=F.linear):
    """Mean cross-entropy of logits = linear(h, W) in fp32 for h [N, d], targets [N]."""
    return F.cross_entropy(at_least_fp32(linear(h, weight)), targets)


class GPT(nn.Module):
    """Token embedding, blocks, final RMSNorm, untied lm_head; returns the mean cross-entropy (fp32 logits).
    fused: the Triton QK-norm + RoPE and cross-entropy kernels; --fp8 swaps F.linear for fp8_linear."""

    def __init__(self, args):
        super().__init__()
        dim, max_len = args.model_dim, args.sequence_length
        fused = args.kernels == "triton"
        head_fp8, blocks_fp8 = FP8_SCOPES[args.fp8]
        block_linear = fp8_linear if blocks_fp8 else F.linear
        self.embed = nn.Embedding(args.vocab_size, dim)
        if args.arch == "qwen":
            self.blocks = nn.ModuleList(QwenBlock(dim, args.n_head, args.n_kv_head, max_len, args.rope_base,
                                                  args.mlp_hidden, block_linear) for _ in range(args.n_layer))
            self.final_norm = nn.RMSNorm(dim, eps=1e-6)
        else:
            self.blocks = nn.ModuleList(Block(dim, args.n_head, max_len, args.rope_base, args.mlp_hidden,
                                              block_linear, fused) for _ in range(args.n_layer))
            self.final_norm = rms_norm
        self.lm_head = nn.Parameter(torch.empty(args.vocab_size, dim))  # untied
        if head_fp8:
            self.train_loss = self.eval_loss = partial(linear_cross_entropy, linear=fp8_linear)
        else:  # the fused loss computes its gradient in the forward: training only
            self.train_loss = fused_linear_cross_entropy if fused else linear_cross_entropy
            self.eval_loss = linear_cross_entropy
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, std=0.02)
        for p in [*self.matrices(), self.lm_head]:
            init_linear_(p)

    def matrices(self):
        """The hidden matrices (the Muon family's parameters); biases and norm weights are 1-D, so not."""
        return [p for p in self.blocks.parameters() if p.ndim >= 2]

    def forward(self, idx, targets):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        loss = self.train_loss if torch.is_grad_enabled() else self.eval_loss
        return loss(self.final_norm(x).flatten(0, 1), self.lm_head, targets.reshape(-1))


def build_model(args, device="cpu"):
    with torch.device(device):
        return GPT(args)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# Kernels: fused Triton versions of the Newton-Schulz math and of the model's attention and loss, and FP8 matmuls

# Triton kernels (fp32 accumulation), chosen once by --kernels; CPU-testable under TRITON_INTERPRET=1.
# Newton-Schulz and Fast-Spectral (newton_schulz_fused, fast_spectral_fused), batched:
#   _sym_kernel:    Out = alpha X X^T (+ beta X + diag I for square X): only the upper-triangle tiles
#                   are computed, each stored twice (in place and mirrored). Gives A = X X^T and, as A is
#                   symmetric (A A = A A^T), B = b A + c A^2 with the b A epilogue fused.
#   _update_kernel: Out = s (a X + B X), a batched matmul with the a X and per-matrix scale fused.
# With bf16 outputs the epilogues round each op like eager torch bf16 does, so both paths agree.
# The attention's RMS QK-norm + RoPE (qkv_norm_rope_fused): _qk_norm_rope_kernel, forward or backward in fp32
# per head row of q or k (v: a copy), reads them in place from the qkv projection and writes its gradient in
# place. The loss (fused_linear_cross_entropy): _cross_entropy_kernel, per row of logits the fp32 cross-entropy
# and its gradient in one kernel (two passes over each row: online logsumexp, then the gradient).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_BLOCKS = (32, 64, 4, 1) if TRITON_INTERPRET else (128, 64, 8, 3)  # BLOCK_MN, BLOCK_K, warps, stages
QK_ROWS_PER_PROGRAM = 4 if TRITON_INTERPRET else 64  # head rows per program of _qk_norm_rope_kernel
CE_BLOCK = 64 if TRITON_INTERPRET else 4096  # vocabulary entries per iteration of _cross_entropy_kernel

if triton is not None:
    @triton.jit
    def _cast(x, dtype: tl.constexpr, EMU: tl.constexpr):
        """x.to(dtype); under EMU fp32 -> bf16 rounds to nearest-even by hand (the interpreter truncates)."""
        if EMU and dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            x = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _bf(x, EMU: tl.constexpr):
        """fp32 x rounded to bf16 and back (what an eager torch bf16 op returns)."""
        return _cast(x, tl.bfloat16, EMU).to(tl.float32)

    @triton.jit
    def _sym_kernel(X, Out, pairs, n_pairs, M, K, sxb, sxm, sxk, sob, som, son, alpha, beta, diag,
                    EPILOGUE: tl.constexpr, RND: tl.constexpr, EMU: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr):
        pid, bid = tl.program_id(0), tl.program_id(1)
        ti = tl.load(pairs + pid)  # tile row <= tile col
        tj = tl.load(pairs + n_pairs + pid)
        X += bid.to(tl.int64) * sxb
        Out += bid.to(tl.int64) * sob
        ri = ti * BM + tl.arange(0, BM)
        rj = tj * BM + tl.arange(0, BM)
        rk = tl.arange(0, BK)
        pa = X + ri[:, None] * sxm + rk[None, :] * sxk  # rows ri of X         [BM, BK]
        pb = X + rj[None, :] * sxm + rk[:, None] * sxk  # rows rj of X, as X^T [BK, BM]
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BK)):
            kk = k * BK + rk
            a = tl.load(pa, mask=(ri[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(pb, mask=(rj[None, :] < M) & (kk[:, None] < K), other=0.0)
            if EMU:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc=acc)
            pa += BK * sxk
            pb += BK * sxk
        mask = (ri[:, None] < M) & (rj[None, :] < M)
        if EPILOGUE:  # X square: alpha X X + beta X + diag I
            x = tl.load(X + ri[:, None] * sxm + rj[None, :] * sxk, mask=mask, other=0.0).to(tl.float32)
            if RND:  # rounded like eager torch bf16: b * A + c * (A @ A)
                acc = _bf(alpha * _bf(acc, EMU), EMU) + _bf(beta * x, EMU)
            else:
                acc = alpha * acc + beta * x
            acc += tl.where(ri[:, None] == rj[None, :], diag, 0.0)
        else:
            acc = acc * alpha
        val = _cast(acc, Out.dtype.element_ty, EMU)
        tl.store(Out + ri[:, None] * som + rj[None, :] * son, val, mask=mask)
        if ti < tj:  # mirror: Out[rj, ri] = tile^T
            tl.store(Out + rj[None, :] * som + ri[:, None] * son, val, mask=mask)

    @triton.jit
    def _update_kernel(Bm, X, Out, scale, M, N, sbb, sbm, sbk, sxb, sxm, sxn, sob, som, son, a,
                       HAS_SCALE: tl.constexpr, RND: tl.constexpr, EMU: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr):
        pid, bid = tl.program_id(0), tl.program_id(1)
        tiles_m = tl.cdiv(M, BM)
        pm, pn = pid % tiles_m, pid // tiles_m  # row tiles fastest: neighbours share X's columns
        Bm += bid.to(tl.int64) * sbb
        X += bid.to(tl.int64) * sxb
        Out += bid.to(tl.int64) * sob
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BM + tl.arange(0, BM)
        rk = tl.arange(0, BK)
        pb = Bm + rm[:, None] * sbm + rk[None, :] * sbk  # [BM, BK]
        px = X + rk[:, None] * sxm + rn[None, :] * sxn  # [BK, BN]
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        for k in range(0, tl.cdiv(M, BK)):
            kk = k * BK + rk
            b = tl.load(pb, mask=(rm[:, None] < M) & (kk[None, :] < M), other=0.0)
            x = tl.load(px, mask=(kk[:, None] < M) & (rn[None, :] < N), other=0.0)
            if EMU:
                b = b.to(tl.float32)
            acc = tl.dot(b, x.to(b.dtype), acc=acc)  # bf16 B: bf16 MMA; fp32 B: tf32 on GPU
            pb += BK * sbk
            px += BK * sxm
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        if a != 0.0:
            x = tl.load(X + rm[:, None] * sxm + rn[None, :] * sxn, mask=mask, other=0.0).to(tl.float32)
            if RND:  # rounded like eager torch bf16: a * X + B @ X
                acc = _bf(acc, EMU) + _bf(a * x, EMU)
            else:
                acc += a * x
        if HAS_SCALE:
            acc = acc * tl.load(scale + bid)
        val = _cast(acc, Out.dtype.element_ty, EMU)
        tl.store(Out + rm[:, None] * som + rn[None, :] * son, val, mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(X, G, Cos, Sin, Out, n_rows, heads, seq_len, sx_tok, sg_tok, so_tok, eps,
                             BACKWARD: tl.constexpr, NORM_ROPE: tl.constexpr, HALF: tl.constexpr,
                             HALF_P2: tl.constexpr, BR: tl.constexpr, EMU: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)  # row = token * heads + head; X, G, Out: token stride s*_tok
        cols = tl.arange(0, HALF_P2)
        mask = (rows < n_rows)[:, None] & (cols < HALF)[None, :]
        tok = (rows // heads).to(tl.int64)
        in_row = ((rows % heads) * 2 * HALF)[:, None] + cols[None, :]
        px = X + (tok * sx_tok)[:, None] + in_row
        pg = G + (tok * sg_tok)[:, None] + in_row
        if not NORM_ROPE:  # v: the output is X, its gradient is G
            src = pg if BACKWARD else px
            y1 = tl.load(src, mask=mask)
            y2 = tl.load(src + HALF, mask=mask)
        else:
            x1 = tl.load(px, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(px + HALF, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
            n1, n2 = x1 * r, x2 * r
            pcs = ((tok % seq_len) * HALF)[:, None] + cols[None, :]
            c = tl.load(Cos + pcs, mask=mask, other=0.0)
            s = tl.load(Sin + pcs, mask=mask, other=0.0)
            if BACKWARD:  # G: gradient of the output; Out: gradient of X
                g1 = tl.load(pg, mask=mask, other=0.0).to(tl.float32)
                g2 = tl.load(pg + HALF, mask=mask, other=0.0).to(tl.float32)
                gn1, gn2 = g1 * c + g2 * s, g2 * c - g1 * s  # rotated back
                dot = ((tl.sum(gn1 * n1, 1) + tl.sum(gn2 * n2, 1)) / (2 * HALF))[:, None]
                y1, y2 = r * (gn1 - n1 * dot), r * (gn2 - n2 * dot)
            else:
                y1, y2 = n1 * c - n2 * s, n1 * s + n2 * c
            y1, y2 = _cast(y1, Out.dtype.element_ty, EMU), _cast(y2, Out.dtype.element_ty, EMU)
        po = Out + (tok * so_tok)[:, None] + in_row
        tl.store(po, y1, mask=mask)
        tl.store(po + HALF, y2, mask=mask)

    @triton.jit
    def _cross_entropy_kernel(Logits, Targets, Loss, Grad, V, s_logits, s_grad, inv_n,
                              BV: tl.constexpr, EMU: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        Logits += row * s_logits
        Grad += row * s_grad
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for start in range(0, V, BV):  # online logsumexp
            cols = start + tl.arange(0, BV)
            x = tl.load(Logits + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(total)
        target = tl.load(Targets + row)
        tl.store(Loss + row, lse - tl.load(Logits + target).to(tl.float32))
        for start in range(0, V, BV):  # (softmax - one_hot(target)) / n
            cols = start + tl.arange(0, BV)
            x = tl.load(Logits + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * inv_n
            tl.store(Grad + cols, _cast(g, Grad.dtype.element_ty, EMU), mask=cols < V)


_TILE_PAIRS = {}


def _triton_args(t):
    """EMU: fp32 dots and hand-rounded bf16 stores, for the interpreter (its bf16 tl.dot and fp64 dots
    misbehave, its fp32 -> bf16 cast truncates) and for fp64 inputs."""
    if triton is None:
        raise ConfigError("the fused kernels need triton: pip install triton, or use --kernels torch")
    bm, bk, warps, stages = TRITON_BLOCKS
    fp64 = t.dtype == torch.float64  # its tiles in 3 stages overflow Hopper's shared memory: 1 stage
    return dict(EMU=TRITON_INTERPRET or fp64, BM=bm, BK=bk, num_warps=warps, num_stages=1 if fp64 else stages)


def _as3d(t):
    return t.reshape(-1, *t.shape[-2:])


def _sym(X, out, alpha, beta, diag, epilogue, out_dtype, torch_rounding):
    X3 = _as3d(X)
    nb, m, k = X3.shape
    if out is None:
        out = torch.empty(*X.shape[:-1], m, dtype=out_dtype or X.dtype, device=X.device)
    O3 = _as3d(out)
    kwargs = _triton_args(X)
    tiles = triton.cdiv(m, kwargs["BM"])
    key = (tiles, str(X.device))
    if key not in _TILE_PAIRS:  # [2, T(T+1)/2]: (row, col) of the upper-triangle tiles
        _TILE_PAIRS[key] = torch.triu_indices(tiles, tiles, dtype=torch.int32, device=X.device).contiguous()
    pairs = _TILE_PAIRS[key]
    _sym_kernel[(pairs.size(1), nb)](
        X3, O3, pairs, pairs.size(1), m, k, *X3.stride(), *O3.stride(), float(alpha), float(beta), float(diag),
        EPILOGUE=epilogue, RND=torch_rounding and out.dtype == torch.bfloat16, **kwargs)
    return out


def gram_xxt(X, out=None, alpha=1.0):
    """A = alpha X X^T for X [B, m, n]: only the upper-triangle tiles are computed, and mirrored."""
    return _sym(X, out, alpha, 0.0, 0.0, False, None, False)


def ns_poly(A, b, c, diag=0.0, out=None, out_dtype=None, torch_rounding=True):
    """b A + c A A + diag I for symmetric A [B, m, m]. torch_rounding (bf16 output): round each op as
    eager torch does; else round once (a little more accurate, not bit-alike with the torch path)."""
    return _sym(A, out, c, b, diag, True, out_dtype, torch_rounding)


def ns_update(B, X, a, scale=None, out=None, out_dtype=None, torch_rounding=True):
    """s (a X + B X) for B [B, m, m], X [B, m, n]; s = scale (one fp32 per matrix) or 1."""
    B3, X3 = _as3d(B), _as3d(X)
    nb, m, n = X3.shape
    if out is None:
        out = torch.empty(X.shape, dtype=out_dtype or X.dtype, device=X.device)
    O3 = _as3d(out)
    kwargs = _triton_args(B)
    s = scale.reshape(-1).float().contiguous() if scale is not None else X3
    _update_kernel[(triton.cdiv(m, kwargs["BM"]) * triton.cdiv(n, kwargs["BM"]), nb)](
        B3, X3, O3, s, m, n, *B3.stride(), *X3.stride(), *O3.stride(), float(a),
        HAS_SCALE=scale is not None, RND=torch_rounding and out.dtype == torch.bfloat16, **kwargs)
    return out


def newton_schulz_fused(G):
    """newton_schulz by the Triton kernels: the same bf16 roundings, one triangle of each symmetric product."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    gram = None
    for a, b, c in NS_COEFFS:
        A = gram_xxt(X)
        if gram is None:
            gram = A
        X = ns_update(ns_poly(A, b, c), X, a)
    return X, gram


def fast_spectral_fused(U, p, ns=newton_schulz_fused):
    """fast_spectral as C Y = (1 - d + g) Y + P Y with P = (d - 2g) A + g A^2: A's eigenvalues sum to 1, so P Y
    is a small term, and a bf16 P (bf16 MMA, fp32 accumulation) loses less than a tf32 product with C would."""
    norm = U.float().norm(dim=(-2, -1), keepdim=True)
    Y, gram = ns(U)
    d, g = taylor_coeffs(p)
    P = ns_poly(gram, d - 2 * g, g, torch_rounding=False)
    return ns_update(P, Y, 1 - d + g, scale=norm.pow(p), torch_rounding=False)


FUSED_NEGATIVE_STAGES = {**NEGATIVE_STAGES, "taylor": fast_spectral_fused}  # the others take the fused NS as ns


def _head_rows(t):
    """t [B, T, H, hd] and its token stride, copied to contiguous unless head h of token n already lies at
    n * stride + h * hd (as in a slot of the qkv projection, or in SDPA's gradients)."""
    B, T, H, hd = t.shape
    if t.stride()[2:] == (hd, 1) and (B == 1 or T == 1 or t.stride(0) == T * t.stride(1)):
        return t, t.stride(1) if T > 1 else t.stride(0)
    return t.contiguous(), H * hd


def _qkv_rows(x, grad, cos, sin, out=None, norm_rope=True):
    """Launches _qk_norm_rope_kernel on one slot of qkv (x [B, T, H, hd]): the forward rope(rms_norm(x)) (grad
    None) or the gradient of x for the output's gradient `grad`; norm_rope False (v): a copy of x or of grad.
    out: where to write (same layout rules as x), by default a new contiguous tensor."""
    emu = _triton_args(x)["EMU"]
    B, T, H, hd = x.shape
    x, sx_tok = _head_rows(x)
    backward = grad is not None
    grad, sg_tok = _head_rows(grad) if backward else (x, sx_tok)  # the forward reads no gradient
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    out_rows, so_tok = _head_rows(out)
    rows, block_rows = B * T * H, QK_ROWS_PER_PROGRAM
    _qk_norm_rope_kernel[(triton.cdiv(rows, block_rows),)](
        x, grad, cos, sin, out_rows, rows, H, T, sx_tok, sg_tok, so_tok, torch.finfo(x.dtype).eps,
        BACKWARD=backward, NORM_ROPE=norm_rope, HALF=hd // 2, HALF_P2=triton.next_power_of_2(hd // 2),
        BR=block_rows, EMU=emu, num_warps=4)
    if out_rows is not out:
        out.copy_(out_rows)
    return out


@torch.library.custom_op("dynmuon::qkv_norm_rope", mutates_args=())
def qkv_norm_rope_fused(qkv: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope(rms_norm(q)), rope(rms_norm(k)) (Triton, fp32 math, F.rms_norm's default eps) and v of the qkv
    projection [B, T, 3, H, hd], as three contiguous [B, T, H, hd]; cos, sin: fp32 [>= T, hd/2]. Three outputs
    and one gradient buffer spare autograd a stack of dq, dk and a concatenation with dv (copying v is cheaper)."""
    return tuple(_qkv_rows(qkv[:, :, slot], None, cos, sin, norm_rope=slot < 2) for slot in range(3))


@qkv_norm_rope_fused.register_fake
def _(qkv, cos, sin):
    B, T, _, H, hd = qkv.shape
    return tuple(qkv.new_empty(B, T, H, hd) for _ in range(3))


@torch.library.custom_op("dynmuon::qkv_norm_rope_backward", mutates_args=())
def qkv_norm_rope_fused_backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor,
                                 qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    grad = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    for slot, grad_out in enumerate((grad_q, grad_k, grad_v)):
        _qkv_rows(qkv[:, :, slot], grad_out, cos, sin, out=grad[:, :, slot], norm_rope=slot < 2)
    return grad


@qkv_norm_rope_fused_backward.register_fake
def _(grad_q, grad_k, grad_v, qkv, cos, sin):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _qkv_norm_rope_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _qkv_norm_rope_grad(ctx, grad_q, grad_k, grad_v):
    qkv, cos, sin = ctx.saved_tensors
    return qkv_norm_rope_fused_backward(grad_q, grad_k, grad_v, qkv, cos, sin), None, None


qkv_norm_rope_fused.register_autograd(_qkv_norm_rope_grad, setup_context=_qkv_norm_rope_setup)


@torch.library.custom_op("dynmuon::cross_entropy_with_grad", mutates_args=())
def cross_entropy_with_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (fp32) of logits [N, V] and d(mean loss)/d(logits) in logits' dtype, by
    _cross_entropy_kernel (one program per row)."""
    emu = _triton_args(logits)["EMU"]
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    n, vocab = logits.shape
    loss, grad = torch.empty(n, dtype=torch.float32, device=logits.device), torch.empty_like(logits)
    _cross_entropy_kernel[(n,)](logits, targets, loss, grad, vocab, logits.stride(0), grad.stride(0), 1.0 / n,
                                BV=CE_BLOCK, EMU=emu, num_warps=8)
    return loss, grad


@cross_entropy_with_grad.register_fake
def _(logits, targets):
    return logits.new_empty(logits.size(0), dtype=torch.float32), torch.empty_like(logits)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits h W^T (F.linear, so bf16 under autocast; fp32 softmax). One Triton kernel
    (cross_entropy_with_grad) gives the loss and d(loss)/d(logits) without fp32 logits; the backward is two
    matmuls, scaled by the incoming gradient at their small outputs. Costs one more [N, V] buffer at the end
    of the forward than F.cross_entropy (+6 GiB at 127M, micro-batch 64)."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        loss_rows, grad_logits = cross_entropy_with_grad(F.linear(h, weight), targets)
        ctx.save_for_backward(h, weight, grad_logits)
        return loss_rows.mean()  # fp32 (a .to() here broke the compiled bf16 model under torch 2.11 on an H200)

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, grad_logits = ctx.saved_tensors
        grad_h = (grad_logits @ weight.to(grad_logits.dtype)).float() * grad_loss
        grad_w = (grad_logits.mT @ h.to(grad_logits.dtype)).float() * grad_loss
        return grad_h.to(h.dtype), grad_w.to(weight.dtype), None


def fused_linear_cross_entropy(h, weight, targets):
    return FusedLinearCrossEntropy.apply(h, weight, targets)


# FP8 matmuls (--fp8): per-tensor dynamic scaling, as Hopper's torch._scaled_mm takes it
FP8_ACTIVATIONS, FP8_GRADIENTS = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t, dtype):
    """t scaled so that its absolute max becomes dtype's largest value, then cast (saturating);
    returns the FP8 tensor and 1/scale, the factor torch._scaled_mm multiplies back."""
    fmax = torch.finfo(dtype).max
    scale = fmax / t.detach().abs().amax().float().clamp(min=1e-30)
    return (t.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def scaled_mm(a8, a_inv, b8, b_inv, out_dtype=torch.bfloat16):
    """a [M, K] @ b [N, K]^T from FP8 operands, fp32 accumulation. Both operands K-contiguous (row-major a,
    column-major b^T) as Hopper's FP8 MMA requires."""
    return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class FP8Matmul(torch.autograd.Function):
    """x [M, K] @ W [N, K]^T with x, W in e4m3 and the output gradient in e5m2, each with its own
    per-tensor scale; bf16 output and input gradient, fp32 weight gradient. Saves the FP8 x and W."""

    @staticmethod
    def forward(ctx, x, weight):
        x8, x_inv = to_fp8(x, FP8_ACTIVATIONS)
        w8, w_inv = to_fp8(weight, FP8_ACTIVATIONS)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return scaled_mm(x8, x_inv, w8, w_inv)

    @staticmethod
    def backward(ctx, grad):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad, FP8_GRADIENTS)
        grad_x = scaled_mm(g8, g_inv, w8.t().contiguous(), w_inv)  # g W
        grad_w = scaled_mm(g8.t().contiguous(), g_inv, x8.t().contiguous(), x_inv, torch.float32)  # g^T x
        return grad_x.to(ctx.x_dtype), grad_w.to(ctx.w_dtype)


def fp8_linear(x, weight, bias=None):
    """F.linear(x, weight, bias) with the matmul in FP8 (FP8Matmul); bf16 output."""
    y = FP8Matmul.apply(x.flatten(0, -2), weight).view(*x.shape[:-1], weight.size(0))
    return y if bias is None else y + bias.to(y.dtype)




# -----------------------------------------------------------------------------
# Data: llm.c / modded-nanoGPT shards (256 int32 header, then uint16 tokens)

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
EOT_TOKEN = 50256
HEADER_BYTES = SHARD_HEADER_INTS * 4


class DataError(Exception):
    """Missing or malformed data; the message names the file and what to do."""


def write_shard(path, tokens):
    """Write tokens as a shard, atomically (temporary file, fsync, rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise DataError(f"{path}: token ids must lie in [0, 65535] to fit uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_token_count(path):
    """Validated token count of a shard (checks magic, version and file size)."""
    path = Path(path)
    try:
        header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    fix = "re-download it (data/cached_fineweb10B.py) or re-tokenize it (data/tokenize_shards.py)"
    if header.size < SHARD_HEADER_INTS:
        raise DataError(f"{path}: shorter than the {HEADER_BYTES}-byte header; {fix}")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}): not a token shard; {fix}")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION}); {fix}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if path.stat().st_size != expected:
        raise DataError(f"{path}: {path.stat().st_size} bytes but the header promises {n_tokens} tokens "
                        f"({expected} bytes): truncated or corrupt; {fix}")
    return n_tokens


def read_shard(path, vocab_size=None):
    """The tokens of a validated shard, memory-mapped (uint16); with vocab_size, every id is checked below it."""
    n_tokens = shard_token_count(path)
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise DataError(f"{path}: holds token id {int(tokens.max())}, but --vocab_size is {vocab_size}: the shard "
                        f"was made with another tokenizer (use GPT-2's) or --vocab_size is too small")
    return tokens


def find_shards(data_dir):
    """(val shard, [train shards]) of a data folder, validated."""
    data_dir = Path(data_dir)
    hint = "download shards with data/cached_fineweb10B.py or make some with data/tokenize_shards.py"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder does not exist; {hint}")
    val = sorted(data_dir.glob("*_val_*.bin"))
    train = sorted(data_dir.glob("*_train_*.bin"))
    if not val or not train:
        raise DataError(f"{data_dir}: needs a *_val_*.bin and at least one *_train_*.bin shard; {hint}")
    for path in [*val, *train]:
        if shard_token_count(path) == 0:
            raise DataError(f"{path}: empty shard (0 tokens); {hint}")
    return val[0], train


class TrainLoader:
    """Contiguous windows of batch_size*T+1 tokens; rank r takes its share of the window's sequences.
    Every rank walks the same shards in the same order, so the global batch does not depend on the
    number of ranks. With data_seed the shards of each epoch and the windows of each shard come in a
    seeded random order (pos then counts windows taken, in tokens, as without it). state() / load_state()
    make the position part of a checkpoint."""

    def __init__(self, shards, batch_size, seq_len, rank, world_size, warn=print, vocab_size=None, data_seed=None):
        self.shards, self.B, self.T, self.vocab_size = shards, batch_size, seq_len, vocab_size
        self.rank, self.world, self.warn, self.data_seed = rank, world_size, warn, data_seed
        self.shard_index, self.pos, self.epoch = 0, 0, 0
        self.tokens = self._read(0)

    def _rng(self, *keys):
        return np.random.default_rng([self.data_seed, self.epoch, *keys])

    def _read(self, index):
        """Tokens of the index-th shard of this epoch; with data_seed also the order of its windows."""
        if self.data_seed is not None:
            index = self._rng().permutation(len(self.shards))[index]
        tokens = read_shard(self.shards[index], self.vocab_size)
        if self.data_seed is not None:
            self.window_order = self._rng(index).permutation(max(0, (len(tokens) - 1) // (self.B * self.T)))
        return tokens

    def state(self):
        return dict(shard_index=self.shard_index, pos=self.pos, epoch=self.epoch)

    def load_state(self, state):
        self.shard_index, self.pos, self.epoch = state["shard_index"], state["pos"], state["epoch"]
        self.tokens = self._read(self.shard_index)

    def _advance_shard(self):
        self.shard_index += 1
        if self.shard_index == len(self.shards):
            self.shard_index, self.epoch = 0, self.epoch + 1
            self.warn(f"warning: training data exhausted, wrapping around to the first shard (epoch {self.epoch})")
        self.tokens, self.pos = self._read(self.shard_index), 0

    def next_batch(self, micro_batch_size, device):
        """This rank's share of the next global batch, as a list of (x, y) micro-batches."""
        stride, window = self.B * self.T, self.B * self.T + 1
        skipped = 0
        while self.pos + window > len(self.tokens):
            self._advance_shard()
            skipped += 1
            if skipped > len(self.shards):
                raise DataError(f"no shard holds {window} tokens (one global batch + 1); use smaller batches")
        base = self.pos if self.data_seed is None else int(self.window_order[self.pos // stride]) * stride
        per_rank = self.B // self.world
        start = base + self.rank * per_rank * self.T
        chunk = torch.from_numpy(self.tokens[start:start + per_rank * self.T + 1].astype(np.int64))
        self.pos += stride
        x, y = chunk[:-1].view(per_rank, self.T), chunk[1:].view(per_rank, self.T)
        return [(xs.to(device, non_blocking=True), ys.to(device, non_blocking=True))
                for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size))]


def val_batches(val_path, val_tokens, seq_len, micro_batch_size, rank, world_size, device):
    """This rank's share of the first val_tokens of the val shard (same tokens at every evaluation)."""
    tokens = read_shard(val_path)
    n_seq = val_tokens // seq_len
    chunk = torch.from_numpy(tokens[:n_seq * seq_len + 1].astype(np.int64))
    x, y = chunk[:-1].view(n_seq, seq_len), chunk[1:].view(n_seq, seq_len)
    mine = slice(rank * n_seq // world_size, (rank + 1) * n_seq // world_size)
    return [(xs.to(device), ys.to(device)) for xs, ys in zip(x[mine].split(micro_batch_size),
                                                               y[mine].split(micro_batch_size))]



def check_data(val_path, train_shards, args, warn):
    """Before any GPU work: enough val tokens, token ids below --vocab_size in the val and first train shard
    (the loader checks each later shard as it opens it), and how many steps the training data lasts."""
    for path in (val_path, train_shards[0]):
        read_shard(path, args.vocab_size)
    n_seq = args.val_tokens // args.sequence_length
    if shard_token_count(val_path) < n_seq * args.sequence_length + 1:
        raise DataError(f"{val_path}: has {shard_token_count(val_path)} tokens, --val_tokens {args.val_tokens} "
                        f"needs {n_seq * args.sequence_length + 1}; lower --val_tokens")
    window = args.batch_size * args.sequence_length
    steps = sum((shard_token_count(p) - 1) // window for p in train_shards)
    if steps == 0:
        raise DataError(f"{args.data_dir}: no train shard holds one global batch ({window + 1} tokens); "
                        f"use larger shards or a smaller --batch_size/--sequence_length")
    if steps < args.num_iterations:
        warn(f"warning: the training data holds {steps} steps of {window:,} tokens but the run needs "
             f"{args.num_iterations}: it will wrap around and reuse data (download more shards to avoid this)")


# -----------------------------------------------------------------------------
# Checkpoints: <dir>/step_NNNNNN.pt (state) + step_NNNNNN.json (config, sha256 of the .pt)

RESUME_NEUTRAL_FLAGS = {  # may differ between a checkpoint and the run that resumes it
    "data_dir", "device_batch_size", "micro_batch_size", "val_loss_every", "device", "no_compile", "log_dir",
    "run_name", "wandb", "dry_run", "target_loss", "record", "checkpoint_dir", "checkpoint_freq",
    "keep_checkpoints", "resume", "kernels", "no_triton", "attention", "ddp_bucket_mb", "no_wandb",
    "wandb_project_name", "wandb_job_name", "fs_size", "tp_size", "dp_size"}
CODE_SHA256 = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


class StorageError(Exception):
    """A log or checkpoint could not be written (disk full, I/O error); the earlier ones are intact."""


def checkpoint_bytes(args, model):
    """About the size of one checkpoint: fp32 parameters and optimizer state (model may be on the meta device)."""
    n_params = count_parameters(model)
    n_matrix = sum(p.numel() for p in model.matrices())
    state_floats = {"adamw": 2 * n_params}.get(args.optimizer, n_matrix + (2 if args.scalar_opt == "adamw" else 1)
                                                  * (n_params - n_matrix))  # momentum; AdamW m, v; Lion m
    return 4 * (n_params + state_floats)


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, data):
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as e:  # torch.save turns it into a RuntimeError of its own ("file write failed")
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def atomic_write(path, write):
    """Run write(file) into path.tmp, fsync, rename over path; returns the sha256 of the bytes. Whatever stops
    it (disk full, a signal) removes path.tmp and leaves path as it was; an OSError becomes a StorageError."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    hashing = None
    try:
        with open(tmp, "wb") as f:
            hashing = _HashingWriter(f)
            write(hashing)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else getattr(hashing, "error", None)
        if cause is not None:
            raise StorageError(f"cannot write {path}: {os_error_text(cause)}") from e
        raise
    return hashing.sha.hexdigest()


def os_error_text(e):
    """'No space left on device (ENOSPC)' for an OSError."""
    name = errno.errorcode.get(e.errno)
    return f"{e.strerror or e}" + (f" ({name})" if name else "")


def file_sha256(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def data_fingerprint(val_path, train_shards):
    """Shard names and token counts: a resumed run must read the same data (the folder may move)."""
    return [[Path(p).name, shard_token_count(p)] for p in [val_path, *train_shards]]


def checkpoint_path(ckpt_dir, step):
    return Path(ckpt_dir) / f"step_{step:06d}.pt"


def save_checkpoint(ckpt_dir, step, payload, config, data, keep):
    """The .pt, then its .json (sha256 of the .pt), which marks it complete; only then are the oldest beyond
    keep removed, .json first (an interrupted removal leaves a .pt skipped as incomplete, not a stray .json).
    A failed write leaves no partial file and the earlier checkpoints as they were (StorageError)."""
    ckpt_dir = Path(ckpt_dir)
    pt = checkpoint_path(ckpt_dir, step)
    sha = atomic_write(pt, lambda f: torch.save(payload, f))
    meta = dict(step=step, sha256=sha, code_sha256=CODE_SHA256, config=config, data=data, time=time.time())
    try:
        atomic_write(pt.with_suffix(".json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except BaseException:
        with contextlib.suppress(OSError):
            pt.unlink(missing_ok=True)  # unusable without its .json
        raise
    try:
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep]:
            old.with_suffix(".json").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    except OSError as e:
        raise StorageError(f"cannot remove old checkpoints in {ckpt_dir}: {os_error_text(e)}") from e
    return pt


def remove_interrupted_writes(ckpt_dir):
    """Leftovers of a checkpoint write that was killed (SIGKILL, power loss), removed at the next start:
    step_*.tmp files and .json files whose .pt is gone. Returns their names."""
    ckpt_dir = Path(ckpt_dir)
    stray = sorted([*ckpt_dir.glob("step_*.tmp"),
                    *(j for j in ckpt_dir.glob("step_*.json") if not j.with_suffix(".pt").exists())])
    for p in stray:
        p.unlink(missing_ok=True)
    return [p.name for p in stray]


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}  # a full or failing disk, not a bad path
_held_locks = []  # descriptors of this process's run locks (not inherited by exec'd children: os.open's default)


def claim_folder(folder, lock_name, flag, advice, say):
    """Rank 0, before it writes anything there: create folder, write and remove a file in it, and take an
    exclusive fcntl.flock on folder/lock_name, which then records host and pid. Another process of the same run
    is refused (ConfigError, naming the live one). The OS drops the lock when its process ends, even by SIGKILL,
    so there is no stale lock; the file stays. flock cannot be trusted on some network filesystems (older NFS,
    some SMB/FUSE mounts, Lustre without -o flock): it may fail there (a warning; the run goes on unlocked) or
    lock per host only, so two hosts both get it: keep one run per folder by hand there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
        fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in STORAGE_ERRNOS:
            raise StorageError(f"cannot write in {flag} {folder}: {os_error_text(e)}; free space there or "
                               f"point {flag} elsewhere") from None
        raise ConfigError(f"cannot write in {flag} {folder}: {os_error_text(e)}; give a writable folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
            holder = f"host {holder['host']}, pid {holder['pid']}, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "host and pid not recorded yet"
        os.close(fd)
        raise ConfigError(f"{folder / lock_name}: this run is live in another process ({holder}): {advice}") from None
    except OSError as e:
        say(f"warning: cannot lock {folder / lock_name} ({os_error_text(e)}): this filesystem has no flock; make "
            f"sure no other process runs in {folder}")
    _held_locks.append(fd)
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(host=platform.node(), pid=os.getpid(),
                                      since=time.strftime("%Y-%m-%d %H:%M:%S"))).encode(), 0)


def release_run_locks():
    while _held_locks:
        os.close(_held_locks.pop())


def claim_checkpoint_dir(args, say):
    """Rank 0, before --checkpoint_dir is read: lock it, then remove what a killed checkpoint write left."""
    claim_folder(args.checkpoint_dir, "run.lock", "--checkpoint_dir", "wait for it to end, or give another "
                 "--checkpoint_dir", say)
    stray = remove_interrupted_writes(args.checkpoint_dir)
    if stray:
        say(f"removed {len(stray)} leftover(s) of an interrupted checkpoint write in {args.checkpoint_dir}: "
            f"{', '.join(stray)}")


def claim_log_dir(args, model, say):
    """Rank 0, before the log is touched: lock <log_dir>/<run>.lock; then warn when --checkpoint_dir has room
    for fewer than two checkpoints of this run (each about run_cost's estimate)."""
    claim_folder(args.log_dir, f"{args.run_name}.lock", "--log_dir", f"wait for it to end, or give another "
                 f"--run_name", say)
    if args.checkpoint_dir is None:
        return
    need, free = 2 * checkpoint_bytes(args, model), shutil.disk_usage(args.checkpoint_dir).free
    if free < need:
        say(f"warning: {args.checkpoint_dir} has {byte_text(free)} free, but two checkpoints of this run take "
            f"{byte_text(need)}: {byte_text(need - free)} missing. Free space or point --checkpoint_dir elsewhere "
            f"(a checkpoint that does not fit stops the run, exit 4, and leaves the previous one intact)")


def byte_text(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def checkpoint_meta(pt):
    """The metadata of a complete, uncorrupted checkpoint; CheckpointError otherwise."""
    pt = Path(pt)
    try:
        meta = json.loads(pt.with_suffix(".json").read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{pt}: missing or unreadable {pt.with_suffix('.json').name} (incomplete write)")
    if not pt.is_file() or file_sha256(pt) != meta.get("sha256"):
        raise CheckpointError(f"{pt}: contents do not match the recorded sha256 (truncated or corrupt)")
    return meta


def find_checkpoint(args, warn):
    """(path, meta) of the checkpoint to resume from, or (None, None) for a fresh start."""
    if args.resume is None:
        return None, None
    if args.resume != "auto":
        try:
            return Path(args.resume), checkpoint_meta(args.resume)
        except CheckpointError as e:
            raise ConfigError(f"{e}; pick another checkpoint or --resume auto")
    for pt in sorted(Path(args.checkpoint_dir).glob("step_*.pt"), reverse=True):
        try:
            return pt, checkpoint_meta(pt)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None, None


def check_resume_compatible(args, meta, data):
    saved_data = meta.get("data", data)  # checkpoints written before the fingerprint existed are not checked
    if saved_data != data:
        first = next(f"{a} (checkpoint) vs {b} (now)" for a, b in itertools.zip_longest(saved_data, data)
                     if a != b)
        raise ConfigError(f"cannot resume: the shards in --data_dir {args.data_dir} differ from the checkpoint's "
                          f"(first difference, [name, tokens]: {first}); point --data_dir at the data the run "
                          f"started with")
    saved = meta["config"]
    differ = sorted(k for k, v in vars(args).items()
                    if k not in RESUME_NEUTRAL_FLAGS and k in saved and saved[k] != v)
    if differ:
        detail = ", ".join(f"--{k} {saved[k]} (checkpoint) vs {getattr(args, k)} (now)" for k in differ)
        raise ConfigError(f"cannot resume: {detail}; rerun with the checkpoint's flags or start a new run in "
                          f"another --checkpoint_dir")


def refuse_clobber(args, resuming):
    """A fresh run never overwrites another run's logs or checkpoints. --resume auto with no checkpoint starts
    again: an earlier attempt that stopped before its first checkpoint left only logs (set aside later)."""
    if resuming:
        return
    txt = Path(args.log_dir) / f"{args.run_name}.txt"
    if txt.exists() and args.resume != "auto":
        raise ConfigError(f"{txt} already exists: choose another --run_name, or resume that run")
    if args.checkpoint_dir and any(Path(args.checkpoint_dir).glob("step_*.pt")):
        raise ConfigError(f"{args.checkpoint_dir} already holds checkpoints: " + (
            "none of them is usable (see the warnings): move them away to start this run again"
            if args.resume == "auto" else "use --resume auto to continue that run, or another --checkpoint_dir"))


def set_aside_earlier_attempt(args, say):
    """--resume auto found no checkpoint, so this run starts at step 0: the logs of an earlier attempt under the
    same name (it stopped before its first checkpoint) are renamed <run>.attemptN.*, never overwritten."""
    log_dir = Path(args.log_dir)
    logs = [log_dir / f"{args.run_name}{ext}" for ext in (".txt", ".jsonl")]
    if not any(p.exists() for p in logs):
        return
    n = 1
    while any(p.with_suffix(f".attempt{n}{p.suffix}").exists() for p in logs):
        n += 1
    for p in logs:
        if p.exists():
            p.rename(p.with_suffix(f".attempt{n}{p.suffix}"))
    say(f"no checkpoint to resume in {args.checkpoint_dir}: starting at step 0; the earlier attempt's logs are now "
        f"{logs[0].with_suffix(f'.attempt{n}.txt')} (and .jsonl)")


# -----------------------------------------------------------------------------
# Training loop

class TrainingError(Exception):
    """The run cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


class StopNow(KeyboardInterrupt):
    """A stop signal repeated after STOP_REPEAT_GRACE_S: stop at once, without a checkpoint."""

    def __init__(self, signum):
        super().__init__(f"stopped at once by a repeated signal {signum}, without a checkpoint; --resume auto "
                         f"continues from the last one")
        self.signum = signum


def exit_code(e):
    """The exit code of the exception that stopped a run (see the top of this file)."""
    for kinds, code in (((ConfigError, DataError), 2), (TrainingError, 3), (StorageError, 4)):
        if isinstance(e, kinds):
            return code
    return 128 + e.signum if isinstance(e, StopNow) else 1


def out_of_memory_error(e, args):
    """A TrainingError naming the flags to change for an out-of-memory error (GPU or host), else None."""
    mb = args.micro_batch_size
    if isinstance(e, torch.OutOfMemoryError):
        return TrainingError(f"out of GPU memory at --micro_batch_size {mb}: rerun with --micro_batch_size "
                             f"{max(1, mb // 2)} (same math; --resume auto continues from the last checkpoint)")
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "DefaultCPUAllocator" in str(e)):
        return TrainingError(f"out of host memory at --micro_batch_size {mb} x --sequence_length "
                             f"{args.sequence_length}: rerun with --micro_batch_size {max(1, mb // 2)} (same math) "
                             f"or a smaller --batch_size / --sequence_length")
    return None


def rank0_then_agree(rank, fn):
    """Run fn on rank 0 only, then raise its ConfigError/DataError/StorageError on every rank (the others'
    copies carry its message), so no rank waits for a rank 0 that has stopped. Returns fn's result (rank 0)."""
    error = result = None
    if rank == 0:
        try:
            result = fn()
        except (ConfigError, DataError, StorageError) as e:
            error = e
    if is_distributed():
        box = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            kind = {k.__name__: k for k in (ConfigError, DataError, StorageError)}[box[0][0]]
            error = kind(box[0][1])
    if error is not None:
        raise error
    return result


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t):
    if is_distributed():
        dist.all_reduce(t)
    return t


class RunLog:
    """Rank 0 writes logs/<run>.txt (code, configuration, environment, then events) and <run>.jsonl.
    On resume both files are cut back to where the checkpoint was taken, then appended to. Each line is
    written whole or not at all (a failed write is cut back off). After a failed write nothing more is written
    (no gaps); the StorageError waits in .failed for check(), which the loop calls where all ranks meet."""

    def __init__(self, args, rank, offsets=None):
        global _open_log
        self.active = rank == 0
        self.wandb = self.failed = None
        if not self.active:
            return
        log_dir = Path(args.log_dir)
        self.paths = log_dir / f"{args.run_name}.txt", log_dir / f"{args.run_name}.jsonl"
        try:
            if offsets is None:
                self.txt, self.jsonl = (open(p, "wb", buffering=0) for p in self.paths)
            else:
                self.txt, self.jsonl = (open(p, "r+b" if p.exists() else "wb", buffering=0) for p in self.paths)
                for f, offset in zip((self.txt, self.jsonl), offsets):
                    f.truncate(min(offset, f.seek(0, os.SEEK_END)))
                    f.seek(0, os.SEEK_END)
        except OSError as e:
            raise self._error(e) from None
        _open_log = self
        if args.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=args.wandb_project_name, name=args.wandb_job_name or args.run_name,
                                        config=vars(args), resume="allow")
            except ImportError:
                print("warning: --wandb given but wandb is not installed; logging to files only", file=sys.stderr)

    def offsets(self):
        return [self.txt.tell(), self.jsonl.tell()] if self.active else None

    def header(self, args, env, n_params):
        if not self.active:
            return
        self._write(self.txt, Path(__file__).read_text() + "\n" + "=" * 100 + "\n"
                    + json.dumps(dict(config=vars(args), env=env, parameters=n_params), indent=1) + "\n"
                    + "=" * 100 + "\n")
        self.event("config", config=vars(args), env=env, parameters=n_params)

    def _error(self, e, path=None):
        return StorageError(f"cannot write the log {path or self.paths[0].parent}: {os_error_text(e)}; its earlier "
                            f"lines are intact: free space (or give another --log_dir), then rerun with --resume auto")

    @staticmethod
    def _append(f, text):
        """Append text to f (unbuffered) whole, or cut f back to where it was and raise the OSError."""
        data, start = memoryview(text.encode()), f.tell()
        try:
            while data:  # a regular file takes it all, unless a size limit is reached part-way
                data = data[f.write(data):]
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
                f.seek(start)
            raise

    def _write(self, f, text):
        if self.failed is None:
            try:
                self._append(f, text)
            except OSError as e:
                self.failed = self._error(e, f.name)

    def check(self):
        """Raise the StorageError of a failed write, if any (rank 0)."""
        if self.active and self.failed is not None:
            raise self.failed

    def line(self, text, console=True):
        if not self.active:
            return
        self._write(self.txt, text + "\n")
        if console:
            print_console(text)

    def event(self, kind, **fields):
        if not self.active:
            return
        self._write(self.jsonl, json.dumps(dict(event=kind, **fields)) + "\n")
        if self.wandb is not None and kind in ("train", "val"):
            self.wandb.log({k: v for k, v in fields.items() if isinstance(v, (int, float))}, step=fields["step"])

    def stop(self, reason, code, console=False):
        """Whatever ends a run early, as its last line (`stopped: <reason>`) and a stop event, where the log can
        still be written; then close."""
        if not self.active:
            return
        for f, text in ((self.txt, f"stopped: {reason}\n"),
                        (self.jsonl, json.dumps(dict(event="stop", reason=reason, exit_code=code)) + "\n")):
            with contextlib.suppress(OSError):
                self._append(f, text)
        if console:
            print_console(f"stopped: {reason}")
        self.close()

    def close(self):
        global _open_log
        if self.active and not self.txt.closed:
            _open_log = None
            for f in (self.txt, self.jsonl):
                with contextlib.suppress(OSError):
                    f.close()
            if self.wandb is not None:
                self.wandb.finish()


_progress = None  # tqdm bar of rank 0, so that log lines print above it
_open_log = None  # rank 0's RunLog while it is open: main() writes there whatever stops the run
_joined_process_group = False  # this process started torch.distributed's threads: cli() leaves with os._exit


def print_console(text):
    (_progress.write if _progress is not None else print)(text)


class PlainProgress:
    """Progress on a stdout that is not a terminal (a batch job's log): a line at most every PROGRESS_INTERVAL_S
    seconds, where tqdm would redraw its bar with carriage returns."""

    def __init__(self, total, initial, desc):
        self.total, self.n, self.desc, self.postfix = total, initial, desc, ""
        self.start_n, self.start = initial, time.monotonic()
        self.last = self.start

    def set_postfix_str(self, text, refresh=False):
        self.postfix = text

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        per_step = (now - self.start) / max(self.n - self.start_n, 1)
        print(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), {self.postfix}, "
              f"{per_step:.2f} s/step, {(self.total - self.n) * per_step / 60:.1f} min left", flush=True)

    @staticmethod
    def write(text):
        print(text, flush=True)

    def close(self):
        pass


def environment(device, world_size):
    env = dict(python=platform.python_version(), torch=torch.__version__, world_size=world_size,
               host=platform.node(), argv=sys.argv)
    if device == "cuda":
        env.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i)
                                                   for i in range(torch.cuda.device_count())])
    return env


def setup_distributed(args):
    """(rank, world_size, local_rank) under torchrun, else (0, 1, 0)."""
    global _joined_process_group
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} but only {torch.cuda.device_count()} GPUs are visible: "
                              f"lower --nproc_per_node")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if args.device == "cuda" else "gloo")
    _joined_process_group = True
    return rank, world, local


def resolve_target(args):
    """--target_loss, or the target of a --record entry (records/records.json name or records/<dir>/)."""
    if args.record is None:
        return args.target_loss
    import importlib.util
    name = "dynmuon_records_compare"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "records" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    sys.modules[name] = compare  # its dataclasses look their module up there
    spec.loader.exec_module(compare)
    try:
        ref = compare.resolve_reference(args.record)
        target = ref.target if hasattr(ref, "target") else compare.target_from_reference(ref)[0]
    except compare.LogError as e:
        raise ConfigError(f"--record {args.record}: {e}")
    if target is None:
        raise ConfigError(f"--record {args.record} publishes no target loss; give --target_loss")
    return target


def forward_context(args):
    """A factory of the context every forward runs in: bf16 autocast on CUDA, the --attention backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    name = SDPA_BACKENDS[args.attention]
    backend = getattr(SDPBackend, name) if name else None

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            if args.device == "cuda":
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            if backend is not None:
                stack.enter_context(sdpa_kernel(backend))
            yield
    return context


@torch.no_grad()
def evaluate(model, batches, fwd_context):
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=batches[0][0].device)
    for x, y in batches:
        with fwd_context():
            total[0] += model(x, y).double() * y.numel()
        total[1] += y.numel()
    model.train()
    total = all_reduce_sum(total)
    return (total[0] / total[1]).item()


def dynmuon_shaping(dynmuon):
    """For the log: DynMuon's p at the last step and the mean/min/max over matrices of its direction_factor,
    the factor its update multiplies lr sqrt(out/in) NS(U) by; {} without DynMuon."""
    if dynmuon is None:
        return {}
    f = dynmuon.last_factor
    stats = torch.stack([f.mean(), f.min(), f.max()]).tolist()
    return dict(p=dynmuon.last_p, **dict(zip(("factor_mean", "factor_min", "factor_max"), stats)))


def train_step(model, opts, batch, args, step, accum_scale, fwd_context):
    """One optimizer step over this rank's micro-batches; returns the summed micro-batch losses."""
    loss_sum = torch.zeros((), device=batch[0][0].device)
    for i, (x, y) in enumerate(batch):
        last_micro = i == len(batch) - 1
        no_sync = model.no_sync() if (not last_micro and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with no_sync:
            with fwd_context():
                loss = model(x, y)
            (loss * accum_scale).backward()
        loss_sum += loss.detach()
    mult = lr_multiplier(step, args)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum, mult


class StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint and a clean exit at a step boundary that all ranks agree on.
    Repeats within STOP_REPEAT_GRACE_S of the first are the same request delivered twice (a job scheduler
    signals every process and torchrun forwards its own signal, Ctrl-C reaches workers and torchrun);
    a later one stops at once, without a checkpoint."""

    active = None  # the one of this process: main() restores the handlers from before it at the end

    def __init__(self):
        self.signum, self.first_at = 0, None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        StopFlag.active = self

    def restore(self):
        """The handlers from before (a caller in the same process, e.g. a test runner, gets Ctrl-C back)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        StopFlag.active = None

    def _handle(self, signum, frame):
        if self.signum:
            if time.monotonic() - self.first_at > STOP_REPEAT_GRACE_S:
                raise StopNow(signum)
            return
        self.signum, self.first_at = signum, time.monotonic()
        print_console(f"received signal {signum}: checkpointing at the end of this step, then exiting "
                      f"(a second signal more than {STOP_REPEAT_GRACE_S} s later stops without a checkpoint)")


def main(argv=None):
    global _progress
    args = resolve_config(argv)
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", 1))
        validate_flags(args, world)
        model = build_model(args, "meta")  # shapes only: no memory, no init
        print(json.dumps(vars(args), indent=1))
        print("\n".join(run_cost(args, world, model)))
        return 0
    rank, world, local = setup_distributed(args)
    try:
        return train(args, rank, world, local)
    except BaseException as e:
        error = out_of_memory_error(e, args)
        if _open_log is not None:  # the reason goes into the log too, as its last line
            stopped = error or e
            reason = str(stopped) if exit_code(stopped) != 1 else f"{type(stopped).__name__}: {stopped}"
            _open_log.stop(reason.splitlines()[0] if reason.strip() else type(stopped).__name__, exit_code(stopped))
        if error is not None:
            raise error from e
        raise
    finally:
        if _progress is not None:
            _progress.close()
            _progress = None
        if _open_log is not None:
            _open_log.close()
        release_run_locks()
        if StopFlag.active is not None:
            StopFlag.active.restore()
        if is_distributed():
            dist.destroy_process_group()


def run_cost(args, world, model):
    """Lines of --dry_run: what the run will cost (parameters, tokens, accumulation, checkpoint size, time)."""
    n_params = count_parameters(model)
    tokens = args.num_iterations * args.batch_size * args.sequence_length
    lines = [f"parameters: {n_params:,} ({n_params / 1e6:.1f}M)",
             f"tokens: {tokens:,} ({args.num_iterations} steps x {args.batch_size} x {args.sequence_length})",
             f"per process: {args.batch_size // world} sequences a step in {args.batch_size // (world * args.micro_batch_size)}"
             f" micro-batches of {args.micro_batch_size} ({world} processes)",
             f"checkpoint: {checkpoint_bytes(args, model) / 2 ** 30:.2f} GiB each, {args.keep_checkpoints} kept"]
    if args.device == "cuda" and args.model in H200_MS_PER_STEP and args.optimizer != "adamw":
        hours = H200_MS_PER_STEP[args.model] * tokens / (512 * 1024) / world / 3.6e6
        lines.append(f"estimated time: {hours:.1f} h on {world} H200 (measured {H200_MS_PER_STEP[args.model]} "
                     f"ms per 512 x 1024-token step on one; scaled by tokens and GPUs)")
    return lines


def wrap_model(raw_model, args, world, local, compile_model):
    """DDP (several processes), then torch.compile: compiling the DDP module lets dynamo split the graph at
    gradient buckets, so each bucket's all-reduce overlaps the rest of the backward pass."""
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local] if args.device == "cuda" else None,
                                                    bucket_cap_mb=args.ddp_bucket_mb)
    if compile_model:
        model = torch.compile(model, dynamic=False)  # a short last val micro-batch: one more static graph
    return model


def train(args, rank, world, local):
    global _progress
    say = print_console if rank == 0 else (lambda text: None)
    started = time.monotonic()
    # validation before any GPU work
    validate_flags(args, world)
    if args.device == "cpu" and args.attention not in ("auto", "math", "flash"):  # validate_flags also plans GPU
        raise ConfigError(f"--attention {args.attention} needs CUDA: on --device cpu use auto, math or flash")  # runs
    val_path, train_shards = find_shards(args.data_dir)
    check_data(val_path, train_shards, args, say)
    data = data_fingerprint(val_path, train_shards)
    if args.checkpoint_dir is not None:  # one writer per run: rank 0 locks the folder before reading or cleaning it
        rank0_then_agree(rank, lambda: claim_checkpoint_dir(args, say))
    ckpt_path, ckpt_meta = find_checkpoint(args, say)
    if ckpt_meta is not None:
        if args.run_name is None:
            args.run_name = ckpt_meta["config"]["run_name"]
        check_resume_compatible(args, ckpt_meta, data)
        if ckpt_meta["step"] >= args.num_iterations:
            say(f"{args.run_name} is finished (step {ckpt_meta['step']} in {ckpt_path}); its log is "
                f"{Path(args.log_dir) / (args.run_name + '.txt')}: nothing to do")
            return 0
        if ckpt_meta["code_sha256"] != CODE_SHA256:
            say(f"warning: {ckpt_path} was written by a different train_gpt.py (code hash differs)")
    elif args.run_name is None:
        args.run_name = default_run_name(args)
    meta_model = build_model(args, "meta")  # for the size of a checkpoint
    rank0_then_agree(rank, lambda: claim_log_dir(args, meta_model, say))
    refuse_clobber(args, ckpt_meta is not None)
    if args.fp8 != "none" and args.device == "cuda" and args.no_compile:
        say("warning: --fp8 without torch.compile is about 2x slower than bf16 (its scaling and casts run as "
            "separate kernels): drop --no_compile")
    target = resolve_target(args)
    stop = StopFlag()

    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(args.seed)
    raw_model = build_model(args, device)
    opts = build_optimizers(raw_model, args)
    train_loader = TrainLoader(train_shards, args.batch_size, args.sequence_length, rank, world, warn=say,
                               vocab_size=args.vocab_size, data_seed=args.data_seed)
    run = dict(step=0, evaluated=False, train_time_ms=0.0, timed_ms=0.0, timed_steps=0, reached_at=None)
    log_offsets = None
    if ckpt_path is not None:
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        raw_model.load_state_dict(state["model"])
        for opt, opt_state in zip(opts, state["optimizers"]):
            opt.load_state_dict(opt_state)
        train_loader.load_state(state["loader"])
        run, log_offsets = state["run"], state["log_offsets"]
        torch.set_rng_state(state["rng_cpu"].cpu())
    n_params = count_parameters(raw_model)
    model = wrap_model(raw_model, args, world, local, compile_model=args.device == "cuda" and not args.no_compile)
    fwd_context = forward_context(args)

    txt = Path(args.log_dir) / f"{args.run_name}.txt"
    ckpt_text = "none (no --checkpoint_dir)" if args.checkpoint_dir is None else (
        f"{args.checkpoint_dir} (" + (f"every {args.checkpoint_freq} steps and " if args.checkpoint_freq else "")
        + f"at the end, newest {args.keep_checkpoints} kept)")

    def open_log():  # rank 0
        if ckpt_path is None and args.resume == "auto":
            try:
                set_aside_earlier_attempt(args, say)
            except OSError as e:
                raise StorageError(f"cannot rename the earlier attempt's logs in {args.log_dir}: "
                                   f"{os_error_text(e)}") from e
        log = RunLog(args, rank, log_offsets)
        say(f"log: {txt} (and .jsonl); checkpoints: {ckpt_text}")
        if ckpt_path is None:
            log.header(args, environment(args.device, world), n_params)
            log.line(f"parameters: {n_params:,} ({n_params / 1e6:.1f}M)")
        else:
            log.line(f"resumed from {ckpt_path} at step {run['step']}")
            log.event("resume", step=run["step"], checkpoint=str(ckpt_path))
        log.check()
        return log
    log = rank0_then_agree(rank, open_log) or RunLog(args, rank, log_offsets)
    val_data = val_batches(val_path, args.val_tokens, args.sequence_length, args.micro_batch_size, rank, world,
                           device)
    accum_steps = args.batch_size // (world * args.micro_batch_size)
    tokens_per_step = args.batch_size * args.sequence_length
    T = args.num_iterations
    dynmuon = next((o for o in opts if isinstance(o, DynMuon)), None) if args.optimizer == "dynmuon" else None
    last_ckpt = ckpt_path
    resumed_step = ckpt_meta["step"] if ckpt_meta else None

    def checkpoint():
        """Rank 0 writes it; every rank returns its path, or raises rank 0's StorageError."""
        payload = dict(model=raw_model.state_dict(), optimizers=[o.state_dict() for o in opts],
                       loader=train_loader.state(), run=run, log_offsets=log.offsets(),
                       rng_cpu=torch.get_rng_state())

        def write():
            log.check()  # not after a failed log line: resuming this checkpoint would lose it
            try:
                path = save_checkpoint(args.checkpoint_dir, run["step"], payload, vars(args), data,
                                       args.keep_checkpoints)
            except StorageError as e:
                kept = f"the last good checkpoint, {last_ckpt}, is intact" if last_ckpt else "no earlier checkpoint"
                raise StorageError(f"{e}; no partial file is left, {kept}: free space, then rerun with --resume "
                                   f"auto") from e
            log.line(f"checkpoint: {path}", console=False)
        rank0_then_agree(rank, write)  # also the barrier: no rank goes on before the checkpoint is complete
        return checkpoint_path(args.checkpoint_dir, run["step"])

    if rank == 0 and sys.stdout.isatty():
        from tqdm import tqdm
        _progress = tqdm(total=T, initial=run["step"], desc=args.run_name, dynamic_ncols=True, file=sys.stdout,
                         mininterval=1.0)
    elif rank == 0:
        _progress = PlainProgress(T, run["step"], args.run_name)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    stopping = 0  # the stop signal, once every rank knows of it (from the all-reduce after each step)
    first_step = True  # excluded from step_avg: compilation and warm-up
    while True:
        step = run["step"]
        last = step == T
        if (last or step % args.val_loss_every == 0) and not run["evaluated"]:
            val_loss = evaluate(model, val_data, fwd_context)
            step_avg = run["timed_ms"] / max(run["timed_steps"], 1)
            text = (f"step:{step}/{T} val_loss:{val_loss:.4f} train_time:{run['train_time_ms']:.0f}ms "
                    f"step_avg:{step_avg:.2f}ms")
            if target is not None:
                if run["reached_at"] is None and val_loss <= target:
                    run["reached_at"] = step
                text += (f" target:{target:.4f} " + (f"(reached at step {run['reached_at']})"
                                                     if run["reached_at"] is not None else "(not reached)"))
            if run.get("best_val") is None or val_loss < run["best_val"][0]:
                run["best_val"] = [val_loss, step]
            log.line(text)
            log.event("val", step=step, total_steps=T, val_loss=val_loss, train_time_ms=run["train_time_ms"],
                      step_avg_ms=step_avg, target=target, reached_at=run["reached_at"])
            run["evaluated"] = True
        due = last or stopping or (args.checkpoint_freq and step % args.checkpoint_freq == 0)
        if args.checkpoint_dir and due and step > 0 and step != resumed_step:
            last_ckpt = checkpoint()
        if last or stopping:
            break
        sync()
        t0 = time.perf_counter()
        loss_sum, mult = train_step(model, opts, train_loader.next_batch(args.micro_batch_size, device),
                                    args, step, 1.0 / accum_steps, fwd_context)
        flags = [float(stop.signum), float(log.failed is not None)]  # a signal here; rank 0's log write failed
        reduced = all_reduce_sum(torch.cat([loss_sum[None], torch.tensor(flags, device=device)]))
        train_loss = reduced[0].item() / (accum_steps * world)  # .item() waits for the GPU
        if reduced[2].item() > 0:
            rank0_then_agree(rank, log.check)
        if reduced[1].item() > 0:  # this rank or another was signalled: all stop after this step
            stopping = stop.signum or int(signal.SIGTERM)
        step_ms = 1000 * (time.perf_counter() - t0)
        run.update(step=step + 1, evaluated=False, train_time_ms=run["train_time_ms"] + step_ms)
        if not first_step:
            run["timed_ms"] += step_ms
            run["timed_steps"] += 1
        first_step = False
        if not math.isfinite(train_loss):
            raise TrainingError(f"non-finite train loss ({train_loss}) at step {step + 1}; last good checkpoint: " + (
                f"{last_ckpt}" if last_ckpt else f"none yet in {args.checkpoint_dir}" if args.checkpoint_dir
                else "none (no --checkpoint_dir)"))
        shaping = dynmuon_shaping(dynmuon)
        p_text = (" p:{p:.4f} factor:{factor_mean:.4f}/{factor_min:.4f}/{factor_max:.4f}".format(**shaping)
                  if shaping else "")
        tokens_per_s = tokens_per_step / step_ms * 1000
        log.line(f"step:{step + 1}/{T} train_loss:{train_loss:.4f} lr_mult:{mult:.4f}{p_text} "
                 f"tokens/s:{tokens_per_s:.0f}", console=False)
        log.event("train", step=step + 1, train_loss=train_loss, lr_mult=mult, tokens_per_s=tokens_per_s,
                  step_ms=step_ms, **shaping)
        if _progress is not None:
            _progress.set_postfix_str(f"loss {train_loss:.3f}" + (f" p {shaping['p']:.3f}" if shaping else ""),
                                      refresh=False)  # refresh=True would redraw at every step, past mininterval
            _progress.update(1)
    if _progress is not None:
        _progress.close()
        _progress = None
    if stopping:
        log.stop(f"signal {stopping} at step {run['step']}; checkpoint: {last_ckpt or 'none'}; rerun with "
                 f"--resume auto to continue", 128 + stopping, console=True)
        return 128 + stopping
    if target is not None:
        log.line(f"target:{target:.4f} " + (f"reached_at_step:{run['reached_at']}" if run["reached_at"] is not None
                                            else "not_reached"))
    if args.device == "cuda":
        log.line(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB")
    log.check()
    log.close()
    best = run.get("best_val")
    say(f"done: {run['step']} steps; best val_loss " + (f"{best[0]:.4f} at step {best[1]}" if best else "n/a")
        + (f"; target {target:.4f} " + (f"reached at step {run['reached_at']}" if run["reached_at"] is not None
                                         else "not reached") if target is not None else "")
        + f"; train time {run['train_time_ms'] / 1000:.1f} s, wall time {time.monotonic() - started:.1f} s (this "
        f"process); log: {txt}; last checkpoint: {last_ckpt or 'none'}")
    return 0


def cli():
    try:
        code = main()
    except (ConfigError, DataError, TrainingError, StorageError, StopNow) as e:
        sys.stderr.write(f"error: {e}\n")  # one write: the lines of several ranks do not interleave
        code = exit_code(e)
    if _joined_process_group:
        # destroy_process_group leaves gloo's worker threads running, and an interpreter shutting down under
        # them can abort the process (SIGABRT) after a finished run. Logs and checkpoints are closed by now:
        # leave without the interpreter's shutdown, as multiprocessing's child processes do.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
