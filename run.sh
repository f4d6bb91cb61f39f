#!/usr/bin/env bash
# run.sh: launch the DynMuon paper's training runs (docs/algorithm.md). train_gpt.py owns every default.
#
#   ./run.sh [--list] [trainer flags...]               one run, set by the constants below
#   ./run.sh <experiment> [--list] [trainer flags...]  every run of one paper figure/table, in turn
#   ./run.sh --help                                    this text and the experiment names
#
# --list runs nothing and downloads nothing. It prints each command, and under it the configuration the
# trainer resolves for it (its --dry_run: the key training values, tokens, estimated time). Without GPUs an
# experiment is listed for NPROC=8.
#
# Run names: <opt>_<model>_<tokens>[_<changes>]_seed<seed>, where <changes> is every constant and trainer
# flag given here (environment, experiment or command line), as a short tag in a fixed order (lr0.02,
# wd0.05, pmin-0.5, spectral-scalar, dseed1; other flags <flag><value>), e.g. dynmuon_127M_10B_lr0.02_seed0
# for LR=0.02 ./run.sh or ./run.sh --lr 0.02. Flags that leave the math alone (the trainer's resume-neutral
# ones: --micro_batch_size, --kernels, --val_loss_every, ...) are not named. A name over 80 characters
# ends in 8 hex digits of the sha1 of all its changes instead of the tags that do not fit.
# run.sh never skips a run: each one checkpoints every CHECKPOINT_FREQ steps and starts with --resume auto,
# so the trainer continues an interrupted run, says a finished one is finished (naming its log; exit 0), and
# refuses one whose flags differ from its checkpoint's (exit 2). SIGTERM/SIGINT to run.sh go to the trainer
# (it checkpoints and exits 143); run.sh exits with the trainer's status and starts no further run.
#
# Constants (environment variables). Empty means the trainer's default: only the set ones are passed, so a
# default changed in train_gpt.py changes what ./run.sh trains.
#   MODEL=127M         --model: 127M | 601M | 1.1B | qwen171M
#   OPT=dynmuon        --optimizer: dynmuon | muon | normuon | adamw
#   TOKENS=10B         token budget, as --num_iterations: 2.5B 5000 | 5B 10000 | 10B 20000 | 20B 38000 (100B copy)
#   SEED=0             --seed; named by every run, so always passed
#   LR WD MU SCALAR_LR                 --lr --weight_decay --mu --scalar_lr
#   PMAX PMIN TAU W SPECTRAL           --dynmuon_pmax --dynmuon_pmin --dynmuon_tau --dynmuon_w --spectral
#                                      (passed to dynmuon runs only: the others do not read them)
#   WARMUP WARMDOWN                    --warmup_ratio --warmdown_ratio
#   BATCH_SIZE SEQ_LEN                 --batch_size --sequence_length
#   DEVICE_BATCH_SIZE MICRO_BATCH      --device_batch_size --micro_batch_size
#   VAL_EVERY VAL_TOKENS               --val_loss_every --val_tokens
#   NUM_ITERATIONS                     --num_iterations instead of TOKENS's
#   DATA_SEED                          --data_seed: shuffled batch order
#   DATA_VARIANT       10B | 100B | edu10B; empty: TOKENS's (20B: 100B, else 10B)
#   DATA_ROOT=data     shards in DATA_ROOT/fineweb10B, fineweb100B, finewebedu10B (fetched when missing)
#   LOG_DIR=logs       logs of single runs; an experiment's go to LOG_DIR/<experiment>
#   CHECKPOINT_ROOT=checkpoints   CHECKPOINT_ROOT/<run> (experiments: CHECKPOINT_ROOT/<experiment>/<run>)
#   CHECKPOINT_FREQ=1000          --checkpoint_freq (steps)
#   RUN_NAME           a single run's name instead of the derived one (not for experiments)
#   NPROC              GPUs, one torchrun process each; default: CUDA_VISIBLE_DEVICES, else nvidia-smi -L.
#                      0 (no GPU): a small CPU smoke run instead (tiny model, synthetic shards in
#                      DATA_ROOT/tiny_synthetic, 100 steps; NUM_ITERATIONS and the other constants apply)
#   PYTHON=python3     the interpreter of the trainer and the data scripts
#   LIST_CONFIG=1      0: --list prints the commands only (no trainer dry runs, no torch needed)
# e.g.   MODEL=601M TOKENS=20B OPT=muon ./run.sh      LR=0.02 SEED=1 ./run.sh --list      ./run.sh --lr 0.02
# Trainer flags on the command line come last, so they win, and name the run as constants do; run.sh sets
# --log_dir, --checkpoint_dir and --resume itself. Shards are fetched (data/cached_fineweb10B.py) after the
# trainer has accepted the flags, unless --data_dir is given.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-127M}
OPT=${OPT:-dynmuon}
TOKENS=${TOKENS:-10B}
SEED=${SEED:-0}
DATA_VARIANT=${DATA_VARIANT:-}
DATA_ROOT=${DATA_ROOT:-data}
LOG_DIR=${LOG_DIR:-logs}
CHECKPOINT_ROOT=${CHECKPOINT_ROOT:-checkpoints}
CHECKPOINT_FREQ=${CHECKPOINT_FREQ:-1000}
RUN_NAME=${RUN_NAME:-}
PYTHON=${PYTHON:-python3}
LIST_CONFIG=${LIST_CONFIG:-1}

