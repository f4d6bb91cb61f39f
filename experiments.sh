# experiments.sh: the runs of each paper figure/table; sourced by run.sh, not run on its own.
#
#   ./run.sh <experiment> [--list] [extra trainer flags]
#   python records/compare.py logs/<experiment>/*.txt
#
# exp_<name> calls `run_one [VAR=value ...] [-- trainer flags]` (run.sh) once per run, in order, with only
# what the experiment varies: everything else is run.sh's constants (from the environment) or the trainer's
# default. Run names follow run.sh's rule (every change is in the name). Each run logs to
# logs/<experiment>/<run_name>.txt and checkpoints to checkpoints/<experiment>/<run_name>/ with --resume auto:
# rerunning an experiment continues an interrupted run, and the trainer says which ones are finished.
# The comment after `exp_<name>() {  #` is the help text.

EXPERIMENTS="main_table lr_sweep pmin_ablation tauw_ablation schedule_ablation svd_vs_taylor fineweb_edu token_budget
  seeds normuon qwen decomposition decomposition_small small_scale"
EXPERIMENTS=$(echo $EXPERIMENTS)

exp_main_table() {  # Table 1: 127M/601M/1.1B x 10B/20B tokens x muon/dynmuon/adamw (18 runs)
  local model tokens opt
  for model in 127M 601M 1.1B; do
    for tokens in 10B 20B; do
      for opt in muon dynmuon adamw; do run_one MODEL=$model TOKENS=$tokens OPT=$opt; done
    done
  done
}

exp_lr_sweep() {  # 127M, 10B: lr 0.003/0.005/0.01/0.02/0.04 x muon/dynmuon (10 runs)
  local opt lr
  for opt in muon dynmuon; do
    for lr in 0.003 0.005 0.01 0.02 0.04; do run_one MODEL=127M TOKENS=10B OPT=$opt LR=$lr; done
  done
}

exp_pmin_ablation() {  # 127M dynmuon: p_min -0.1/-0.25/-0.5 (3 runs)
  local p
  for p in -0.1 -0.25 -0.5; do run_one MODEL=127M TOKENS=10B OPT=dynmuon PMIN=$p; done
}

exp_tauw_ablation() {  # 127M dynmuon: (tau, w) in {0.02,0.04,0.08}^2 (9 runs)
  local tau w
  for tau in 0.02 0.04 0.08; do
    for w in 0.02 0.04 0.08; do run_one MODEL=127M TOKENS=10B OPT=dynmuon TAU=$tau W=$w; done
  done
}

exp_schedule_ablation() {  # 127M dynmuon: logistic vs abrupt switch at step 500 vs fixed p_min vs reverse (4 runs)
  local base=(MODEL=127M TOKENS=10B OPT=dynmuon)
  run_one "${base[@]}" -- --p_schedule logistic
  run_one "${base[@]}" -- --p_schedule switch --p_switch_step 500  # p_max until 500, then p_min
  run_one "${base[@]}" -- --p_schedule fixed                       # p_min throughout
  run_one "${base[@]}" -- --p_schedule reverse                     # p_min to p_max
}

exp_svd_vs_taylor() {  # 127M dynmuon: Fast-Spectral (Taylor) vs exact SVD shaping (2 runs)
  local s
  for s in taylor svd; do run_one MODEL=127M TOKENS=10B OPT=dynmuon SPECTRAL=$s; done
}

exp_fineweb_edu() {  # 127M, 10B tokens of FineWeb-Edu (data/finewebedu10B): muon vs dynmuon (2 runs)
  local opt
  for opt in muon dynmuon; do run_one MODEL=127M TOKENS=10B OPT=$opt DATA_VARIANT=edu10B; done
}

exp_token_budget() {  # 601M: muon/dynmuon at 2.5B/5B/10B/20B tokens = 5000/10000/20000/38000 steps (8 runs)
  local opt tokens
  for opt in muon dynmuon; do
    for tokens in 2.5B 5B 10B 20B; do run_one MODEL=601M TOKENS=$tokens OPT=$opt; done
  done
}

