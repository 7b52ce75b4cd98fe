#!/usr/bin/env bash
# What issue 7 measures on a GPU. A device call may run 10 minutes, so make two:
#   run(carry=[".whl"], command="bash benchmarks/gpu_session.sh tests train")
#   run(carry=[".whl"], command="bash benchmarks/gpu_session.sh sample")
# after `bash benchmarks/fetch_wheels.sh` here (stock fp16 sampling at batch 1024 × 1000 steps
# alone takes minutes). Writes to $OUT (or ./gpu-results): nvidia-smi,
# the CUDA-only tests, bench_train (ours vs stock, with a profile) and bench_sample (batch 256
# and 1024, 1000 steps, with a profile), as text and JSON lines to copy into benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
parts=" ${*:-tests train sample} "
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
[[ "$parts" == *" tests "* ]] && python3 -m pytest -q -p no:cacheprovider tests/test_speed.py tests/test_pipeline.py tests/test_scheduler.py tests/test_unet.py \
  tests/test_timestep_sampling.py::test_sampling_and_recording_do_not_synchronize_with_the_host \
  tests/test_loss_records.py::test_a_step_record_does_not_synchronize_with_the_host 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
[[ "$parts" == *" train "* ]] && python3 benchmarks/bench_train.py --device cuda --model ddpm-cifar10-32 --batch_size 128 --profile \
  --output "$out/bench_train.jsonl" 2>&1 | grep -v Warning | tee "$out/bench_train.txt"
[[ "$parts" == *" sample "* ]] && python3 benchmarks/bench_sample.py --device cuda --model ddpm-cifar10-32 --batch_size 256 1024 \
  --num_inference_steps 1000 --repeats 1 --profile --output "$out/bench_sample.jsonl" 2>&1 | grep -v Warning | tee "$out/bench_sample.txt"
exit 0
