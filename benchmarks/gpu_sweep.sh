#!/usr/bin/env bash
# One prepared GPU session for DSCLoRA (about 8 minutes wall-clock on one H100, nothing downloaded).
#
#   here:   python benchmarks/prep_gpu_data.py            # -> .carry/gpu (BSD200+T91 packed, weights, pylib)
#   there:  bash benchmarks/gpu_sweep.sh                  # run tool: carry [".carry/gpu"], timeout_s 570
#
# 1. benchmarks/bench_distill_step.py --device cuda       (step cost table, it/s, share per part)
# 2. decode the packed training images once and make their MATLAB-bicubic LR (shared cache)
# 3. SWEEP runs of examples/span_sr/train.py *concurrently* (the step is Python-bound, one process
#    leaves the GPU mostly idle), each stopped by --train.time_limit, validating on 8 images held
#    out of BSD200+T91 and keeping the best; test sets are NOT evaluated there (no Pillow, and the
#    carry holds training images only): evaluate $OUT/runs/*/merged.pth locally with evaluate.py.
# 4. a summary table ($OUT/sweep_summary.md) from each run's metrics.jsonl / results.json.
# Everything lands in $OUT (default /tmp/gpu_sweep): sweep.log, bench_distill_step.md, runs/<name>/.
# Local smoke test on CPU: CARRY=/tmp/small DEV=cpu REPEATS=1 BUDGET=200 EXTRA="--data.patch 16 ..." bash ...
set -u
START=$(date +%s)
BUDGET=${BUDGET:-500}                      # seconds for the whole script (the run tool allows 600)
PY=${PY:-python3}
CARRY=${CARRY:-.carry/gpu}
OUT=${OUT:-/tmp/gpu_sweep}
CACHE=${CACHE:-/tmp/dsclora_cache}
mkdir -p "$OUT/runs" "$CACHE"
[ -d "$CARRY" ] || { echo "carry folder $CARRY missing: run benchmarks/prep_gpu_data.py and carry it"; exit 2; }
CARRY=$(cd "$CARRY" && pwd)
export PYTHONPATH="$PWD:${PYTHONPATH:-}:$CARRY/pylib"   # installed packages win over carried ones
export OMP_NUM_THREADS=2
exec > >(tee -a "$OUT/sweep.log") 2>&1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, numpy, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
$PY -c "
for m in ('PIL', 'yaml', 'tqdm', 'safetensors', 'matplotlib'):
    try:
        mod = __import__(m); print(m, getattr(mod, '__version__', '?'), getattr(mod, '__file__', ''))
    except Exception as e: print(m, 'missing:', e)"
du -sh "$CARRY"/*

echo "== 1. DSCLoRA step cost (left $(left)s)"
timeout 80 $PY benchmarks/bench_distill_step.py --device "${DEV:-cuda}" --repeats "${REPEATS:-20}" | tee "$OUT/bench_distill_step.md"

echo "== 2. data cache (left $(left)s)"
timeout 90 $PY - "$CARRY" "$CACHE" <<'EOF'
import sys, time
from functools import partial
from multiprocessing import Pool
from examples.span_sr.data import ImageSet, list_images
carry, cache = sys.argv[1], sys.argv[2]
refs = list_images([f"{carry}/sr_train/BSD200", f"{carry}/sr_train/T91"])
t0 = time.time()
with Pool(14) as pool:
    pool.map(partial(ImageSet.load, scale=4, lr_mode="cache", cache_dir=cache), [refs[i::14] for i in range(14)])
print(f"{len(refs)} images decoded + MATLAB LR cached in {time.time() - t0:.1f}s")
EOF

echo "== 3. sweep (left $(left)s)"
TL=$(( $(left) - 75 ))                     # train time per run; exports, summary and slack after it
[ "$TL" -lt 60 ] && TL=60
COMMON=(--config examples/span_sr/configs/dsclora_x4.yaml
        --data.train "$CARRY/sr_train/BSD200" "$CARRY/sr_train/T91" --data.cache_dir "$CACHE"
        --data.test none --data.val none --data.workers 2 --model.weights_dir "$CARRY/weights"
        --teacher span_ch28 --model.teacher_ensemble 1 --model.lora configs/dsclora_lora.yaml
        --loss.pixel l1 --teacher_cache.enabled false --train.lr 5e-5 --train.threads 0
        --train.time_limit "$TL" --train.progress false --train.log_every 100 --train.val_every 250
        --train.ckpt_every 2000)
PIDS=()
run() { local name=$1; shift; mkdir -p "$OUT/runs/$name"
        $PY examples/span_sr/train.py "${COMMON[@]}" --out "$OUT/runs/$name" "$@" ${EXTRA:-} > "$OUT/runs/$name/train.log" 2>&1 &
        PIDS+=($!); echo "started $name: $*"; }
# 48x48 LR patches, batch 16: the issue's setting (T91 images under 192 px are skipped, see the log)
P48=(--data.patch 48 --data.batch 16 --train.steps 8000 --train.warmup 200)
# affinity runs: per-tap normalised (aff_norm, default), so the term starts at exactly w_aff
# (the pixel terms start near 0.2*0.02 + 0.8*0.0045 = 0.008)
run out_lr5e-5      "${P48[@]}" --train.lr 5e-5
run teacher_only    "${P48[@]}" --train.lr 5e-5 --loss.w_rec 0 --loss.w_out 1
run aff_p2_w0.002   "${P48[@]}" --train.lr 5e-5 --loss.w_aff 0.002 --loss.p 2
run aff_p2_w0.01    "${P48[@]}" --train.lr 5e-5 --loss.w_aff 0.01 --loss.p 2 --loss.aff_warmup 500
run aff_p1_w0.002   "${P48[@]}" --train.lr 5e-5 --loss.w_aff 0.002 --loss.p 1
run out_p64_b32     --data.patch 64 --data.batch 32 --train.steps 5000 --train.warmup 200 --train.lr 5e-5
wait "${PIDS[@]}"                          # not a bare `wait`: it would also wait for the tee above
echo "== 4. summary (left $(left)s)"
$PY - "$OUT" <<'EOF' | tee "$OUT/sweep_summary.md"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | steps | it/s (median) | val base | val teacher | val student (best) | best step |")
print("|---|---|---|---|---|---|---|")
for run in sorted(p for p in (out / "runs").iterdir() if p.is_dir()):
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
    ref = next((r for r in rows if "val_base" in r), {})
    rates = [r["it_s"] for r in rows if "it_s" in r]
    steps = max((r["step"] for r in rows), default=0)
    res = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    val = next(iter(res.get("y_psnr_db", {}).values()), {})
    print(f"| {run.name} | {steps} | {statistics.median(rates) if rates else 0:.1f} | {ref.get('val_base', float('nan')):.3f} "
          f"| {ref.get('val_teacher', float('nan')):.3f} | {val.get('student', float('nan')):.3f} | {res.get('best_step', '-')} |")
EOF
rm -f "$OUT"/runs/*/checkpoint.pt             # optimizer state: not needed for evaluation
echo "done in $(( $(date +%s) - START ))s; evaluate locally:"
echo "  python examples/span_sr/evaluate.py --weights OUT/runs/<name>/merged.pth --regenerate-lr --data ../shared/data/sr_bench/Set5 ../shared/data/sr_bench/Set14 ../shared/data/sr_bench/B100"