exp_seeds() {  # 127M, 10B: muon/dynmuon at seeds 0, 1, 42 (6 runs)
  local opt seed
  for opt in muon dynmuon; do
    for seed in 0 1 42; do run_one MODEL=127M TOKENS=10B OPT=$opt SEED=$seed; done
  done
}

exp_normuon() {  # 127M, 10B: normuon vs dynmuon (2 runs)
  local opt
  for opt in normuon dynmuon; do run_one MODEL=127M TOKENS=10B OPT=$opt; done
}

exp_qwen() {  # Table 3: Qwen-style 171M, 10B: muon vs dynmuon (2 runs)
  local opt
  for opt in muon dynmuon; do run_one MODEL=qwen171M TOKENS=10B OPT=$opt; done
}

# What makes DynMuon work, at paper scale: is its gain a tuned Muon learning rate, the p schedule, or the
# spectral shaping of the p < 0 stage? Seed s also orders the data (--data_seed s), so seeds vary both.
exp_decomposition() {  # 127M, 10B, 3 seeds: muon lr 0.01-0.03, dynmuon default/--spectral scalar/polar/exact; adamw (25 runs)
  local seed lr spectral
  for seed in 0 1 2; do
    local base=(MODEL=127M TOKENS=10B SEED=$seed DATA_SEED=$seed)
    for lr in 0.01 0.015 0.02 0.03; do run_one "${base[@]}" OPT=muon LR=$lr; done
    run_one "${base[@]}" OPT=dynmuon  # the trainer's default p<0 stage: Fast-Spectral
    for spectral in scalar polar exact; do run_one "${base[@]}" OPT=dynmuon SPECTRAL=$spectral; done
    if ((seed == 0)); then run_one "${base[@]}" OPT=adamw; fi
  done
}

# The same study at small scale is records/2026-11-30_decomposition/study.py: it holds the run list and runs
# several runs a GPU at once; run.sh hands it NPROC (--gpus), --list and the command line's flags.
DECOMPOSITION_STUDY=records/2026-11-30_decomposition/study.py
exp_decomposition_small() {  # 1-2 GPUs: the decomposition study at small scale (records/2026-11-30_decomposition)
  if [[ ! -f $DECOMPOSITION_STUDY ]]; then
    if ((LIST)); then
      echo "# $DECOMPOSITION_STUDY does not exist yet: decomposition_small has no runs to list"
      return 0
    fi
    die "$DECOMPOSITION_STUDY does not exist yet; decomposition_small cannot run without it"
  fi
  local cmd=("$PYTHON" "$DECOMPOSITION_STUDY" --gpus "$NPROC" ${EXTRA[@]+"${EXTRA[@]}"})
  if ((LIST)); then
    "${cmd[@]}" --list || die "$DECOMPOSITION_STUDY --list failed (message above)"
    return 0
  fi
  local rc=0
  run_trainer "${cmd[@]}" || rc=$?
  ((rc == 0)) || { echo "run.sh: decomposition_small: $DECOMPOSITION_STUDY exited with status $rc" >&2; exit "$rc"; }
}

# Small-scale study (records/*_small_scale): a 49M model (d=384, 6 layers) on real text, one GPU, one
# epoch of a ~6.8M-token corpus: 400 steps of 32 x 512 tokens, the trainer's warmup/warmdown ratios,
# evaluation every 20 steps on the whole held-out split. The seed varies the initialisation only. Its runs are
# named <variant>_lr<lr>_seed<seed> (records/small_scale_table.py reads these names), so the constants and
# flags set for a study name its folder instead: LOG_DIR/small_scale[_<changes>] (e.g. small_scale_wd0.05).
SMALL_DATA=${SMALL_DATA:-$DATA_ROOT/small_scale_prose}
SMALL_CORPUS=${SMALL_CORPUS:-../shared/corpus/prose.jsonl.gz}
SMALL_BPE=${SMALL_BPE:-../shared/tokenizer/gpt2.tiktoken}
SMALL_FLAGS=(--model tiny --model_dim 384 --n_layer 6 --n_head 6 --batch_size 32 --device_batch_size 32
  --sequence_length 512 --num_iterations 400 --val_loss_every 20 --val_tokens 491520)
