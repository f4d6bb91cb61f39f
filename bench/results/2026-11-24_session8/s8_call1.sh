# Session 8 call 1: GPU kernel tests after this session's test changes; SIGTERM + resume of a real 127M run.
set -x
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pip install -q --no-index --find-links gpu_data/wheels pytest 2>&1 | tail -1
python3 -m pytest -q -p no:cacheprovider tests/test_ns_triton.py tests/test_model_kernels.py 2>&1 | tail -3
F="--data_dir gpu_data/prose --val_tokens 491520 --model 127M --num_iterations 20 --val_loss_every 10"
python3 train_gpt.py $F --log_dir $OUT/logs --run_name whole 2>&1 | grep -E "val_loss|peak|error" | tail -5
python3 train_gpt.py $F --log_dir $OUT/logs --run_name sig --checkpoint_dir /tmp/ckpt --resume auto > $OUT/sig1.out 2>&1 &
PID=$!
until grep -q "^step:8/20 train_loss" $OUT/logs/sig.txt 2>/dev/null; do sleep 0.5; done
kill -TERM $PID; wait $PID; echo "first attempt rc=$?"
ls -la /tmp/ckpt
python3 train_gpt.py $F --log_dir $OUT/logs --run_name sig --checkpoint_dir /tmp/ckpt --resume auto 2>&1 | grep -E "resumed|val_loss|peak|error" | tail -6
grep -E "val_loss|stopped|resumed" $OUT/logs/sig.txt