# The constants that stand for one trainer flag each: empty (unset) = not passed = the trainer's default
CONSTANT_FLAGS="LR:lr WD:weight_decay MU:mu SCALAR_LR:scalar_lr PMAX:dynmuon_pmax PMIN:dynmuon_pmin TAU:dynmuon_tau
  W:dynmuon_w SPECTRAL:spectral WARMUP:warmup_ratio WARMDOWN:warmdown_ratio BATCH_SIZE:batch_size
  SEQ_LEN:sequence_length DEVICE_BATCH_SIZE:device_batch_size MICRO_BATCH:micro_batch_size VAL_EVERY:val_loss_every
  VAL_TOKENS:val_tokens NUM_ITERATIONS:num_iterations DATA_SEED:data_seed"
for _c in $CONSTANT_FLAGS; do _c=${_c%%:*}; declare "$_c=${!_c:-}"; done
DYNMUON_FLAGS=" dynmuon_pmax dynmuon_pmin dynmuon_tau dynmuon_w spectral p_schedule p_switch_step "

# Trainer flag -> its tag in run names, in the order tags appear (flags not here: <flag><value>, by name)
NAME_TAGS="lr:lr weight_decay:wd mu:mu scalar_lr:slr scalar_opt:sopt adjust_lr:adjlr lr_schedule:lrsched
  warmup_ratio:warmup warmdown_ratio:warmdown dynmuon_pmax:pmax dynmuon_pmin:pmin dynmuon_tau:tau dynmuon_w:w
  p_schedule:sched p_switch_step:switch spectral:spectral batch_size:bs sequence_length:seq num_iterations:iters
  val_tokens:valtok model_dim:d n_layer:layers n_head:heads data:data data_seed:dseed"
NAME_MAX=80
# Flags that do not change what is trained, so never name a run: train_gpt.py's RESUME_NEUTRAL_FLAGS (those a
# run may change when it resumes; tests/test_run_sh.py checks that the two lists agree)
NEUTRAL_FLAGS=" data_dir device_batch_size micro_batch_size val_loss_every device no_compile log_dir run_name wandb
  dry_run target_loss record checkpoint_dir checkpoint_freq keep_checkpoints resume kernels no_triton attention
  ddp_bucket_mb no_wandb wandb_project_name wandb_job_name fs_size tp_size dp_size "
NEUTRAL_FLAGS=" $(echo $NEUTRAL_FLAGS) "  # one space between names, for the " $flag " lookups

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
LIST=0       # 1: print the commands instead of running them
EXPERIMENT=  # set when running an experiment
EXTRA=()     # trainer flags from the command line, appended to every run

die() { echo "run.sh: $*" >&2; exit 2; }

