#!/usr/bin/env bash
# GPU validation, for a session that is lent a device machine. From the repo root:
#   bash benchmarks/gpu_check.sh
# 1. installs what the device image lacks from wheels carried in .whl/
#    (fetch them here first with benchmarks/fetch_gpu_wheels.sh, and name .whl in carry),
# 2. builds rankwise (C++ extension against the device's torch),
# 3. checks every Triton kernel on the GPU in bf16 and fp16 against the references
#    (tests/test_gpu_kernels.py and the GPU-marked tests; tolerances stated there),
# 4. runs the GPU benchmark suite.
# Everything goes under $OUT when it is set (the device tool brings it back), else
# under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/_gpu_check}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, rankwise; print('torch', torch.__version__, 'triton', triton.__version__, 'rankwise', rankwise.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -rs tests/test_gpu_kernels.py -m gpu 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m benchmarks.run --suite gpu --out "$OUT/results" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc" | tee -a "$OUT/device.txt"
exit $(( tests_rc || bench_rc ))
