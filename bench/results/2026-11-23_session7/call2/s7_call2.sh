set -x
nvidia-smi --query-gpu=name --format=csv,noheader
python3 train_gpt.py --data_dir gpu_data/prose --val_tokens 491520 --model 127M --num_iterations 8 --val_loss_every 4 --log_dir $OUT/logs 2>&1 | grep -v "^\s*$" | tail -15
NPROC=1 DATA_ROOT=$OUT/dr timeout 120 ./run.sh 2>&1 | tail -5; echo "run.sh rc=$?"
NPROC=1 DEVICE_BATCH_SIZE=48 DATA_ROOT=$OUT/dr2 ./run.sh 2>&1 | tail -3; ls $OUT
