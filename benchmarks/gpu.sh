#!/usr/bin/env bash
# Run on a lent GPU machine (device tool): install the carried wheels (.whl, see
# docs/benchmarks.md), run the CUDA tests, then the benchmark. Prints everything; the JSON and
# logs land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site:$PWD/.whl/extra"
nvidia-smi -L
python3 -c "import torch, numpy, h5py; print('torch', torch.__version__, 'numpy', numpy.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_train.py tests/test_resume.py \
    tests/test_losses.py tests/test_backbones.py tests/test_extract.py 2>&1 | tee "$OUT/tests.log" | tail -25
python3 benchmarks/bench.py --device cuda --full-extract --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
python3 benchmarks/profile_extract.py --device cuda 2>&1 | tee "$OUT/profile.log"
