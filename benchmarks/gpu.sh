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
python3 -m pytest -q -p no:cacheprovider tests/train/test_gpu.py tests/train/test_train.py tests/train/test_resume.py \
    tests/train/test_losses.py tests/extract/test_backbones.py tests/extract/test_extract.py 2>&1 | tee "$OUT/tests.log" | tail -25
python3 benchmarks/bench.py --device cuda --full-extract --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
# issue 22: the feeding process with a zero-cost model on this machine's CPU and workers, and
# where it spends its time with the real models (CLAP and Aesthetics, fp32 and bf16 end to end
# against the forward alone are in the bench's extract section above)
python3 benchmarks/bench.py --device cuda --only host-ceiling --json "$OUT/host-ceiling.json" \
    2>&1 | tee "$OUT/host-ceiling.log"
for bb in clap-music aesthetics; do
    python3 benchmarks/profile_extract.py --device cuda --backbone "$bb" 2>&1 | tee "$OUT/profile-$bb.log"
done
