#!/usr/bin/env bash
# GPU validation, for a session that is lent a device machine. From the repo root:
#   bash benchmarks/gpu_check.sh [STAGE ...]        (no stage: tests, then every benchmark)
# Stages:
#   tests              every test marked gpu (each Triton kernel on the GPU in bf16 and fp16
#                      against the references, tolerances stated in each file), then the whole
#                      suite on the GPU (tests that pick CUDA when it is there)
#   bench:A,B,...      the named benchmark scripts of the GPU suite (benchmarks/run.py SCRIPTS)
#   bench              every benchmark script
# Always first, and only once per machine: install what the device image lacks from wheels
# carried in .whl/ (fetch them here with benchmarks/fetch_gpu_wheels.sh, name .whl in carry),
# and build rankwise (the C++ extension against the device's torch).
#
# For a 15-minute lease use benchmarks/gpu_quick.sh (stages with time limits, one archive back).
# One device call may run 10 minutes, so split this one, e.g.:
#   1. bash benchmarks/gpu_check.sh tests
#   2. bash benchmarks/gpu_check.sh bench:bench_lora,bench_nf4,bench_loss
#   3. bash benchmarks/gpu_check.sh bench:bench_train
#   4. bash benchmarks/gpu_check.sh bench:bench_masking,bench_sweep
# then, here, copy every call's $OUT/results/*.json into benchmarks/results/<device>-<date>/,
# run `python -m benchmarks.run --summarize benchmarks/results/<device>-<date>` and
# `python -m benchmarks.readme_table`, and commit.
# Everything goes under $OUT when it is set (the device tool brings it back), else under
# benchmarks/results/_gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/_gpu_check}"
mkdir -p "$OUT/results"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench)

if compgen -G ".whl/*.whl" >/dev/null; then
  if [ ! -f /tmp/site/.rankwise-wheels ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && touch /tmp/site/.rankwise-wheels
  fi
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
if ! python3 -c "import rankwise._C, rankwise.kernels" 2>/dev/null; then
  python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
fi
python3 -c "import torch, triton, rankwise; print('torch', torch.__version__, 'triton', triton.__version__, 'rankwise', rankwise.__version__)" | tee -a "$OUT/device.txt"

rc=0
for stage in "${stages[@]}"; do
  case "$stage" in
    tests)
      python3 -m pytest -q -rs -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log"
      r=${PIPESTATUS[0]}; rc=$(( rc || r ))
      python3 -m pytest -q -x -m "not gpu" tests 2>&1 | tee "$OUT/tests.log"
      r=${PIPESTATUS[0]}; rc=$(( rc || r ))
      echo "tests: gpu kernels and suite rc=$rc" | tee -a "$OUT/device.txt" ;;
    bench)
      python3 -m benchmarks.run --suite gpu --out "$OUT/results" 2>&1 | tee "$OUT/bench.log"
      r=${PIPESTATUS[0]}; rc=$(( rc || r )); echo "bench rc=$r" | tee -a "$OUT/device.txt" ;;
    bench:*)
      names="${stage#bench:}"
      python3 -m benchmarks.run --suite gpu --only "$names" --out "$OUT/results" 2>&1 | tee "$OUT/bench-${names//,/-}.log"
      r=${PIPESTATUS[0]}; rc=$(( rc || r )); echo "bench $names rc=$r" | tee -a "$OUT/device.txt" ;;
    *)
      echo "unknown stage '$stage': expected tests, bench or bench:NAME,..." >&2; exit 2 ;;
  esac
done
exit $rc
