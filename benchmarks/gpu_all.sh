#!/usr/bin/env bash
# Every GPU check of the project in one prepared run (a lent H100 session has 15 minutes in all).
#
#   here:  python benchmarks/prep_gpu_data.py && python benchmarks/bench_span_forward.py --pack .carry/gpu/span_bench.npz
#   there: bash benchmarks/gpu_all.sh        (run tool: carry [".carry/gpu"], timeout_s 590)
#
# 1. core exactness on CUDA (tests/test_cuda.py), 2. affinity-loss benchmark on CUDA,
# 3. SPAN deploy runtime, NTIRE protocol and faster variants with their Set14 PSNR change,
# 4. the DSCLoRA sweep (benchmarks/gpu_sweep.sh) with whatever time is left.
# Results: $OUT/gpu_all.log and $OUT/gpu_results.tgz (the run tool returns at most 8 files).
set -u
START=$(date +%s)
TOTAL=${TOTAL:-555}
RES=/tmp/gpu_results
mkdir -p "$RES" "${OUT:=/tmp/gpu_out}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_all.log") 2>&1
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
pack() { tar czf "$OUT/gpu_results.tgz" -C "$RES" . 2>/dev/null; }
trap pack EXIT

echo "== 1. CUDA tests (left $(left)s)"
timeout 60 python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider -o addopts="" 2>&1 | tail -8 | tee "$RES/cuda_tests.txt"

echo "== 2. affinity benchmark (left $(left)s)"
timeout 45 python3 benchmarks/bench_affinity.py --device cuda --repeats 5 2>&1 | tee "$RES/bench_affinity_cuda.md"
pack

echo "== 3. SPAN runtime (left $(left)s)"
timeout 110 python3 benchmarks/bench_span_forward.py --device cuda --data .carry/gpu/span_bench.npz \
    --out "$RES/bench_span.json" 2>&1 | tee "$RES/bench_span_cuda.md"
pack

echo "== 4. DSCLoRA sweep (left $(left)s)"
BUDGET=$(( $(left) - 15 )) OUT=/tmp/gpu_sweep CARRY=.carry/gpu bash benchmarks/gpu_sweep.sh
mkdir -p "$RES/sweep"
(cd /tmp/gpu_sweep && find . -name '*.pt' -delete; cp -r . "$RES/sweep/")
echo "== done in $(( $(date +%s) - START ))s"
