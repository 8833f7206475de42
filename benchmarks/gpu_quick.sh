#!/usr/bin/env bash
# The GPU checks for one device call inside a 15-minute lease, most important first,
# each stage with its own time limit and all of them within BUDGET seconds (default 520):
#   bash benchmarks/gpu_quick.sh          (from the repo root, on the device machine; .whl carried)
# 1. install the carried wheels, build rankwise (ninja, parallel), print the versions
# 2. every Triton kernel in bf16/fp16 against float64 (tests/test_gpu_kernels.py)
# 3. bench_sweep_step: the stacked K-arm step against K solo steps, 1B Llama shape, 1x512 and 4x2048
# 3b. profile_step: where a solo 1B step's time goes (torch.profiler, CPU and CUDA)
# 4. bench_lora at 8192 tokens with path=fused / split / auto (no torch.compile baseline: minutes)
# 5. bench_nf4, bench_loss
# 6. the rest of the suite on the GPU, in whatever time is left
# Everything lands in $OUT (stages.txt, device.txt, all.tgz with the logs and results/*.json); a stage that runs out of time is cut off
# and the next one still runs. See gpu_check.sh for the long form.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RANKWISE_NINJA=1 MAX_JOBS=16 RANKWISE_CACHE=/tmp/rankwise-cache
OUT="${OUT:-benchmarks/results/_gpu_quick}"
BUDGET="${BUDGET:-520}"
mkdir -p "$OUT/results"
start=$SECONDS
left() { echo $(( BUDGET - (SECONDS - start) )); }
stage() {  # stage NAME SECONDS CMD...: run CMD with min(SECONDS, what is left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local l; l=$(left); (( l < limit )) && limit=$l
  if (( limit < 10 )); then echo "[$name] skipped: no time left" | tee -a "$OUT/stages.txt"; return; fi
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[$name] rc=$rc in $(( SECONDS - t0 )) s (limit $limit s)" | tee -a "$OUT/stages.txt"
  tail -5 "$OUT/$name.log"
}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
python3 -c "import torch, triton, rankwise; print('torch', torch.__version__, 'triton', triton.__version__, 'rankwise', rankwise.__version__)" 2>&1 | tee -a "$OUT/device.txt"
stage gpu_kernels 150 python3 -m pytest -q -rs tests/test_gpu_kernels.py -m gpu
stage bench_sweep_step 170 python3 -m benchmarks.bench_sweep_step --out "$OUT/results"
stage profile_step 60 python3 -m benchmarks.profile_step --out "$OUT/results"
stage bench_lora 120 python3 -m benchmarks.bench_lora --no-compile --tokens 8192 --out "$OUT/results"
stage bench_nf4_loss 90 python3 -m benchmarks.run --suite gpu --only bench_nf4,bench_loss --out "$OUT/results"
stage suite 600 python3 -m pytest -q -rs --timeout 120 -p no:cacheprovider tests --ignore=tests/test_gpu_kernels.py \
  --ignore=tests/test_benchmarks.py
cp /tmp/rankwise-cache/tuning.json "$OUT/results/" 2>/dev/null || true
# the device tool brings back at most 8 files: stages.txt, device.txt and one archive of the rest
cd "$OUT" && tar czf all.tgz results ./*.log && rm -rf results ./*.log
exit 0
