#!/usr/bin/env bash
# Session 9, call G (2 x H200): the final trainer on GPUs after the robustness changes: a 2-rank torchrun run with
# checkpoints, a second launch of the same run while the first is live (refused), the finished-run rerun, --dry_run.
set -u
export PYTHONUNBUFFERED=1
python3 data/python_corpus.py --out_dir gpu_data/pycorpus --bpe_file gpu_in/gpt2.tiktoken --workers 20 2>&1 | tail -1
F="--data_dir gpu_data/pycorpus --model_dim 384 --n_layer 6 --n_head 6 --batch_size 32 --device_batch_size 16
   --num_iterations 60 --val_loss_every 20 --val_tokens 614400 --log_dir $OUT/logs --run_name g
   --checkpoint_dir /root/ckpt_g --checkpoint_freq 20 --resume auto"
torchrun --standalone --nproc_per_node=2 train_gpt.py $F > $OUT/first.txt 2>&1 &
PID=$!
until grep -q "^step:10/60 train_loss" $OUT/logs/g.txt 2>/dev/null; do sleep 1; done
torchrun --standalone --nproc_per_node=2 train_gpt.py $F > $OUT/second.txt 2>&1; echo "second rc=$?"
grep -h "error" $OUT/second.txt | head -2
wait $PID; echo "first rc=$?"
grep -E "val_loss|done:|error" $OUT/first.txt | tail -6
python3 train_gpt.py $F 2>&1 | tail -1; echo "rerun rc=$?"
python3 train_gpt.py --model 1.1B --dry_run | tail -4
ls /root/ckpt_g $OUT/logs
