#!/usr/bin/env bash
# The #16 recipe sweep at CPU scale (docs/reproduce_dsclora.md, "The recipe sweep"): one 1,200-step
# run of examples/span_sr/train.py per arm, 32x32 LR patches, batch 16, one thread each, two arms at a
# time on a 2-core CPU. Every arm validates on the 24 images held out in configs/dsclora_x4.yaml and
# keeps its best checkpoint; test sets are not scored here (score the runs afterwards with
#   python examples/span_sr/evaluate.py --weights runs/sweep/<arm>/merged.pth --regenerate-lr \
#       --data ../shared/data/sr_bench/Set5 ../shared/data/sr_bench/Set14 ../shared/data/sr_bench/B100).
# Every lever is set explicitly, so the arms do not depend on the defaults of dsclora_x4.yaml.
#   bash benchmarks/cpu_sweep.sh            # all arms (round 1 about 3 h of 2 cores; round 2 about 80 min of one core
#                                           # on a quiet machine: 4 x 2,400 steps, 9,600 steps, 2 x 1,200 steps)
#   ARMS="tta8_mse_lr5e-4" bash benchmarks/cpu_sweep.sh   # some of them
set -u
OUT=${OUT:-runs/sweep}
JOBS=${JOBS:-2}
mkdir -p "$OUT"
CFG=examples/span_sr/configs/dsclora_x4.yaml
COMMON="--data.patch 32 --data.batch 16 --train.steps 1200 --train.warmup 50 --train.val_every 200
  --train.ckpt_every 400 --train.threads 1 --data.workers 0 --train.progress false --train.log_every 200
  --data.test [] --data.cache_dir $OUT/.cache --model.full_finetune false --data.upcycle_share 0
  --loss.w_rec 0.2 --loss.w_out 0.8 --loss.w_aff 0 --loss.pixel l1 --train.lr 5e-4
  --model.lora configs/dsclora_lora.yaml --data.train ../shared/data/train/sr/BSD200 ../shared/data/train/sr/T91"
ENS="--teacher base --model.teacher_ensemble 8 --teacher_cache.enabled true"
CH28="--teacher span_ch28 --model.teacher_ensemble 1"
CRAFT2400="--teacher ../shared/data/weights/craft_x4.pth --model.teacher_ensemble 1 --teacher_cache.enabled true
  --model.lora configs/dsclora_lora_r8.yaml --loss.pixel mse --train.steps 2400 --train.warmup 100 --train.val_every 400"
declare -A ARM=(
  [ch28_lr5e-5]="$CH28 --teacher_cache.enabled true --train.lr 5e-5"
  [tta8_lr5e-5]="$ENS --train.lr 5e-5"
  [tta8_lr2e-4]="$ENS --train.lr 2e-4"
  [tta8_lr5e-4]="$ENS"
  [craft_lr5e-4]="--teacher ../shared/data/weights/craft_x4.pth --model.teacher_ensemble 1 --teacher_cache.enabled true"
  [ch28live_aff_lr5e-4]="$CH28 --teacher_cache.enabled false --loss.w_aff 0.002"
  [tta8_all620_lr5e-4]="$ENS --data.train ../shared/data/train/sr/BSD200 ../shared/data/train/sr/T91 ../shared/data/train/sr/BSDS500_test ../shared/data/train/sr/SunHays80 ../shared/data/train/sr/General100_half"
  [tta8_up25_lr5e-4]="$ENS --data.upcycle_share 0.25 --data.upcycle_side 128"
  [tta8_up50_lr5e-4]="$ENS --data.upcycle_share 0.5 --data.upcycle_side 128"
  [tta8_steps600_lr5e-4]="$ENS --train.steps 600 --train.warmup 25 --train.val_every 100"
  [tta8_png340_lr5e-4]="$ENS --data.train ../shared/data/train/sr/BSD200 ../shared/data/train/sr/T91 ../shared/data/train/sr/General100_half"
  [tta8_mse_lr5e-4]="$ENS --loss.pixel mse"
  [tta8_r8_lr5e-4]="$ENS --model.lora configs/dsclora_lora_r8.yaml"
  [tta8_r8all_lr5e-4]="$ENS --model.lora configs/dsclora_lora_r8_all.yaml"
  [tta8_full_lr5e-5]="$ENS --train.lr 5e-5 --model.full_finetune true"
  [craft_r8_mse_lr5e-4_2400]="--teacher ../shared/data/weights/craft_x4.pth --model.teacher_ensemble 1 --teacher_cache.enabled true --model.lora configs/dsclora_lora_r8.yaml --loss.pixel mse --train.steps 2400 --train.warmup 100 --train.val_every 400"
  [tta8_r8_mse_lr5e-4_2400]="$ENS --model.lora configs/dsclora_lora_r8.yaml --loss.pixel mse --train.steps 2400 --train.warmup 100 --train.val_every 400"
  # Second round, around the selected recipe (CRAFT, rank 8/16, MSE, 2,400 steps): one lever at a time.
  [craft2400_lr1e-3]="$CRAFT2400 --train.lr 1e-3"
  [craft2400_lr2e-3]="$CRAFT2400 --train.lr 2e-3"
  [craft2400_wrec0]="$CRAFT2400 --loss.w_rec 0 --loss.w_out 1"
  [craft2400_wrec05]="$CRAFT2400 --loss.w_rec 0.5 --loss.w_out 0.5"
  # The JPEG sets (BSDS500_test, SunHays80) as teacher-labelled inputs only (no HR term), against
  # tta8_lr5e-4 (clean HR only) and tta8_all620_lr5e-4 (the JPEGs as HR targets) at the same settings.
  [tta8_jpegteach25_lr5e-4]="$ENS --data.teacher_only ../shared/data/train/sr/BSDS500_test ../shared/data/train/sr/SunHays80 --data.teacher_only_share 0.25"
  [tta8_jpegteach50_lr5e-4]="$ENS --data.teacher_only ../shared/data/train/sr/BSDS500_test ../shared/data/train/sr/SunHays80 --data.teacher_only_share 0.5"
  [craft9600]="$CRAFT2400 --train.steps 9600 --train.warmup 400 --train.val_every 1600 --train.ckpt_every 1600"
)
run_arm() {
  local name=$1 start=$SECONDS
  # shellcheck disable=SC2086
  python examples/span_sr/train.py --config $CFG $COMMON ${ARM[$name]} --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall=$((SECONDS - start))s" | tee -a "$OUT/walltimes.txt"
}
for name in ${ARMS:-${!ARM[@]}}; do
  [ -n "${ARM[$name]+x}" ] || { echo "unknown arm $name; known: ${!ARM[*]}"; exit 2; }
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
  run_arm "$name" &
done
wait
for log in "$OUT"/*.log; do echo "$(basename "$log" .log): $(grep -o 'using the best validation adapter.*' "$log")"; done
