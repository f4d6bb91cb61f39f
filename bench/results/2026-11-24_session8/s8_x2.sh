# Session 8, nvidia-h200-x2: 601M DynMuon, 1 GPU vs 2 GPUs at DDP bucket sizes 25 (torch default) / 200 / 1000 MB
B="bench/bench_step.py --models 601M --optimizers dynmuon --steps 3 --warmup 2"
CUDA_VISIBLE_DEVICES=0 python3 $B --json $OUT/one.json 2>&1 | grep -E "^ *601M \||->" | tail -2
for mb in 25 200 1000; do
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 $B --ddp_bucket_mb $mb --json $OUT/two_$mb.json 2>&1 | grep -E "^ *601M \||->" | tail -2 | sed "s/^/bucket $mb: /"
done
