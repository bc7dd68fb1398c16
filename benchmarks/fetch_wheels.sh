#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu.sh installs on a lent GPU machine (Python 3.12
# there, torch/h5py/typer/scipy already present): soundfile, soxr, laion_clap and
# audiobox_aesthetics with their pure-Python needs. wget and progressbar exist only as sdists,
# so their installed files are copied from .venv. .whl/ is git-ignored; carry it with the run.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/extra
for pkg in soundfile soxr cffi pycparser laion-clap==1.1.7 torchlibrosa ftfy wcwidth braceexpand \
           webdataset librosa audioread pooch decorator platformdirs standard-aifc standard-sunau \
           audiobox-aesthetics==0.0.4; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$pkg"
done
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$site/wget.py" .whl/extra/
rm -rf .whl/extra/progressbar && cp -r "$site/progressbar" .whl/extra/
rm -rf .whl/extra/progressbar/__pycache__
du -sh .whl
