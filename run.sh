#!/usr/bin/env bash
# run.sh: launch the DynMuon paper's training runs with the paper's settings (SPEC.md).
#
#   ./run.sh [--list] [trainer flags...]               one run, set by MODEL/OPT/TOKENS/... below
#   ./run.sh <experiment> [--list] [trainer flags...]  every run of one paper figure/table, in turn
#   ./run.sh --help                                    this text and the experiment names
#
# Every constant below can be overridden from the environment, e.g.
#   MODEL=601M TOKENS=20B OPT=muon ./run.sh
#   LR=0.02 SEED=1 ./run.sh --list
# Trainer flags given on the command line are appended to every command, so they win.
# --list prints the command(s) it would run and exits: no download, no training.
# Shards missing from data/ are fetched first (data/cached_fineweb10B.py). Runs checkpoint
# every CHECKPOINT_FREQ steps with --resume auto: rerunning continues where a run stopped and
# skips a finished one. With no CUDA GPU (NPROC=0) it runs a small CPU smoke run instead
# (tiny model, synthetic shards in data/tiny_synthetic, a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"

# The paper's constants
MODEL=${MODEL:-127M}          # 127M | 601M | 1.1B | qwen171M
OPT=${OPT:-dynmuon}           # dynmuon | muon | normuon | adamw
TOKENS=${TOKENS:-10B}         # 10B: 20000 steps | 20B: 38000 steps on the 100B copy (also 2.5B, 5B)
BATCH_SIZE=${BATCH_SIZE:-512} # sequences per optimizer step (global)
DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-64}
SEQ_LEN=${SEQ_LEN:-1024}
LR=${LR:-}                    # empty: the trainer's default (0.01 Muon family, 0.002 AdamW)
WD=${WD:-0.01}
MU=${MU:-0.95}
SCALAR_LR=${SCALAR_LR:-0.001} # AdamW LR of embedding and lm_head
PMAX=${PMAX:-1}
PMIN=${PMIN:--0.25}
TAU=${TAU:-0.04}
W=${W:-0.04}
WARMUP=${WARMUP:-0.01}
WARMDOWN=${WARMDOWN:-0.2}
VAL_EVERY=${VAL_EVERY:-50}
VAL_TOKENS=${VAL_TOKENS:-10485760}
SEED=${SEED:-0}
CHECKPOINT_FREQ=${CHECKPOINT_FREQ:-1000}
LOG_DIR=${LOG_DIR:-logs}
RUN_NAME=${RUN_NAME:-}        # empty: ${OPT}_${MODEL}_${TOKENS}_seed${SEED} (single runs; experiments name theirs)
# Empty = derived per run: NUM_ITERATIONS and DATA_VARIANT from TOKENS; MICRO_BATCH by the trainer
# (the largest that fits the GPU by the preset's measured peak memory: train_gpt.py default_micro_batch)
MICRO_BATCH=${MICRO_BATCH:-}
NUM_ITERATIONS=${NUM_ITERATIONS:-}
DATA_VARIANT=${DATA_VARIANT:-}  # 10B | 100B | edu10B
DATA_ROOT=${DATA_ROOT:-data}    # shards in $DATA_ROOT/fineweb10B, fineweb100B, finewebedu10B
PYTHON=${PYTHON:-python3}

gpu_count() {  # GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi -L
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    local ids="${CUDA_VISIBLE_DEVICES//[^,0-9a-zA-Z-]/}"
    [[ -z $ids ]] && { echo 0; return; }
    tr ',' '\n' <<<"$ids" | grep -c . || true
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
NPROC=${NPROC:-$(gpu_count)}
LIST=0       # 1: print commands instead of running them
EXPERIMENT=  # set when running an experiment

die() { echo "run.sh: $*" >&2; exit 2; }

run_cmd() {  # print (--list) or run one command
  if ((LIST)); then printf '%q' "$1"; shift; printf ' %q' "$@"; echo; else "$@"; fi
}

fetch_data() {  # fetch_data VARIANT DIR ITERS: the shards a run reads, downloaded if absent
  local variant=$1 dir=$2 iters=$3 max prefix=fineweb
  case $variant in
    10B) max=103 ;;
    100B) max=1030 ;;
    edu10B) max=99 prefix=finewebedu ;;
    *) die "DATA_VARIANT=$variant: expected 10B, 100B or edu10B" ;;
  esac
  local need=$(( (iters * BATCH_SIZE * SEQ_LEN + 99999999) / 100000000 ))  # 100M tokens a shard
  if ((need > max)); then need=$max; fi
  if [[ -f $dir/${prefix}_val_000000.bin && -f $dir/$(printf '%s_train_%06d.bin' "$prefix" "$need") ]]; then
    return 0
  fi
  run_cmd "$PYTHON" data/cached_fineweb10B.py "$need" --variant "$variant" --out_dir "$dir"
}