SMALL_DIR=small_scale  # the study's folder (logs and checkpoints), named by exp_small_scale

small_run() {  # small_run NAME [trainer flags]: one run of the study (one process), resumed or reported finished
  local name=$1 opt
  shift
  opt=$(last_value optimizer "$OPT" "$@")
  local consts=()
  mapfile -d '' consts < <(constant_flags "$opt")
  launch "$name" 1 "" "" "$PYTHON" train_gpt.py --data_dir "$SMALL_DATA" "${SMALL_FLAGS[@]}" \
    ${consts[@]+"${consts[@]}"} "$@" --log_dir "$LOG_DIR/$SMALL_DIR" --run_name "$name" --checkpoint_dir "$CHECKPOINT_ROOT/$SMALL_DIR/$name" \
    --checkpoint_freq "$CHECKPOINT_FREQ" --resume auto ${EXTRA[@]+"${EXTRA[@]}"}
}

best_lr() {  # best_lr OPT: the lr of the lowest best val loss among the study's sweep logs of OPT
  "$PYTHON" records/compare.py "$LOG_DIR/$SMALL_DIR"/"$1"_lr*_seed0.txt --target 0 --json | "$PYTHON" -c '
import json, re, sys
runs = json.load(sys.stdin)["runs"]
best = min(runs, key=lambda r: r["best_val_loss"])
print(re.search(r"_lr([0-9.]+)_", best["name"]).group(1))'
}

exp_small_scale() {  # one GPU, minutes: 49M model on real text, lr sweeps of muon/dynmuon/adamw, svd, 3 seeds
  local consts=() changed=() kv
  mapfile -d '' consts < <(constant_flags dynmuon)
  # the study sets lr, optimizer and seed per run: they do not name its folder
  while IFS= read -r -d '' kv; do [[ $kv == lr=* ]] || changed+=("$kv"); done \
    < <(changes ${consts[@]+"${consts[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
  SMALL_DIR=$(make_name small_scale "" ${changed[@]+"${changed[@]}"})
  if [[ ! -f $SMALL_DATA/fineweb_val_000000.bin ]]; then
    run_cmd "$PYTHON" data/tokenize_shards.py "$SMALL_CORPUS" --out_dir "$SMALL_DATA" --bpe_file "$SMALL_BPE" \
      --shard_size 8000000 --val_tokens 491521 --shuffle_seed 0 --workers 4
  fi
  local opt lr seed
  for opt in muon dynmuon; do
    for lr in 0.005 0.01 0.02 0.04; do small_run "${opt}_lr${lr}_seed0" --optimizer $opt --lr $lr; done
  done
  for lr in 0.001 0.002 0.004; do small_run "adamw_lr${lr}_seed0" --optimizer adamw --lr $lr; done
  if ((LIST)); then
    plan_text "# then, at the best lr of each (lowest best val loss): seeds 1 and 42 for muon and dynmuon," \
      "and dynmuon --spectral svd"
    return 0
  fi
  for opt in muon dynmuon; do
    lr=$(best_lr $opt)
    for seed in 1 42; do small_run "${opt}_lr${lr}_seed$seed" --optimizer $opt --lr "$lr" --seed $seed; done
  done
  lr=$(best_lr dynmuon)
  small_run "dynmuon-svd_lr${lr}_seed0" --optimizer dynmuon --lr "$lr" --spectral svd
  "$PYTHON" records/small_scale_table.py "$LOG_DIR/$SMALL_DIR"
}
