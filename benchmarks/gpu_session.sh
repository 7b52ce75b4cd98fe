#!/usr/bin/env bash
# What issue 7 measures on a GPU. A device call may run 10 minutes, so make two:
#   run(carry=[".whl"], command="bash benchmarks/gpu_session.sh tests train")
#   run(carry=[".whl"], command="bash benchmarks/gpu_session.sh sample")
# after `bash benchmarks/fetch_wheels.sh` here (stock fp16 sampling at batch 1024 × 1000 steps
# alone takes minutes), and a third, `ablation`, if device time is left. Writes to $OUT (or
# ./gpu-results): nvidia-smi, the CUDA-only tests, bench_train (ours vs stock, with a profile, and
# ours without torch.compile beside them), bench_sample (batch 256 and 1024, 1000 steps, with a
# profile) and the sampling ablation (batch 256: ours, compiled without CUDA graphs, eager), as
# text and JSON lines to copy into benchmarks/RESULTS.md. A contender that fails (a compiler error,
# say) is recorded with its error and the others are still measured; each part has a time limit
# (TESTS_SECONDS 240, TRAIN_SECONDS 330, SAMPLE_SECONDS 560 for sample and ablation) so that a part
# that hangs leaves the call's output intact.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
parts=" ${*:-tests train sample} "
train_limit="timeout -k 10 ${TRAIN_SECONDS:-330}" sample_limit="timeout -k 10 ${SAMPLE_SECONDS:-560}"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
# the CUDA-only tests (the rest run in CI on the CPU): ours on the GPU agrees with the CPU and with fp32
[[ "$parts" == *" tests "* ]] && timeout -k 10 "${TESTS_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_pipeline.py::test_cuda_sampling_matches_cpu \
  tests/test_speed.py::test_compiled_bf16_cuda_sampling_agrees_with_fp32 \
  tests/test_speed.py::test_compiled_cuda_training_step_matches_eager \
  tests/test_speed.py::test_default_cuda_run_trains_saves_and_resumes \
  tests/test_timestep_sampling.py::test_sampling_and_recording_do_not_synchronize_with_the_host \
  tests/test_loss_records.py::test_a_step_record_does_not_synchronize_with_the_host 2>&1 | tail -15 | tee "$out/cuda_tests.txt"
[[ "$parts" == *" train "* ]] && $train_limit python3 benchmarks/bench_train.py --device cuda --model ddpm-cifar10-32 --batch_size 128 --profile \
  --variant "eager=--no-compile_unet" --output "$out/bench_train.jsonl" 2>&1 | grep -v Warning | tee "$out/bench_train.txt"
[[ "$parts" == *" sample "* ]] && $sample_limit python3 benchmarks/bench_sample.py --device cuda --model ddpm-cifar10-32 --batch_size 256 1024 \
  --num_inference_steps 1000 --repeats 1 --profile --output "$out/bench_sample.jsonl" 2>&1 | grep -v Warning | tee "$out/bench_sample.txt"
[[ "$parts" == *" ablation "* ]] && $sample_limit python3 benchmarks/bench_sample.py --device cuda --model ddpm-cifar10-32 --batch_size 256 \
  --num_inference_steps 1000 --repeats 1 --variant "no-graphs=--compile_mode default" --variant "eager=--no-compile" \
  --output "$out/bench_sample_ablation.jsonl" 2>&1 | grep -v Warning | tee "$out/bench_sample_ablation.txt"
exit 0