# run_one [VAR=value ...] [-- trainer flags]: one training run, with these constants changed
# (MODEL, OPT, TOKENS, SEED, LR, PMIN, TAU, W, DATA_VARIANT; TAG names an experiment's variant).
# The command line's trainer flags (EXTRA) come last.
run_one() {
  local MODEL=$MODEL OPT=$OPT TOKENS=$TOKENS SEED=$SEED LR=$LR PMIN=$PMIN TAU=$TAU W=$W
  local DATA_VARIANT=$DATA_VARIANT TAG=
  while (($#)) && [[ $1 == *=* ]]; do local "$1"; shift; done
  if [[ ${1:-} == -- ]]; then shift; fi

  local model_flags=(--model "$MODEL")
  case $MODEL in
    127M|601M|1.1B) ;;
    qwen171M) model_flags=(--arch qwen --model qwen171M) ;;
    *) die "MODEL=$MODEL: expected 127M, 601M, 1.1B or qwen171M" ;;
  esac
  local iters variant=10B
  case $TOKENS in
    2.5B) iters=5000 ;;
    5B) iters=10000 ;;
    10B) iters=20000 ;;
    20B) iters=38000 variant=100B ;;  # the 10B copy holds ~10.3B tokens
    *) die "TOKENS=$TOKENS: expected 2.5B, 5B, 10B or 20B" ;;
  esac
  iters=${NUM_ITERATIONS:-$iters}
  variant=${DATA_VARIANT:-$variant}
  local data_dir=$DATA_ROOT/fineweb$variant
  [[ $variant == edu10B ]] && data_dir=$DATA_ROOT/finewebedu10B

  local name log_dir ckpt_dir
  if [[ -n $EXPERIMENT ]]; then
    name=${OPT}_${MODEL}_${TOKENS}${TAG:+_$TAG}_seed${SEED}
    log_dir=$LOG_DIR/$EXPERIMENT ckpt_dir=checkpoints/$EXPERIMENT/$name
  else
    name=${RUN_NAME:-${OPT}_${MODEL}_${TOKENS}_seed${SEED}}
    log_dir=$LOG_DIR ckpt_dir=checkpoints/$name
  fi

  local cmd=(torchrun --standalone "--nproc_per_node=$NPROC" train_gpt.py
    "${model_flags[@]}" --optimizer "$OPT" --data_dir "$data_dir"
    --batch_size "$BATCH_SIZE" --device_batch_size "$DEVICE_BATCH_SIZE" ${MICRO_BATCH:+--micro_batch_size "$MICRO_BATCH"}
    --sequence_length "$SEQ_LEN" --num_iterations "$iters" --warmup_ratio "$WARMUP" --warmdown_ratio "$WARMDOWN"
    --val_loss_every "$VAL_EVERY" --val_tokens "$VAL_TOKENS")
  [[ -n $LR ]] && cmd+=(--lr "$LR")
  cmd+=(--weight_decay "$WD" --mu "$MU" --scalar_lr "$SCALAR_LR")
  [[ $OPT == dynmuon ]] && cmd+=(--dynmuon_pmax "$PMAX" --dynmuon_pmin "$PMIN" --dynmuon_tau "$TAU" --dynmuon_w "$W")
  cmd+=(--seed "$SEED" --log_dir "$log_dir" --run_name "$name"
    --checkpoint_dir "$ckpt_dir" --checkpoint_freq "$CHECKPOINT_FREQ" --resume auto "$@" ${EXTRA[@]+"${EXTRA[@]}"})

  if ((LIST)); then
    [[ -n $EXPERIMENT ]] || fetch_data "$variant" "$data_dir" "$iters"
    run_cmd "${cmd[@]}"
    return 0
  fi
  if [[ -f $ckpt_dir/$(printf 'step_%06d.json' "$iters") ]]; then
    echo "run.sh: $name finished ($ckpt_dir holds step $iters): skipped" >&2
    return 0
  fi
  echo "run.sh: === $name ===" >&2
  preflight "${cmd[@]}"
  fetch_data "$variant" "$data_dir" "$iters"
  run_cmd "${cmd[@]}"
}

