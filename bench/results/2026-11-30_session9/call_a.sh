#!/usr/bin/env bash
# Session 9, call A (2 x H200): issue 18's check that the reorganised trainer changes neither speed nor numerics
# (gpu_in/old = train_gpt.py + bench_step.py at 2da9f6e), the study corpus, and bench_spectral.py.
set -u
export PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
(python3 data/python_corpus.py --out_dir gpu_data/pycorpus --bpe_file gpu_in/gpt2.tiktoken --workers 20 \
   > $R/corpus.txt 2>&1; echo "corpus rc=$?" >> $R/corpus.txt) &
python3 data/tokenize_shards.py gpu_in/prose.jsonl.gz --out_dir gpu_data/prose --bpe_file gpu_in/gpt2.tiktoken \
  --shard_size 8000000 --val_tokens 491521 --shuffle_seed 0 --workers 4 > $R/prose_tok.txt 2>&1 || tail -3 $R/prose_tok.txt
# GPU 1: 50 steps of 127M on prose, same seed: old, new, old again (run-to-run noise)
F="--data_dir gpu_data/prose --val_tokens 491520 --model 127M --batch_size 64 --num_iterations 50 --val_loss_every 25"
(export CUDA_VISIBLE_DEVICES=1
 for v in old_a new old_b; do
   code=train_gpt.py; [[ $v == old* ]] && code=gpu_in/old/train_gpt.py
   python3 $code $F --log_dir $R/logs --run_name prose50_$v > $R/prose50_$v.out 2>&1
   echo "$v rc=$? $(grep -E '^step:50/50 val' $R/logs/prose50_$v.txt)" >> $R/prose50.txt
 done
 python3 bench/bench_spectral.py --shapes study 127M --json $R/spectral.json > $R/spectral.txt 2>&1) &
# GPU 0: bench_step old vs new, 127M then 1.1B, DynMuon and Muon (same GPU, one after the other)
export CUDA_VISIBLE_DEVICES=0
for m in 127M 1.1B; do
  for v in old new; do
    b=bench/bench_step.py; [[ $v == old ]] && b=gpu_in/old/bench/bench_step.py
    timeout 170 python3 $b --models $m --optimizers dynmuon --steps 3 --warmup 2 --json $R/step_${m}_$v.json \
      > $R/step_${m}_$v.txt 2>&1; echo "$m $v rc=$?"; tail -4 $R/step_${m}_$v.txt
  done
done
wait
cat $R/prose50.txt; tail -25 $R/spectral.txt; tail -12 $R/corpus.txt; ls -la gpu_data/pycorpus | head