quote() { printf '%q' "$1"; shift; (($# == 0)) || printf ' %q' "$@"; }

# ----------------------------------------------------------------------------- trainer flags and run names

# parse_flags ARGS...: PF_NAMES/PF_VALUES, one entry a flag (--f v, --f=v; a flag without a value: v empty).
# A value never starts with "--", which is how a boolean flag (--no_compile) is told apart.
parse_flags() {
  PF_NAMES=() PF_VALUES=()
  while (($#)); do
    local a=$1
    shift
    [[ $a == --?* ]] || die "unexpected argument '$a'; trainer flags start with -- (see ./run.sh --help)"
    a=${a#--}
    if [[ $a == *=* ]]; then
      PF_NAMES+=("${a%%=*}") PF_VALUES+=("${a#*=}")
    elif (($#)) && [[ $1 != --* ]]; then
      PF_NAMES+=("$a") PF_VALUES+=("$1")
      shift
    else
      PF_NAMES+=("$a") PF_VALUES+=("")
    fi
  done
}

last_value() {  # last_value FLAG DEFAULT ARGS...: the value the trainer will see (argparse keeps the last)
  local flag=$1 value=$2 i
  shift 2
  parse_flags "$@"
  for i in "${!PF_NAMES[@]}"; do [[ ${PF_NAMES[i]} == "$flag" ]] && value=${PF_VALUES[i]}; done
  echo "$value"
}

has_flag() {  # has_flag FLAG ARGS...
  local flag=$1
  shift
  parse_flags "$@"
  [[ " ${PF_NAMES[*]} " == *" $flag "* ]]
}

constant_flags() {  # constant_flags OPT: the flags of the set constants (dynmuon's own only for OPT=dynmuon)
  local c var flag
  for c in $CONSTANT_FLAGS; do
    var=${c%%:*} flag=${c#*:}
    [[ -n ${!var} ]] || continue
    [[ $1 != dynmuon && $DYNMUON_FLAGS == *" $flag "* ]] && continue
    printf '%s\0' "--$flag" "${!var}"
  done
}

changes() {  # changes ARGS...: flag=value of every flag that names a run (not neutral, not in the name's head)
  local i
  parse_flags "$@"
  for i in "${!PF_NAMES[@]}"; do
    case ${PF_NAMES[i]} in optimizer|model|seed) continue ;; esac
    [[ $NEUTRAL_FLAGS == *" ${PF_NAMES[i]} "* ]] && continue
    printf '%s\0' "${PF_NAMES[i]}=${PF_VALUES[i]}"
  done
}

tag() {  # tag NAME VALUE: lr0.02, pmin-0.25, spectral-scalar, or NAME alone for a flag without a value
  local value=${2//[^A-Za-z0-9._+-]/-}
  if [[ -z $value ]]; then echo "$1"
  elif [[ $value == [-+.0-9]* ]]; then echo "$1$value"
  else echo "$1-$value"; fi
}

# make_name HEAD SEED FLAG=VALUE...: HEAD_<tags>_seedSEED (no _seed part for an empty SEED). A later FLAG=VALUE
# replaces an earlier one, as in the trainer. Over NAME_MAX characters, the tags that do not fit give way to
# 8 hex digits of the sha1 of every change, so two long names differ whenever their changes do.
make_name() {
  local head=$1 seed=$2 kv f t
  shift 2
  local -A value=()
  for kv in "$@"; do value[${kv%%=*}]=${kv#*=}; done
  local tags=() canon=()
  for f in "${!value[@]}"; do canon+=("$f=${value[$f]}"); done
  for t in $NAME_TAGS; do
    f=${t%%:*}
    [[ -v "value[$f]" ]] || continue
    tags+=("$(tag "${t#*:}" "${value[$f]}")")
    unset "value[$f]"
  done
  if ((${#value[@]})); then
    while IFS= read -r f; do tags+=("$(tag "$f" "${value[$f]}")"); done < <(printf '%s\n' "${!value[@]}" | sort)
  fi
  local tail=${seed:+_seed$seed} name=$head
  for t in ${tags[@]+"${tags[@]}"}; do name+=_$t; done
  if ((${#name} + ${#tail} > NAME_MAX)); then
    local hash
    hash=$(printf '%s\n' "${canon[@]}" | LC_ALL=C sort | { sha1sum 2>/dev/null || shasum; } | cut -c1-8)
    name=$head
    for t in ${tags[@]+"${tags[@]}"}; do
      ((${#name} + 1 + ${#t} + 9 + ${#tail} <= NAME_MAX)) || break
      name+=_$t
    done
    name+=_$hash
  fi
  echo "$name$tail"
}

# ----------------------------------------------------------------------------- the trainer's resolved config

# Asks the trainer what each command resolves to, in one Python process for all of them (torch is imported
# once): it runs train_gpt.py as __main__ with the command's flags plus --dry_run, for the command's WORLD_SIZE
# (--list without a GPU: as on one, see as_on_a_gpu). In WORK: <i>.argv (world size, then the flags,
# NUL-separated) in; <i>.rc (exit status, or "none" when the trainer could not be run), <i>.err, <i>.tokens
# and <i>.summary ("#  " lines) out.
RESOLVE_PY=$(cat <<'EOF'
import contextlib, io, json, os, runpy, sys, types
from pathlib import Path

work, first, last, assume_gpu = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[5] == "1"
tags = dict(t.split(":", 1) for t in sys.argv[4].split())
tags.update(micro_batch_size="micro", data_seed="data_seed")
SHOWN = ["lr", "weight_decay", "mu", "scalar_lr", "scalar_opt", "adjust_lr", "dynmuon_pmax", "dynmuon_pmin",
         "dynmuon_tau", "dynmuon_w", "p_schedule", "p_switch_step", "spectral", "warmup_ratio", "warmdown_ratio",
         "lr_schedule", "batch", "micro_batch_size", "seed", "data_seed"]
MUON_FAMILY = {"mu", "scalar_opt", "adjust_lr"}
DYNMUON = {"dynmuon_pmax", "dynmuon_pmin", "dynmuon_tau", "dynmuon_w", "p_schedule", "p_switch_step", "spectral"}


def write(i, rc, summary=(), err="", tokens=None):
    (work / f"{i}.rc").write_text(str(rc))
    (work / f"{i}.summary").write_text("".join(f"#  {line}\n" for line in summary))
    (work / f"{i}.err").write_text(err)
    if tokens is not None:
        (work / f"{i}.tokens").write_text(str(tokens))


def summary(cfg, text):
    cfg["batch"] = f"{cfg['batch_size']}x{cfg['sequence_length']}"
    opt = cfg["optimizer"]
    keys = [k for k in SHOWN if not (k in MUON_FAMILY and opt == "adamw") and not (k in DYNMUON and opt != "dynmuon")
            and not (k == "p_switch_step" and cfg.get("p_schedule") != "switch")]
    values = " ".join(f"{tags.get(k, k)}={'none' if cfg.get(k) is None else cfg.get(k)}" for k in keys)
    return [values] + [line for line in text.splitlines() if line.startswith(("tokens:", "estimated time:"))]


@contextlib.contextmanager
def as_on_a_gpu():
    """--list on a machine without CUDA: torch reports one H100-size GPU while the trainer resolves a command,
    as its defaults depend on the device (batch shape, micro-batch, kernels); commands with --device cpu keep
    theirs. Only torch's answers about the GPU change, and only in this process."""
    cuda, props = torch.cuda, types.SimpleNamespace(total_memory=int(79.6 * 2 ** 30), name="H100", major=9, minor=0)
    saved = {k: getattr(cuda, k) for k in ("is_available", "device_count", "get_device_properties",
                                           "get_device_capability")}
    cuda.is_available, cuda.device_count = (lambda: True), (lambda: 1)
    cuda.get_device_properties, cuda.get_device_capability = (lambda *a, **k: props), (lambda *a, **k: (9, 0))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(cuda, k, v)


try:
    import torch  # the trainer needs it; without it, say so under each command
except Exception as e:
    for i in range(first, last):
        write(i, "none", [f"(no resolved configuration: {sys.executable} cannot import torch: {e})"])
    sys.exit(0)
for i in range(first, last):
    words = [os.fsdecode(w) for w in (work / f"{i}.argv").read_bytes().split(b"\0")[:-1]]
    os.environ["WORLD_SIZE"] = words[0]
    sys.argv = ["train_gpt.py", *words[1:], "--dry_run"]
    out, err, rc = io.StringIO(), io.StringIO(), 0
    pretend = assume_gpu and not torch.cuda.is_available()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            as_on_a_gpu() if pretend else contextlib.nullcontext():
        try:
            runpy.run_path("train_gpt.py", run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception as e:  # the trainer crashed: report it like a refusal
            rc = 1
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    text = out.getvalue()
    if rc != 0:
        write(i, int(rc), err=err.getvalue() or text)
        continue
    try:
        cfg, end = json.JSONDecoder().raw_decode(text, text.index("{"))
    except ValueError:
        write(i, "none", ["(no resolved configuration: unreadable --dry_run output)"])
        continue
    note = ["(resolved as on one 80 GB H100: no CUDA GPU here)"] if pretend and cfg["device"] == "cuda" else []
    tokens = cfg["num_iterations"] * cfg["batch_size"] * cfg["sequence_length"]
    write(i, 0, summary(cfg, text[end:]) + note, tokens=tokens)
EOF
)
WORK=     # a temporary folder for the dry runs' answers
N_CMDS=0  # commands numbered so far (<i> in WORK)
PLAN=()   # --list: what to print, in order: "text:<line>" or "run:<i>"
declare -A RUN_NAMES=()  # the names launched so far: one name, one run

work_dir() {
  if [[ -z $WORK ]]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/run.sh.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
  fi
}

resolve() {  # resolve FIRST LAST: the trainer's dry runs of commands FIRST..LAST-1 (see RESOLVE_PY)
  local i
  (($1 < $2)) || return 0
  "$PYTHON" -c "$RESOLVE_PY" "$WORK" "$1" "$2" "$NAME_TAGS" "$LIST" >"$WORK/resolve.out" 2>&1 || true
  for ((i = $1; i < $2; i++)); do
    [[ -f $WORK/$i.rc ]] && continue
    echo none >"$WORK/$i.rc"  # the resolver did not start (no such python?): its last words say why
    printf '#  (no resolved configuration: %s)\n' "$(tail -n 1 "$WORK/resolve.out")" >"$WORK/$i.summary"
  done
}

# ----------------------------------------------------------------------------- data and launching

DATA_MAX_SHARDS="10B:103 100B:1030 edu10B:99"  # train shards of each copy on the hub (100M tokens each)

data_dir_of() {  # data_dir_of VARIANT
  case $1 in
    10B|100B) echo "$DATA_ROOT/fineweb$1" ;;
    edu10B) echo "$DATA_ROOT/finewebedu10B" ;;
    *) die "DATA_VARIANT=$1: expected 10B, 100B or edu10B" ;;
  esac
}

# fetch_cmd VARIANT DIR TOKENS: sets FETCH to the download of the shards a run of TOKENS tokens reads, or to
# nothing when they are there already
fetch_cmd() {
  local variant=$1 dir=$2 tokens=$3 prefix=fineweb max entry
  FETCH=()
  [[ $variant == edu10B ]] && prefix=finewebedu
  for entry in $DATA_MAX_SHARDS; do [[ ${entry%%:*} == "$variant" ]] && max=${entry#*:}; done
  local need=$(((tokens + 99999999) / 100000000))
  if ((need > max)); then need=$max; fi
  if [[ -f $dir/${prefix}_val_000000.bin && -f $dir/$(printf '%s_train_%06d.bin' "$prefix" "$need") ]]; then
    return 0
  fi
  FETCH=("$PYTHON" data/cached_fineweb10B.py "$need" --variant "$variant" --out_dir "$dir")
}

run_cmd() {  # run_cmd CMD...: run it (--list: print it, in order with the runs)
  if ((LIST)); then PLAN+=("text:$(quote "$@")"); else "$@"; fi
}

plan_text() {  # plan_text WORDS...: a line of --list output (nothing when running)
  if ((LIST)); then PLAN+=("text:$*"); fi
}

# run_trainer CMD...: CMD as a child, returning its exit status. SIGTERM/SIGINT to run.sh are passed on to it
# as SIGTERM (the trainer checkpoints and exits 143; torchrun passes it to every rank) rather than leaving it
# running on without run.sh.
run_trainer() {
  TRAINER_PID= TRAINER_STOP=0
  trap 'TRAINER_STOP=1; [[ -z $TRAINER_PID ]] || kill -TERM "$TRAINER_PID" 2>/dev/null || true' TERM INT
  "$@" &
  TRAINER_PID=$!
  ((TRAINER_STOP == 0)) || kill -TERM "$TRAINER_PID" 2>/dev/null || true  # a signal before the pid was known
  local rc
  while :; do
    rc=0
    wait "$TRAINER_PID" || rc=$?
    ((rc > 128)) && kill -0 "$TRAINER_PID" 2>/dev/null || break  # else a trapped signal woke wait: wait on
  done
  if ((rc > 128)); then  # the trainer may have ended while a trapped signal woke wait: ask for its own status
    local own=0
    wait "$TRAINER_PID" 2>/dev/null || own=$?
    ((own == 127)) || rc=$own  # 127: this bash no longer knows the pid; keep what wait said
  fi
  trap - TERM INT
  TRAINER_PID=
  return "$rc"
}

# trainer_status JSONL STARTED RC: the exit status the trainer logged as the last event of JSONL (written after
# the file STARTED), else RC. torchrun exits 1 whenever a rank fails or it is signalled (its ranks then
# checkpoint and exit 143), so the trainer's own status comes from its log.
trainer_status() {
  local last
  if [[ -f $1 && $1 -nt $2 ]]; then last=$(tail -n 1 "$1"); fi
  if [[ ${last:-} =~ \"event\":\ \"stop\" && $last =~ \"exit_code\":\ ([0-9]+) ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    echo "$3"
  fi
}

# launch NAME WORLD VARIANT DATA_DIR CMD...: one run of the trainer (CMD: launcher words, train_gpt.py, flags).
# --list: noted for print_plan. Else the trainer checks the flags (its --dry_run) before anything is fetched,
# the shards of VARIANT are fetched into DATA_DIR (VARIANT empty: nothing to fetch), and CMD runs.
launch() {
  local name=$1 world=$2 variant=$3 data_dir=$4 i=$N_CMDS
  shift 4
  local flags=("$@")
  while ((${#flags[@]})) && [[ ${flags[0]} != train_gpt.py ]]; do flags=("${flags[@]:1}"); done
  work_dir
  ((N_CMDS += 1))
  printf '%s\0' "$world" "${flags[@]:1}" >"$WORK/$i.argv"
  quote "$@" >"$WORK/$i.cmd"
  printf '%s\n' "$variant" "$data_dir" >"$WORK/$i.data"
  if [[ -n ${RUN_NAMES[$name]+set} ]]; then  # e.g. a command-line --lr over a whole lr sweep
    die "two runs of ${EXPERIMENT:-this command} are both named $name, so the second would only find the first" \
        "finished; drop the command-line flag that makes them the same"
  fi
  RUN_NAMES[$name]=1
  if ((LIST)); then
    PLAN+=("run:$i")
    return 0
  fi
  echo "run.sh: === $name ===" >&2
  resolve "$i" "$N_CMDS"
  local rc
  rc=$(<"$WORK/$i.rc")
  if [[ $rc == none ]]; then
    die "cannot ask the trainer to check the flags of $name $(sed 's/^#  //' "$WORK/$i.summary");" \
        "nothing was downloaded or run"
  elif ((rc != 0)); then
    cat "$WORK/$i.err" >&2
    die "the trainer refused the flags of $name (message above); nothing was downloaded or run"
  fi
  cat "$WORK/$i.summary" >&2
  if [[ -n $variant ]] && ! has_flag dry_run "${flags[@]:1}"; then
    fetch_cmd "$variant" "$data_dir" "$(<"$WORK/$i.tokens")"
    ((${#FETCH[@]} == 0)) || "${FETCH[@]}"
  fi
  local jsonl started=$WORK/$i.started
  jsonl=$(last_value log_dir logs "${flags[@]:1}")/$name.jsonl
  touch "$started"
  rc=0
  run_trainer "$@" || rc=$?
  if ((rc != 0)) && [[ $1 == torchrun ]]; then rc=$(trainer_status "$jsonl" "$started" "$rc"); fi
  if ((rc != 0)); then
    echo "run.sh: $name: the trainer exited with status $rc; rerunning the same command resumes it" \
         "from its last checkpoint" >&2
    exit "$rc"
  fi
}

print_plan() {  # --list: the commands, each with its fetch (single runs) and the trainer's resolved config
  ((LIST_CONFIG == 0)) || resolve 0 "$N_CMDS"
  local entry i variant data_dir
  for entry in ${PLAN[@]+"${PLAN[@]}"}; do
    if [[ $entry == text:* ]]; then echo "${entry#text:}"; continue; fi
    i=${entry#run:}
    { read -r variant; read -r data_dir; } <"$WORK/$i.data"
    [[ -z $EXPERIMENT ]] || variant=  # an experiment's runs each fetch what they read when they start
    if [[ -n $variant && -f $WORK/$i.tokens ]]; then
      fetch_cmd "$variant" "$data_dir" "$(<"$WORK/$i.tokens")"
      if ((${#FETCH[@]})); then quote "${FETCH[@]}"; echo; fi
    elif [[ -n $variant ]]; then
      echo "# first: data/cached_fineweb10B.py fetches the missing shards of $variant into $data_dir" \
           "(how many: the trainer's config)"
    fi
    cat "$WORK/$i.cmd"
    echo
    if ((LIST_CONFIG == 0)); then continue; fi
    if [[ $(<"$WORK/$i.rc") =~ ^[1-9] ]]; then
      echo "#  the trainer refuses this command: $(grep -m1 . "$WORK/$i.err")"
    else
      cat "$WORK/$i.summary"
    fi
  done
}

# ----------------------------------------------------------------------------- runs

is_constant() {  # is_constant NAME: a constant an experiment may set for one run
  [[ " MODEL OPT TOKENS SEED DATA_VARIANT " == *" $1 "* || " $CONSTANT_FLAGS " == *" $1:"* ]]
}

# run_one [VAR=value ...] [-- trainer flags]: one GPU run with these constants changed for it and these flags
# added; the command line's flags (EXTRA) come last. It passes what it must (model, optimizer, token budget,
# seed, data folder, name, logs and checkpoints) and what was set; the trainer supplies the rest.
run_one() {
  while (($#)) && [[ $1 == [A-Z]*=* ]]; do
    is_constant "${1%%=*}" || die "run_one: ${1%%=*} is not a constant of run.sh (a bug in experiments.sh)"
    local "$1"
    shift
  done
  if [[ ${1:-} == -- ]]; then shift; fi
  local iters variant=10B
  case $TOKENS in
    2.5B) iters=5000 ;;
    5B) iters=10000 ;;
    10B) iters=20000 ;;
    20B) iters=38000 variant=100B ;;  # the 10B copy holds ~10.3B tokens
    *) die "TOKENS=$TOKENS: expected 2.5B, 5B, 10B or 20B" ;;
  esac
  local named=()  # changes that name the run but are no trainer flag: the data copy when it is not TOKENS's
  if [[ -n $DATA_VARIANT && $DATA_VARIANT != "$variant" ]]; then named+=("data=$DATA_VARIANT"); fi
  variant=${DATA_VARIANT:-$variant}
  local data_dir
  data_dir=$(data_dir_of "$variant")
  if has_flag data_dir "$@" ${EXTRA[@]+"${EXTRA[@]}"}; then variant=; fi  # the user's own shards: no fetch
  local base=(--model "$MODEL" --optimizer "$OPT" --data_dir "$data_dir" --num_iterations "$iters" --seed "$SEED")
  start_run "$TOKENS" "$NPROC" "$variant" "$data_dir" \
    torchrun --standalone "--nproc_per_node=$NPROC" train_gpt.py -- "${base[@]}" -- "$@" -- ${named[@]+"${named[@]}"}
}

# start_run BUDGET WORLD VARIANT DATA_DIR LAUNCHER... -- BASE... -- RUN_FLAGS... -- NAMED...: names the run
# <opt>_<model>_BUDGET[_changes]_seed<seed>, with opt, model and seed as the trainer will see them and the
# changes of the set constants, RUN_FLAGS, EXTRA and NAMED (flag=value, no trainer flag), and launches
# LAUNCHER BASE <the constants' flags> RUN_FLAGS <logs and checkpoints> EXTRA
start_run() {
  local budget=$1 world=$2 variant=$3 data_dir=$4
  shift 4
  local launcher=() base=() run_flags=()
  while [[ $1 != -- ]]; do launcher+=("$1"); shift; done
  shift
  while [[ $1 != -- ]]; do base+=("$1"); shift; done
  shift
  while [[ $1 != -- ]]; do run_flags+=("$1"); shift; done
  shift
  local given=(${run_flags[@]+"${run_flags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"})
  local opt model seed
  opt=$(last_value optimizer "" "${base[@]}" ${given[@]+"${given[@]}"})
  model=$(last_value model "" "${base[@]}" ${given[@]+"${given[@]}"})
  seed=$(last_value seed "" "${base[@]}" ${given[@]+"${given[@]}"})
  local consts=()
  mapfile -d '' consts < <(constant_flags "$opt")
  local changed=()
  mapfile -d '' changed < <(changes ${consts[@]+"${consts[@]}"} ${given[@]+"${given[@]}"})
  local name
  name=$(make_name "${opt}_${model}_$budget" "$seed" ${changed[@]+"${changed[@]}"} "$@")
  local log_dir=$LOG_DIR ckpt_dir=$CHECKPOINT_ROOT
  if [[ -n $EXPERIMENT ]]; then
    log_dir+=/$EXPERIMENT ckpt_dir+=/$EXPERIMENT
  else
    name=$(last_value run_name "${RUN_NAME:-$name}" ${EXTRA[@]+"${EXTRA[@]}"})
  fi
  launch "$name" "$world" "$variant" "$data_dir" "${launcher[@]}" "${base[@]}" ${consts[@]+"${consts[@]}"} \
    ${run_flags[@]+"${run_flags[@]}"} --log_dir "$log_dir" --run_name "$name" --checkpoint_dir "$ckpt_dir/$name" \
    --checkpoint_freq "$CHECKPOINT_FREQ" --resume auto ${EXTRA[@]+"${EXTRA[@]}"}
}

cpu_run() {  # no CUDA GPU: a small but real run of the tiny preset on synthetic shards (one process)
  local data_dir=$DATA_ROOT/tiny_synthetic
  echo "run.sh: no CUDA GPU found (NPROC=0): running a small CPU smoke run (tiny model, synthetic data)" \
       "instead of the paper's $MODEL run; set NPROC=N to run it on N GPUs" >&2
  if [[ ! -f $data_dir/fineweb_val_000000.bin ]]; then
    run_cmd "$PYTHON" data/make_synthetic_shards.py --out_dir "$data_dir" --train_shards 2 \
      --shard_tokens 1048576 --val_tokens 262145 --seed 0
  fi
  # The smoke run's own size (not the paper's): vocab stays 50304, as the synthetic token ids are spread over
  # the GPT-2 vocabulary; the tiny model learns at scalar_lr 0.01
  local base=(--model tiny --device cpu --optimizer "$OPT" --data_dir "$data_dir" --batch_size 8
    --device_batch_size 8 --sequence_length 64 --num_iterations 100 --val_loss_every 25 --val_tokens 4096
    --scalar_lr 0.01 --seed "$SEED")
  start_run cpu 1 "" "$data_dir" "$PYTHON" train_gpt.py -- "${base[@]}" -- --
}

source ./experiments.sh

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
  echo
  echo "Experiments (./run.sh <experiment> [--list]; logs in $LOG_DIR/<experiment>/, compare them with"
  echo "python records/compare.py $LOG_DIR/<experiment>/*.txt):"
  local e
  for e in $EXPERIMENTS; do printf '  %-20s %s\n' "$e" "$(sed -n "s/^exp_$e() {  # //p" experiments.sh)"; done
}

# Command line: [experiment] with --list anywhere; everything else goes to the trainer
parse_command_line() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
  if [[ $# -gt 0 && $1 != -* ]]; then
    EXPERIMENT=$1
    shift
    [[ " $EXPERIMENTS " == *" $EXPERIMENT "* ]] || die "unknown experiment '$EXPERIMENT'; valid: $EXPERIMENTS"
  fi
  local a
  for a in "$@"; do
    if [[ $a == --list ]]; then LIST=1; else EXTRA+=("$a"); fi
  done
  [[ $EXPERIMENT == decomposition_small ]] && return 0  # its flags are study.py's, not the trainer's
  parse_flags ${EXTRA[@]+"${EXTRA[@]}"}
  local f
  for f in ${PF_NAMES[@]+"${PF_NAMES[@]}"}; do
    case $f in
      log_dir|checkpoint_dir) die "--$f is set by run.sh; set LOG_DIR or CHECKPOINT_ROOT instead" ;;
      resume) die "run.sh always passes --resume auto; to start a run again, move its checkpoint folder away" ;;
      run_name) [[ -z $EXPERIMENT ]] || die "an experiment names its runs itself; drop --run_name" ;;
    esac
  done
  if [[ -n $EXPERIMENT && -n $RUN_NAME ]]; then die "an experiment names its runs itself; unset RUN_NAME"; fi
}

main() {
  parse_command_line "$@"
  if [[ -n $EXPERIMENT && $EXPERIMENT != small_scale ]] && ((NPROC == 0)); then
    ((LIST)) || die "experiment $EXPERIMENT needs CUDA GPUs and none were found (NPROC=0);" \
                    "set NPROC=N to run it on N GPUs"
    echo "run.sh: no CUDA GPU found: listing $EXPERIMENT for NPROC=8; set NPROC=N to list it for N GPUs" >&2
    NPROC=8
  fi
  if [[ -n $EXPERIMENT && $EXPERIMENT != decomposition_small ]] && ((!LIST)); then
    LIST=1  # name every run first (nothing printed or run): two runs under one name stop it before any starts
    "exp_$EXPERIMENT"
    LIST=0 PLAN=() N_CMDS=0 RUN_NAMES=()
  fi
  if [[ -n $EXPERIMENT ]]; then
    "exp_$EXPERIMENT"
  elif ((NPROC > 0)); then
    run_one
  else
    cpu_run
  fi
  if ((LIST)); then print_plan; fi
}

main "$@"
