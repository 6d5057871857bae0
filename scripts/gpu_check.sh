#!/usr/bin/env bash
# Everything a GPU machine has to prove, in one call of under 10 minutes: install (offline, no
# dependencies pulled), the GPU-marked tests (bf16, head_dim 256, 16K/64K, offsets past 2^31),
# the angle-precision check on the compiled rotary kernel and the quick benchmark run.
# Results go to $OUT (default gpu-out/): copy the JSON files into benchmarks/results/, commit.
#
#   GIT_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
commit=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

pip install --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 || { tail "$out/install.log"; exit 1; }
{ nvidia-smi; python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__)"; } > "$out/device.txt" 2>&1

# The GPU-marked tests (CI covers the rest on CPU); -rs lists anything skipped.
timeout 180 python -m pytest -m gpu tests -q -rs -p no:cacheprovider > "$out/tests-gpu.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$out/tests-gpu.txt"

timeout 60 python -m benchmarks.precision --out "$out" > "$out/precision.txt" 2>&1
echo "precision: exit $?" | tee -a "$out/precision.txt"

python -m benchmarks.run --quick --max-minutes 5 --out "$out" --git-commit "$commit" > "$out/bench.txt" 2>&1
echo "benchmarks: exit $?" | tee -a "$out/bench.txt"
ls "$out"