preflight() {  # preflight torchrun A B train_gpt.py FLAGS...: the trainer's flag checks, before any download
  WORLD_SIZE=$NPROC "$PYTHON" "${@:4}" --dry_run >/dev/null ||
    die "the trainer refused the flags of $name (message above); nothing was downloaded or run"
}

cpu_run() {  # no CUDA GPU: a small but real run of the tiny preset on synthetic shards
  local data_dir=$DATA_ROOT/tiny_synthetic name=${RUN_NAME:-${OPT}_tiny_cpu_seed${SEED}}
  echo "run.sh: no CUDA GPU found (NPROC=0): running a small CPU smoke run (tiny model, synthetic data)" \
       "instead of the paper's $MODEL run; set NPROC=N to run it on N GPUs" >&2
  if [[ ! -f $data_dir/fineweb_val_000000.bin ]]; then
    run_cmd "$PYTHON" data/make_synthetic_shards.py --out_dir "$data_dir" --train_shards 2 \
      --shard_tokens 1048576 --val_tokens 262145 --seed 0
  fi
  # vocab stays 50304: the synthetic token ids are spread over the GPT-2 vocabulary
  local cmd=("$PYTHON" train_gpt.py --model tiny --device cpu --optimizer "$OPT" --data_dir "$data_dir"
    --batch_size 8 --device_batch_size 8 --sequence_length 64 --num_iterations 100
    --warmup_ratio "$WARMUP" --warmdown_ratio "$WARMDOWN" --val_loss_every 25 --val_tokens 4096)
  [[ -n $LR ]] && cmd+=(--lr "$LR")
  cmd+=(--weight_decay "$WD" --mu "$MU" --scalar_lr 0.01)  # the tiny model's own scalar LR, not SCALAR_LR's
  [[ $OPT == dynmuon ]] && cmd+=(--dynmuon_pmax "$PMAX" --dynmuon_pmin "$PMIN" --dynmuon_tau "$TAU" --dynmuon_w "$W")
  cmd+=(--seed "$SEED" --log_dir "$LOG_DIR" --run_name "$name"
    --checkpoint_dir "checkpoints/$name" --checkpoint_freq "$CHECKPOINT_FREQ" --resume auto ${EXTRA[@]+"${EXTRA[@]}"})
  run_cmd "${cmd[@]}"
}

source ./experiments.sh

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  echo
  echo "Experiments (logs in $LOG_DIR/<experiment>/; compare with python records/compare.py $LOG_DIR/<experiment>/*.txt):"
  for e in $EXPERIMENTS; do printf '  %-18s %s\n' "$e" "$(sed -n "s/^exp_$e() {  # //p" experiments.sh)"; done
}

# Command line: [experiment] with --list anywhere; everything else goes to the trainer
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }
if [[ $# -gt 0 && $1 != -* ]]; then
  EXPERIMENT=$1
  shift
  [[ " $EXPERIMENTS " == *" $EXPERIMENT "* ]] || die "unknown experiment '$EXPERIMENT'; valid: $EXPERIMENTS"
fi
EXTRA=()
for a in "$@"; do
  if [[ $a == --list ]]; then LIST=1; else EXTRA+=("$a"); fi
done

if [[ $EXPERIMENT == small_scale ]]; then
  exp_small_scale  # one GPU (or CPU, slowly): plain python, no torchrun
elif [[ -n $EXPERIMENT ]]; then
  ((NPROC > 0)) || die "experiment $EXPERIMENT needs CUDA GPUs and none were found (NPROC=0); set NPROC=N to list or run it for N GPUs"
  "exp_$EXPERIMENT"
elif ((NPROC > 0)); then
  run_one
else
  cpu_run
fi
