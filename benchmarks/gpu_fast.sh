#!/usr/bin/env bash
# The GPU checks of the fast SPAN path (the CUDA schedule of fast_span, #23) in one prepared run:
# about 6 minutes on one H200, nothing installed or downloaded (torch, numpy and triton only).
#
#   here:  python benchmarks/bench_span_gpu.py --pack .carry/span_gpu   # Set5/Set14/B100, weights, safetensors
#   there: bash benchmarks/gpu_fast.sh          (run tool: carry [".carry/span_gpu"], timeout_s 480)
#
# 1. the machine; 2. the GPU-marked tests (tests/test_span_sr_fast_cuda.py, tests/test_cuda.py);
# 3. benchmarks/bench_span_gpu.py: NTIRE protocol, batch-16 throughput, physical limit;
# 4. the output bound over Set5/Set14/B100 for every configuration (status 1 if an offered one fails).
# Everything lands in $OUT: gpu_fast.log (all output), bench_span_gpu.json, bound.json.
set -u
START=$(date +%s)
TOTAL=${TOTAL:-450}                         # seconds for the whole script
DATA=${DATA:-.carry/span_gpu}
OUT=${OUT:-/tmp/gpu_fast}
mkdir -p "$OUT"
if [ ! -f "$DATA/bound.npz.xz" ]; then
    echo "gpu_fast.sh: $DATA/bound.npz.xz is missing; run 'python benchmarks/bench_span_gpu.py --pack $DATA' before and carry $DATA"
    exit 2
fi
DATA=$(cd "$DATA" && pwd)
export PYTHONPATH="$PWD:${PYTHONPATH:-}:$DATA/pylib"   # installed packages win over the carried copy
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_fast.log") 2>&1
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c "import sys, torch, numpy, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())"

echo "== 1. GPU tests (left $(left)s)"
timeout 150 python3 -m pytest tests/test_span_sr_fast_cuda.py tests/test_cuda.py -m gpu -q -p no:cacheprovider -o addopts="" -rs 2>&1 | tail -25

echo "== 2. benchmark (left $(left)s)"
timeout 220 python3 benchmarks/bench_span_gpu.py --data "$DATA" --out "$OUT/bench_span_gpu.json"
echo "bench_span_gpu.py exit status $?"

echo "== 3. output bound (left $(left)s)"
timeout $(( $(left) > 40 ? $(left) - 10 : 30 )) python3 benchmarks/bench_span_gpu.py --data "$DATA" --no-timing --bound --out "$OUT/bound.json"
echo "bound exit status $? (0: every offered configuration within 1 level and 0.01 dB)"
echo "== done in $(( $(date +%s) - START ))s"
