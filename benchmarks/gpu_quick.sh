#!/usr/bin/env bash
# The GPU checks for device calls inside a 15-minute lease, each stage with its own time limit
# and all of them within BUDGET seconds (default 520):
#   bash benchmarks/gpu_quick.sh [STAGE ...]      (from the repo root, on the device machine; .whl carried)
# Always first (once per machine; a warm machine skips what is done): install the carried wheels,
# build rankwise (ninja, parallel: ~70 s on an H200 host), print the versions. Stages (default: the
# order below, most needed first; the 2026-11-28 session ran the H200 numbers of
# benchmarks/results/nvidia-h200-2026-11-28, so what it could not run comes first):
#   kernels        every test marked gpu: each Triton kernel in bf16/fp16 against float64
#                  (tests/test_gpu_kernels.py, test_gpu_norm_swiglu.py, the NF4, masking and tuning ones)
#   profile        profile_step: where a solo 1B LoRA step's time goes (torch.profiler; ~40 s)
#   lora           bench_lora at 8192 tokens, path=fused / split / auto, no torch.compile (~100 s)
#   train          bench_train: end-to-end 1B LoRA, bf16 and 4-bit, rankwise vs HF + PEFT (+ bnb)
#   sweep_step     bench_sweep_step: the stacked K-arm step vs K solo steps, 1x512 and 4x2048 (~170 s)
#   nf4_loss       bench_nf4, bench_loss (~40 s)
#   suite          the rest of the suite on the GPU, in whatever time is left
# A 15-minute lease holds about two calls: e.g. `kernels profile lora` then, at once (the machine
# stays warm 30 s), `train sweep_step nf4_loss`. The device's copy of the tree has no .git: prefix
# RANKWISE_COMMIT=$(git rev-parse HEAD) (its value typed into the command) so every JSON names its commit.
# Everything lands in $OUT: stages.txt, device.txt and all.tgz (the logs and results/*.json; the
# device tool brings back at most 8 files). A stage that runs out of time is cut off, the next runs.
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
if compgen -G ".whl/*.whl" >/dev/null && [ ! -f /tmp/site/.rankwise-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.rankwise-wheels
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
if ! python3 -c "import rankwise._C, rankwise.kernels" 2>/dev/null; then
  stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
fi
python3 -c "import torch, triton, rankwise; print('torch', torch.__version__, 'triton', triton.__version__, 'rankwise', rankwise.__version__)" 2>&1 | tee -a "$OUT/device.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels profile lora train sweep_step nf4_loss suite)
R="$OUT/results"
for s in "${stages[@]}"; do
  case "$s" in
    kernels) stage gpu_kernels 240 python3 -m pytest -q -rs -m gpu -p no:randomly tests/test_gpu_kernels.py \
               tests/test_gpu_norm_swiglu.py tests/test_nf4.py tests/test_nf4_lora.py tests/test_masking.py \
               tests/test_tuning.py tests/test_together.py tests/test_analysis_cli.py ;;
    profile) stage profile_step 90 python3 -m benchmarks.profile_step --out "$R" ;;
    lora) stage bench_lora 150 python3 -m benchmarks.bench_lora --no-compile --tokens 8192 --out "$R" ;;
    train) stage bench_train 300 python3 -m benchmarks.bench_train --out "$R" ;;
    sweep_step) stage bench_sweep_step 200 python3 -m benchmarks.bench_sweep_step --out "$R" ;;
    nf4_loss) stage bench_nf4_loss 90 python3 -m benchmarks.run --suite gpu --only bench_nf4,bench_loss --out "$R" ;;
    suite) stage suite 600 python3 -m pytest -q -rs --timeout 120 -p no:cacheprovider tests \
             -m "not gpu" --ignore=tests/test_benchmarks.py ;;
    *) echo "unknown stage '$s': expected kernels profile lora train sweep_step nf4_loss suite" >&2; exit 2 ;;
  esac
done
cp /tmp/rankwise-cache/tuning.json "$R/" 2>/dev/null || true
cd "$OUT" && tar czf all.tgz results ./*.log 2>/dev/null; rm -rf results ./*.log
exit 0
