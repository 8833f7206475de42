#!/usr/bin/env bash
# The GPU checks for device calls inside a 15-minute lease, each stage with its own time limit
# and all of them within BUDGET seconds (default 520):
#   bash benchmarks/gpu_quick.sh [STAGE ...]      (from the repo root, on the device machine; .whl carried)
#   bash benchmarks/gpu_quick.sh --fetch-peers    (HERE, with a package index: the peers' wheels, see below)
# Always first (once per machine; a warm machine skips what is done): install the carried wheels,
# build rankwise (ninja, parallel: ~70 s on an H200 host), print the versions. Stages (default: the
# order below, most needed first; the 2026-11-28 session ran the H200 numbers of
# benchmarks/results/nvidia-h200-2026-11-28, so what it could not run comes first):
#   kernels        every test marked gpu: each Triton kernel in bf16/fp16 against float64
#                  (tests/test_gpu_kernels.py, test_gpu_norm_swiglu.py, the NF4, masking and tuning ones)
#   profile        profile_step: where a solo 1B LoRA step's time goes (torch.profiler; ~40 s)
#   lora           bench_lora at 8192 tokens, path=fused / split / auto, no torch.compile (~100 s)
#   train          bench_train (issue 25): end-to-end 1B LoRA at 1x512 and 4x2048, bf16 and 4-bit:
#                  rankwise, rankwise+graph (the step as one CUDA graph) vs HF + PEFT (+ bnb), vs Liger-Kernel, vs
#                  Unsloth; tokens/s, peak memory, GPU-busy fraction (profiler). 20 arm processes,
#                  ~15-25 s each (Unsloth's import is slower): run it alone in one call, e.g.
#                  `BUDGET=570 bash benchmarks/gpu_quick.sh train` with timeout_s 600. Its JSON is
#                  rewritten after every mode and shape, so a cut-off keeps what was measured.
#   train_gc       the same with gradient checkpointing on every side (rankwise+gc, baseline+gc,
#                  liger+gc, unsloth+gc), into results/train_gc/ (a separate run: its own baseline)
#   sweep_step     bench_sweep_step: the stacked K-arm step vs K solo steps, 1x512 and 4x2048 (~170 s)
#   nf4_loss       bench_nf4, bench_loss (~40 s)
#   study          bench_study (issue 28): `rankwise study` (LoRA r = 8..128 together, full SFT) on a random
#                  1B-shape Llama and GSM8K-schema rows: each arm's time and peak memory against the
#                  --plan estimates (~2-3 min, not yet timed on a GPU)
#   suite          the rest of the suite on the GPU, in whatever time is left
# A 15-minute lease holds about two calls: e.g. `kernels profile lora` then, at once (the machine
# stays warm 30 s), `train`. The device's copy of the tree has no .git: prefix
# RANKWISE_COMMIT=$(git rev-parse HEAD) (its value typed into the command) so every JSON names its commit.
# Everything lands in $OUT: stages.txt, device.txt and all.tgz (the logs and results/*.json; the
# device tool brings back at most 8 files). A stage that runs out of time is cut off, the next runs.
#
# Wheels. The device machine has no internet; its image has torch 2.11 (cu130), triton, transformers
# 5.17, peft, accelerate, but no bitsandbytes, Liger-Kernel or Unsloth. So, before anything else:
#   .whl/*.whl        installed with --no-deps --upgrade into /tmp/site (first on PYTHONPATH): what
#                     benchmarks/fetch_gpu_wheels.sh downloads (bitsandbytes, datasets, ...).
#   .whl/peers/*.whl  the peers of bench_train, each installed into /tmp/site ONLY where the device
#                     lacks that distribution (so none shadows the image's own packages).
# Fetch the peers here (Python 3.12 manylinux wheels for the device) with `bash benchmarks/gpu_quick.sh
# --fetch-peers`, which runs exactly:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#     -d .whl/peers liger-kernel==0.8.5 unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao==0.18.0 \
#     trl==1.15.0 cut_cross_entropy==25.1.1 tyro docstring_parser typeguard msgspec einops json5 \
#     structlog sentencepiece lazy_importer protobuf requests certifi urllib3 charset_normalizer idna
# and then rewrites the unsloth wheel without studio/ (its web UI: 86 of the wheel's 88 MB unpacked;
# `import unsloth` never loads it): ~14 MB in all. `pip download unsloth` with its dependencies pulls
# 3.1 GB (torch 2.14.1 and the CUDA 13 libraries): not carried; Unsloth accepts the device's torch
# (<2.15). xformers is left out (PyPI's wheel is built for another torch/CUDA; Unsloth then uses
# PyTorch attention, as the other arms do). The device call carries at most 64 MiB of ignored paths:
# for train/train_gc carry `.whl/peers` and the bitsandbytes wheel by name (~58 MB together), not all
# of .whl. .gitignore does not list .whl/: fetch_gpu_wheels.sh and --fetch-peers add /.whl/ to
# .git/info/exclude; never commit wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
missing_wheels() {  # the wheels among "$@" whose distribution python3 cannot find
  python3 - "$@" <<'EOF'
import importlib.metadata as md, os, re, sys
for w in sys.argv[1:]:
    name = re.sub(r"[-_.]+", "-", os.path.basename(w).split("-")[0]).lower()
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
EOF
}
fetch_peers() {  # HERE, with a package index: the peers' wheels for the device into $WHEEL_DIR
  local dest="${WHEEL_DIR:-.whl/peers}"
  if [ -z "${WHEEL_DIR:-}" ] && [ -d .git ]; then
    mkdir -p .git/info && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
  fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" liger-kernel==0.8.5 unsloth==2026.10.9 unsloth_zoo==2026.10.9 torchao==0.18.0 \
    trl==1.15.0 cut_cross_entropy==25.1.1 tyro docstring_parser typeguard msgspec einops json5 \
    structlog sentencepiece lazy_importer protobuf requests certifi urllib3 charset_normalizer idna || return 1
  python3 - "$dest"/unsloth-*-py3-none-any.whl <<'EOF'
import os, sys, zipfile  # drop studio/ (Unsloth's web UI) from the wheel, and its RECORD lines
for src in sys.argv[1:]:
    tmp, n = src + ".tmp", 0
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for item in zi.infolist():
            if item.filename.startswith("studio/"):
                n += 1
                continue
            data = zi.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if not l.startswith(b"studio/"))
            zo.writestr(item, data)
    os.replace(tmp, src)
    print(f"{os.path.basename(src)}: {n} studio/ files dropped, {os.path.getsize(src) / 2**20:.1f} MiB")
