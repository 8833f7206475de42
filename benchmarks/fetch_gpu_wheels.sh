#!/usr/bin/env bash
# Run HERE (with network to PyPI) before a device session: downloads the wheels the
# device image lacks (it has torch, triton, transformers, peft) for its Python 3.12
# into .whl/, which .git/info/exclude ignores; name .whl in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in bitsandbytes==0.50.2 datasets==5.2.0 pyarrow dill==0.4.1 multiprocess==0.70.19 xxhash; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
ls -la .whl