EOF
  du -sh "$dest"
}
if [ "${1:-}" = "--fetch-peers" ]; then fetch_peers; exit $?; fi
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
if compgen -G ".whl/peers/*.whl" >/dev/null && [ ! -f /tmp/site/.rankwise-peers ]; then
  mapfile -t missing < <(PYTHONPATH=/tmp/site:${PYTHONPATH:-} missing_wheels .whl/peers/*.whl)
  echo "peer wheels: installing the ${#missing[@]} the image lacks: ${missing[*]##*/}"
  if (( ${#missing[@]} == 0 )) || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
       --target /tmp/site "${missing[@]}"; then
    touch /tmp/site/.rankwise-peers
  fi
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
if ! python3 -c "import rankwise._C, rankwise.kernels" 2>/dev/null; then
  stage build 240 python3 -m pip install --no-build-isolation --no-deps -e .
fi
python3 -c "import torch, triton, rankwise; print('torch', torch.__version__, 'triton', triton.__version__, 'rankwise', rankwise.__version__)" 2>&1 | tee -a "$OUT/device.txt"
python3 -c "import importlib.metadata as m
for d in ('transformers', 'peft', 'bitsandbytes', 'liger-kernel', 'unsloth', 'unsloth_zoo'):
    try: print(d, m.version(d))
    except m.PackageNotFoundError: print(d, 'not installed')" 2>&1 | tee -a "$OUT/device.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels profile lora train train_gc sweep_step nf4_loss study suite)
R="$OUT/results"
for s in "${stages[@]}"; do
  case "$s" in
    kernels) stage gpu_kernels 240 python3 -m pytest -q -rs -m gpu -p no:randomly tests/test_gpu_kernels.py \
               tests/test_gpu_norm_swiglu.py tests/test_nf4.py tests/test_nf4_lora.py tests/test_masking.py \
               tests/test_tuning.py tests/test_together.py tests/test_analysis_cli.py tests/test_graphs.py ;;
    profile) stage profile_step 90 python3 -m benchmarks.profile_step --out "$R" ;;
    lora) stage bench_lora 150 python3 -m benchmarks.bench_lora --no-compile --tokens 8192 --out "$R" ;;
    train) stage bench_train 480 python3 -m benchmarks.bench_train --out "$R" --steps 6 --profile-steps 2 \
             --arm-timeout 240 --shapes 1x512,4x2048 --arms rankwise,rankwise+graph,baseline,liger,unsloth ;;
    train_gc) stage bench_train_gc 400 python3 -m benchmarks.bench_train --out "$R/train_gc" --steps 6 \
                --profile-steps 2 --arm-timeout 240 --shapes 1x512,4x2048 \
                --arms rankwise+gc,baseline+gc,liger+gc,unsloth+gc ;;
    sweep_step) stage bench_sweep_step 200 python3 -m benchmarks.bench_sweep_step --out "$R" ;;
    nf4_loss) stage bench_nf4_loss 90 python3 -m benchmarks.run --suite gpu --only bench_nf4,bench_loss --out "$R" ;;
    study) stage bench_study 240 python3 -m benchmarks.bench_study --out "$R" ;;
    suite) stage suite 600 python3 -m pytest -q -rs --timeout 120 -p no:cacheprovider tests \
             -m "not gpu" --ignore=tests/test_benchmarks.py ;;
    *) echo "unknown stage '$s': expected kernels profile lora train train_gc sweep_step nf4_loss study suite" >&2
       exit 2 ;;
  esac
done
cp /tmp/rankwise-cache/tuning.json "$R/" 2>/dev/null || true
cd "$OUT" && tar czf all.tgz results ./*.log 2>/dev/null; rm -rf results ./*.log
exit 0
