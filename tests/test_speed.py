"""Fast paths are options of the same code: they compute the same losses, updates and images."""

import logging
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import PartialState
from conftest import reset_accelerate
from PIL import Image
from safetensors.torch import load_file

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet, sampling, speed
from ddpm_pipeline.data import IndexDataset, TrainingImages, bundled_dataset, load_image_dataset, stack_images
from ddpm_pipeline.evaluation import EvaluationConfig
from ddpm_pipeline.images import ImagePreprocessor, levels_to_model_range
from ddpm_pipeline.losses import diffusion_loss
from ddpm_pipeline.sampling import sampling_pipeline
from ddpm_pipeline.speed import (
    auto_flag,
    build_adamw,
    compile_unavailable_reason,
    default_num_workers,
    has_native_bf16,
    is_channels_last,
    is_compiled,
    needs_full_precision,
    resolve_channels_last,
    resolve_compile,
    resolve_fused_adam,
    resolve_mixed_precision,
    resolve_sampling_dtype,
    strict_float32,
)
from ddpm_pipeline.training import Trainer, main
from ddpm_pipeline.training_config import TrainingConfig
from ddpm_pipeline.training_data import TrainingData, device_resident_images

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "3", "--num_grid_images", "4",
        "--report_to", "none", "--train_batch_size", "8", "--lr_warmup_steps", "2", "--learning_rate", "2e-3",
        "--save_images_steps", "none"]  # fmt: skip
PLAIN = ["--no-channels_last", "--no-fused_adam", "--no-data_on_device", "--no-compile_unet", "--mixed_precision", "no"]
FAST_CPU = ["--channels_last", "--fused_adam", "--data_on_device", "--no-compile_unet", "--mixed_precision", "no"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



def test_auto_policy_on_cpu_and_gpu(monkeypatch):
    assert auto_flag(None, "cpu") is False and auto_flag(None, "cuda") is True
    assert auto_flag(False, "cuda") is False and auto_flag(True, "cpu") is True
    # NHWC: on a GPU, and on the CPU with torch.compile (eager NHWC GroupNorm is slow there)
    assert [resolve_channels_last(None, "cpu", compiled) for compiled in (False, True)] == [False, True]
    assert resolve_channels_last(None, "cuda", False) is True and resolve_channels_last(False, "cpu", True) is False
    # fused AdamW: torch has the kernel for CUDA and for the CPU, so auto is on for both; elsewhere off
    assert [resolve_fused_adam(None, device) for device in ("cpu", "cuda", "mps")] == [True, True, False]
    assert resolve_fused_adam(False, "cpu") is False and resolve_fused_adam(True, "mps") is True
    assert resolve_mixed_precision("auto", "cpu", "epsilon") == "no"
    assert resolve_mixed_precision(None, "cpu", "epsilon") is None  # Accelerate's config decides
    capability = {"major": 9}  # an H100
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=capability["major"]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # as on a T4 too
    assert resolve_mixed_precision("auto", "cuda", "epsilon") == "bf16"
    assert resolve_mixed_precision("auto", "cuda", "x0") == "bf16"
    assert resolve_mixed_precision("auto", "cuda", "mu") == "no"  # μ needs strict fp32
    assert resolve_sampling_dtype("auto", "cuda", "epsilon") == torch.bfloat16
    assert resolve_sampling_dtype(None, "cuda", "mu") == torch.float32
    assert resolve_sampling_dtype("auto", "cpu", "epsilon") == torch.float32
    assert resolve_sampling_dtype("float16", "cuda", "epsilon") == torch.float16
    assert needs_full_precision("mu") and not needs_full_precision("sample")
    capability["major"] = 7  # a T4 or V100: bfloat16 only emulated, float16 on the tensor cores
    assert resolve_mixed_precision("auto", "cuda:0", "epsilon") == "fp16" and not has_native_bf16("cuda")
    assert resolve_sampling_dtype("auto", "cuda", "sample") == torch.float16
    assert resolve_mixed_precision("auto", "cuda", "mu") == "no"
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm GPUs all compute bfloat16
    assert resolve_mixed_precision("auto", "cuda", "epsilon") == "bf16"
    with pytest.warns(UserWarning, match="μ target"):
        assert resolve_mixed_precision("bf16", "cuda", "mu") == "bf16"
    with pytest.warns(UserWarning, match="μ model"):
        resolve_sampling_dtype(torch.bfloat16, "cuda", "mu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_mixed_precision("bf16", "cuda", "epsilon")
    with pytest.raises(ValueError, match="floating torch dtype"):
        resolve_sampling_dtype("int8", "cpu", "epsilon")
    assert default_num_workers("cpu", 1, data_on_device=False) == 0
    assert default_num_workers("cuda", 1, data_on_device=True) == 0


def test_accelerate_launch_s_half_precision_is_honored_under_auto(monkeypatch):
    """``accelerate launch --mixed_precision fp16|bf16`` reaches the script only as an environment
    variable; with ``--mixed_precision auto`` it decides. Its ``no`` is also its default, so auto keeps
    deciding then, and the script's own explicit choice always wins."""
    assert resolve_mixed_precision("auto", "cpu", "epsilon", launcher="bf16") == "bf16"
    assert resolve_mixed_precision("auto", "cpu", "epsilon", launcher="no") == "no"
    assert resolve_mixed_precision("no", "cpu", "epsilon", launcher="bf16") == "no"
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=9))
    assert resolve_mixed_precision("auto", "cuda", "epsilon", launcher="fp16") == "fp16"  # not auto's bf16
    assert resolve_mixed_precision("auto", "cuda", "epsilon", launcher="no") == "bf16"
    assert resolve_mixed_precision("auto", "cuda", "epsilon", launcher="fp8") == "bf16"  # not one of ours
    with pytest.warns(UserWarning, match="μ target"):  # asked for at launch: honored, with the warning
        assert resolve_mixed_precision("auto", "cuda", "mu", launcher="bf16") == "bf16"


def fake_cpu(monkeypatch, machine="x86_64", amx=False, avx512_bf16=False, amx_fp16=False):
    """Pretend to run on a CPU with these bfloat16/float16 instructions (torch's own probes)."""
    monkeypatch.setattr(speed.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)


def test_a_cpu_s_bfloat16_instructions_are_read_from_torch_s_probes(monkeypatch):
    fake_cpu(monkeypatch, amx=True, avx512_bf16=True)
    assert speed.cpu_bf16_instructions() == "AMX" and has_native_bf16("cpu")
    fake_cpu(monkeypatch, avx512_bf16=True)
    assert speed.cpu_bf16_instructions() == "AVX512-BF16" and has_native_bf16("cpu")
    fake_cpu(monkeypatch)
    assert speed.cpu_bf16_instructions() == "" and not has_native_bf16("cpu")
    fake_cpu(monkeypatch, machine="aarch64", avx512_bf16=True)  # torch cannot tell there
    assert speed.cpu_bf16_instructions() is None and not has_native_bf16("cpu")
    fake_cpu(monkeypatch, avx512_bf16=True)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe
    assert speed.cpu_bf16_instructions() is None
    assert resolve_mixed_precision("auto", "cpu", "epsilon") == "no"  # auto stays float32 whatever the CPU


def test_cpu_precision_advice_names_the_faster_option_and_warns_of_emulated_half_precision(monkeypatch):
    advice = speed.cpu_precision_advice
    fake_cpu(monkeypatch, avx512_bf16=True)
    level, message = advice(torch.float32, True, "cpu", "epsilon", "--mixed_precision bf16")
    assert level == logging.INFO
    assert message.startswith("this CPU computes bfloat16 in hardware (AVX512-BF16): --mixed_precision bf16 is faster here")
    assert advice(torch.float32, False, "cpu", "epsilon", "x") is None  # float32 asked for: nothing to say
    assert advice(torch.float32, True, "cpu", "mu", "x") is None  # μ needs float32
    assert advice(torch.bfloat16, False, "cpu", "epsilon", "x") is None  # bf16 where it is fast
    level, message = advice(torch.float16, False, "cpu", "epsilon", "x")
    assert level == logging.WARNING and "no AMX-FP16, so float16 is likely emulated" in message
    fake_cpu(monkeypatch, avx512_bf16=True, amx_fp16=True)
    assert advice(torch.float16, False, "cpu", "epsilon", "x") is None
    fake_cpu(monkeypatch)
    assert advice(torch.float32, True, "cpu", "epsilon", "x") is None
    level, message = advice(torch.bfloat16, False, "cpu", "x0", "x")
    assert level == logging.WARNING and "no bfloat16 instructions (AVX512-BF16 or AMX), so bfloat16 is emulated" in message
    fake_cpu(monkeypatch, machine="aarch64")  # unknown: no claim either way
    assert advice(torch.bfloat16, False, "cpu", "epsilon", "x") is None
    assert advice(torch.float32, True, "cpu", "epsilon", "x") is None
    assert advice(torch.float32, True, "cuda", "epsilon", "x") is None  # GPUs: auto decides


def test_fp16_on_the_cpu_is_refused_or_dropped_as_accelerate_ignores_it(tmp_path):
    """Accelerate neither autocasts nor scales the loss for fp16 on the CPU: a run asking for it
    would train in float32 and call itself fp16."""
    assert not speed.accelerate_autocasts_fp16("cpu") and speed.accelerate_autocasts_fp16("cuda")
    with pytest.raises(ValueError, match=r"fp16 does nothing on the CPU.*--mixed_precision no, or bf16"):
        resolve_mixed_precision("fp16", "cpu", "epsilon")
    with pytest.warns(UserWarning, match="accelerate launch's mixed_precision fp16 does nothing on the CPU"):
        assert resolve_mixed_precision("auto", "cpu", "epsilon", launcher="fp16") == "no"
    with pytest.raises(ValueError, match="fp16 does nothing on the CPU"):
        Trainer(TrainingConfig.from_args([*TINY, "--mixed_precision", "fp16", "--output_dir", str(tmp_path)]))


def test_a_cpu_run_with_bfloat16_instructions_is_told_of_the_faster_option(tmp_path, monkeypatch, caplog):
    fake_cpu(monkeypatch, avx512_bf16=True)
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        Trainer(TrainingConfig.from_args([*TINY, "--output_dir", str(tmp_path / "auto")]))
    assert "--mixed_precision bf16 is faster here" in caplog.text
    caplog.clear()
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        Trainer(TrainingConfig.from_args([*TINY, "--mixed_precision", "no", "--output_dir", str(tmp_path / "no")]))
    assert "faster here" not in caplog.text
    fake_cpu(monkeypatch)
    reset_accelerate()
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        Trainer(TrainingConfig.from_args([*TINY, "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "bf16")]))
    assert "so bfloat16 is emulated" in caplog.text


def test_compile_is_auto_only_where_triton_can_compile_and_an_explicit_request_is_checked(monkeypatch, caplog):
    """No GPU needed: the policy is asked about a "cuda" device with Triton's verdict stubbed."""
    monkeypatch.setattr(speed, "compile_unavailable_reason", lambda device: None)
    assert resolve_compile(None, "cuda", "--no-compile_unet") is True
    assert resolve_compile(None, "cpu", "--no-compile_unet") is False  # auto is off on the CPU
    assert resolve_compile(True, "cpu", "--no-compile_unet") is True
    missing = "Triton, which torch.compile needs on CUDA, is not installed (pip install triton)"
    monkeypatch.setattr(speed, "compile_unavailable_reason", lambda device: missing if torch.device(device).type == "cuda" else None)
    with caplog.at_level("WARNING", logger="ddpm_pipeline.speed"):
        assert resolve_compile(None, "cuda", "--no-compile_unet") is False  # auto: eager, and says why
    assert "torch.compile stays off: Triton" in caplog.text
    assert resolve_compile(False, "cuda", "--no-compile_unet") is False
    with pytest.raises(ValueError, match=r"not installed \(pip install triton\).*\(--no-compile_unet\)"):
        resolve_compile(True, "cuda", "--no-compile_unet")
    assert resolve_compile(True, "cpu", "--no-compile_unet") is True


def test_compile_unavailable_reason_names_a_missing_or_unsupported_triton(monkeypatch):
    import importlib.util

    import torch.utils._triton

    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert compile_unavailable_reason("cuda") is None
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "triton" else real_find_spec(name, *rest))
    assert compile_unavailable_reason("cuda") == (
        "Triton does not support this GPU (Tesla P100, compute capability 6.0; torch.compile needs 7.0 or newer)"
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "triton" else real_find_spec(name, *rest))
    assert "is not installed (pip install triton)" in compile_unavailable_reason("cuda")


def test_compiling_on_the_cpu_trains_channels_last_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.setattr("ddpm_pipeline.training.compile_module", lambda module, mode=None: module)  # the policy, not Inductor
    compiled = Trainer(TrainingConfig.from_args([*TINY, "--compile_unet", "--output_dir", str(tmp_path / "compiled")]))
    assert compiled.channels_last and "channels_last, torch.compile (default)" in compiled.speed_settings()
    reset_accelerate()
    nchw = Trainer(TrainingConfig.from_args([*TINY, "--compile_unet", "--no-channels_last", "--output_dir", str(tmp_path / "nchw")]))
    assert not nchw.channels_last
    reset_accelerate()
    assert not Trainer(TrainingConfig.from_args([*TINY, "--output_dir", str(tmp_path / "eager")])).channels_last


def test_compile_on_the_cpu_needs_the_cpp_compiler_inductor_builds_with(monkeypatch):
    """Inductor's CPU kernels are C++: without the compiler it would use ($CXX, else g++, clang++ on
    macOS, cl on Windows) on the PATH, auto stays eager and an explicit request is refused up front."""
    monkeypatch.setenv("CXX", "/opt/gcc-13/bin/g++ -fno-plt")
    found = {"/opt/gcc-13/bin/g++"}
    monkeypatch.setattr(speed.shutil, "which", lambda name: name if name in found else None)
    assert compile_unavailable_reason("cpu") is None  # $CXX with flags: its program is looked up
    found.clear()
    reason = compile_unavailable_reason("cpu")
    assert reason.startswith("Inductor, torch.compile's backend, builds C++ on the CPU and finds no compiler '/opt/gcc-13/bin/g++ -fno-plt'")
    assert "CXX" in reason
    with pytest.raises(ValueError, match=r"finds no compiler .*Run without compiling \(--no-compile_unet\)"):
        resolve_compile(True, "cpu", "--no-compile_unet")
    assert resolve_compile(None, "cpu", "--no-compile_unet") is False
    monkeypatch.delenv("CXX")
    assert [speed.inductor_cpp_compiler(system) for system in ("linux", "darwin", "win32")] == ["g++", "clang++", "cl"]
    found.add(speed.inductor_cpp_compiler())  # this system's default
    assert compile_unavailable_reason("cpu") is None


def _failing_compiler(graph, example_inputs):
    """A torch.compile backend that fails as Inductor does where it cannot build its kernels."""
    raise RuntimeError("Cannot find a working triton installation")


def test_a_failing_torch_compile_stops_training_with_the_fix(tmp_path, monkeypatch):
    """The real Dynamo error (BackendCompilerFailed, from tracing the UNet) becomes one that names
    the way on without compiling; the original stays attached as its cause."""
    from torch._dynamo.exc import TorchDynamoException

    monkeypatch.setattr("ddpm_pipeline.training.compile_module", lambda module, mode=None: module.compile(backend=_failing_compiler))
    options = [*TINY, *PLAIN[:-3], "--compile_unet", "--mixed_precision", "no", "--max_train_steps", "2"]
    with pytest.raises(RuntimeError, match=r"torch.compile failed on the UNet \(BackendCompilerFailed: .*Cannot find a working "
                                           r"triton installation\).*train again with --no-compile_unet \(and --resume_from_checkpoint latest\)") as caught:  # fmt: skip
        main([*options, "--output_dir", str(tmp_path / "run")])
    assert isinstance(caught.value.__cause__, TorchDynamoException)


def test_a_failing_torch_compile_stops_sampling_with_the_fix():
    pipeline = tiny_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.compile(backend=_failing_compiler)
    with pytest.raises(RuntimeError, match=r"torch.compile failed on the UNet.*enable_fast_sampling\(compile=False\)"):
        pipeline(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_strict_float32_turns_tf32_off_for_a_block_and_restores_it():
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    saved = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with strict_float32("cuda"):  # the flags are process-wide; no GPU is needed to set them
            assert flags() == (False, False)
        assert flags() == (True, True)
        with pytest.raises(RuntimeError), strict_float32("cuda"):
            raise RuntimeError("restored on errors too")
        assert flags() == (True, True)
        with strict_float32("cpu"):
            assert flags() == (True, True)  # nothing to do on the CPU
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_images_stacked_by_several_threads_are_those_of_one(tmp_path):
    """Reading the data set onto the device with threads changes nothing: each image lands at its
    index, and a bad file is replaced by the next readable image, as one thread does."""
    rng = np.random.default_rng(0)
    for index in range(10):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{index}.jpg")
    (tmp_path / "5.jpg").write_bytes(b"not a jpeg")
    dataset = load_image_dataset(train_data_dir=tmp_path)
    one, many = (TrainingImages(dataset, "image", ImagePreprocessor(16, 3)) for _ in range(2))
    alone = stack_images(one, "cpu", batch_size=4, progress=False, threads=1)
    assert torch.equal(stack_images(many, "cpu", batch_size=4, progress=False, threads=4), alone)
    assert len(one.skipped) == len(many.skipped) == 1 and one.skipped == many.skipped
    # kept as 8-bit levels, which give back the preprocessed images bit for bit (resized JPEGs included)
    assert alone.dtype == torch.uint8 and all(torch.equal(levels_to_model_range(alone[i]), one[i]) for i in range(10))


def test_8_bit_levels_and_the_networks_inputs_convert_exactly():
    levels = torch.arange(256, dtype=torch.uint8)
    inputs = levels_to_model_range(levels)
    assert inputs.dtype == torch.float32 and inputs[0] == -1 and inputs[255] == 1
    assert torch.equal(inputs, torch.arange(256, dtype=torch.float32) / 127.5 - 1)  # the preprocessing's formula
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    preprocess = ImagePreprocessor(16, 1)
    assert torch.equal(preprocess.levels(image)[0], torch.from_numpy(np.array(image)))
    assert torch.equal(levels_to_model_range(preprocess.levels(image)), preprocess(image))


def test_on_the_cpu_the_data_set_is_kept_in_memory_when_it_fits_and_every_image_is_read(monkeypatch):
    PartialState(cpu=True)  # for accelerate's logger
    images = TrainingImages(bundled_dataset().select(range(20)), "image", ImagePreprocessor(8, 1))
    cpu = torch.device("cpu")
    kept = device_resident_images(images, None, cpu, False, images_to_read=20)  # one epoch
    assert kept.shape == (20, 1, 8, 8) and all(torch.equal(levels_to_model_range(kept[i]), images[i]) for i in range(20))
    assert device_resident_images(images, None, cpu, False, images_to_read=19) is None  # less: read as it comes
    assert device_resident_images(images, None, cpu, False, images_to_read=None) is not None  # not known
    assert device_resident_images(images, False, cpu, False, images_to_read=40) is None  # --no-data_on_device
    assert device_resident_images(images, True, cpu, False, images_to_read=1) is not None  # --data_on_device
    memory = speed.physical_memory()
    assert memory > 2**30 and speed.fits_on_device(memory // 4, "cpu")
    assert not speed.fits_on_device(memory // 4, "cpu", processes=2)  # each process keeps a copy
    monkeypatch.setattr(speed, "physical_memory", lambda: 4 * images_bytes(images) - 1)
    assert device_resident_images(images, None, cpu, False, images_to_read=20) is None  # over a quarter of it
    monkeypatch.setattr(speed, "physical_memory", lambda: None)  # unknown: not kept
    assert device_resident_images(images, None, cpu, False, images_to_read=20) is None


def test_what_a_run_has_left_to_read_decides_whether_the_cpu_keeps_its_data_in_memory():
    """Kept when the steps left (after a resumed checkpoint's) read every image at least once."""
    PartialState(cpu=True)
    dataset = bundled_dataset().select(range(40))
    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"), is_local_main_process=False)

    def kept(*options, steps_done=0):
        config = TrainingConfig.from_args(["--train_batch_size", "4", *options])
        data = TrainingData.build(dataset, "image", config, {"sample_size": 8, "in_channels": 1}, accelerator, steps_done)
        return data.device_images is not None

    assert kept("--max_train_steps", "10") and not kept("--max_train_steps", "9")  # 40 and 36 images
    assert not kept("--max_train_steps", "12", steps_done=3) and kept("--max_train_steps", "13", steps_done=3)
    assert kept("--max_train_steps", "5", "--gradient_accumulation_steps", "2")  # 5 steps of 2 batches
    assert kept("--max_train_steps", "none", "--num_epochs", "1")
    assert not kept("--max_train_steps", "none", "--num_epochs", "1", steps_done=1)  # the rest of its one epoch
    assert kept("--max_train_steps", "none", "--num_epochs", "2", steps_done=10)


def images_bytes(images):
    return len(images) * images[0].numel()  # one byte a value: the 8-bit levels


def test_device_resident_data_equals_the_loader(tmp_path):
    config = TrainingConfig.from_args([*TINY, *FAST_CPU, "--output_dir", str(tmp_path)])
    trainer = Trainer(config)
    assert isinstance(trainer.dataloader.dataset, IndexDataset)
    stacked = trainer.data.device_images
    assert stacked.shape == (len(trainer.data.images), 1, 16, 16) and stacked.dtype == torch.uint8  # 8-bit levels
    for index in (0, 7, len(trainer.data.images) - 1):
        assert torch.equal(levels_to_model_range(stacked[index]), trainer.data.images[index])
    assert torch.equal(stack_images(trainer.data.images, "cpu", batch_size=333, progress=False), stacked)
    # the index loader follows the same seeded order as the image loader would
    trainer.data.sampler.set_epoch(3)
    order = list(trainer.data.sampler)[:8]
    trainer.dataloader.set_epoch(3)
    assert next(iter(trainer.dataloader)).tolist() == order
    reset_accelerate()
    # without it, the loader yields the images' 8-bit levels in that order: the same inputs
    streamed = Trainer(TrainingConfig.from_args([*TINY, *FAST_CPU, "--no-data_on_device", "--output_dir", str(tmp_path / "s")]))
    assert streamed.data.device_images is None
    streamed.dataloader.set_epoch(3)
    batch = next(iter(streamed.dataloader))
    assert batch.dtype == torch.uint8 and torch.equal(batch, stacked[order])


def test_streamed_and_device_resident_data_train_the_same_weights(tmp_path):
    """The loader's 8-bit levels and the device-resident levels are the same inputs: bit for bit
    the same losses and weights."""
    for name, where in (("streamed", "--no-data_on_device"), ("resident", "--data_on_device")):
        reset_accelerate()
        main([*TINY, "--no-channels_last", "--no-compile_unet", "--mixed_precision", "no", where, "--split", "train[:64]",
              "--max_train_steps", "6", "--output_dir", str(tmp_path / name)])  # fmt: skip
    assert read_losses(tmp_path / "streamed") == read_losses(tmp_path / "resident")
    streamed, resident = final_unet_weights(tmp_path / "streamed"), final_unet_weights(tmp_path / "resident")
    assert all(torch.equal(streamed[key], resident[key]) for key in streamed)


def read_losses(out):
    return (out / "loss_history.csv").read_text().splitlines()


def test_fused_and_foreach_adamw_agree():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    results = []
    for fused in (False, True):
        params = [w.clone().requires_grad_() for w in weights]
        optimizer = build_adamw(params, fused=fused, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
        torch.manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def final_unet_weights(out):
    return load_file(str(out / "checkpoint-6" / "model.safetensors"))


def test_fast_training_path_matches_the_plain_one(tmp_path):
    """channels_last + fused AdamW + the device-resident data set (no compile: see the CUDA test)
    give the same per-step losses and the same weights as the plain path, on the CPU in fp32."""
    plain = main([*TINY, *PLAIN, "--max_train_steps", "6", "--output_dir", str(tmp_path / "plain")])
    reset_accelerate()
    fast = main([*TINY, *FAST_CPU, "--max_train_steps", "6", "--output_dir", str(tmp_path / "fast")])
    assert plain.global_step == fast.global_step == 6
    losses = {}
    for name in ("plain", "fast"):
        rows = (tmp_path / name / "loss_history.csv").read_text().splitlines()[1:]
        losses[name] = np.array([float(row.split(",")[1]) for row in rows])
    np.testing.assert_allclose(losses["fast"], losses["plain"], rtol=1e-5)
    plain_weights, fast_weights = final_unet_weights(tmp_path / "plain"), final_unet_weights(tmp_path / "fast")
    assert plain_weights.keys() == fast_weights.keys()
    for key in plain_weights:
        torch.testing.assert_close(fast_weights[key], plain_weights[key], rtol=1e-4, atol=1e-5)
    # the fast run's outputs are ordinary: the saved pipeline is contiguous and loads
    pipeline = DDPMTargetPipeline.from_pretrained(tmp_path / "fast")
    assert all(p.is_contiguous() for p in pipeline.unet.parameters())


def test_gradient_checkpointing_recomputes_the_blocks_for_the_same_gradients():
    """Each block's forward runs again in the backward pass (its activations were not kept), and the
    loss and gradients are those of the plain network, dropout included (its masks are replayed)."""
    scheduler = DDPMTargetScheduler(num_train_timesteps=50, beta_schedule="cosine")
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    timesteps, noise = torch.tensor([0, 10, 30, 49]), torch.randn(4, 1, 16, 16)
    results = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        unet = DDPMUNet.from_preset("ddpm-tiny-16", dropout=0.2).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        calls, resnet = [], unet.down_blocks[0].resnets[0]
        resnet.forward = lambda *args, _forward=resnet.forward, _calls=calls, **kwargs: (
            _calls.append(1) or _forward(*args, **kwargs)
        )  # counts the block's forward passes (module hooks do not see the recomputation)
        torch.manual_seed(1)  # dropout
        loss = diffusion_loss(unet, scheduler, images, timesteps=timesteps, noise=noise)
        loss.backward()
        results[checkpointing] = loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}, len(calls)
    (plain_loss, plain_grads, plain_calls), (loss, grads, calls) = results[False], results[True]
    assert (plain_calls, calls) == (1, 2)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_trains_as_the_plain_path(tmp_path):
    plain = main([*TINY, *PLAIN, "--max_train_steps", "6", "--output_dir", str(tmp_path / "plain")])
    reset_accelerate()
    options = [*TINY, *PLAIN, "--gradient_checkpointing", "--max_train_steps", "6", "--output_dir", str(tmp_path / "gc")]
    trainer = Trainer(TrainingConfig.from_args(options))
    assert all(block.gradient_checkpointing for block in trainer.accelerator.unwrap_model(trainer.unet).down_blocks)
    reset_accelerate()
    checkpointed = main(options)
    assert plain.global_step == checkpointed.global_step == 6
    plain_weights, weights = final_unet_weights(tmp_path / "plain"), final_unet_weights(tmp_path / "gc")
    for key in plain_weights:
        torch.testing.assert_close(weights[key], plain_weights[key], rtol=1e-4, atol=1e-6)


def test_fast_run_resumes_from_its_checkpoint(tmp_path):
    """A channels_last + fused run's checkpoint (NHWC weights, fused optimizer state) resumes."""
    out = tmp_path / "run"
    main([*TINY, *FAST_CPU, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out)])
    reset_accelerate()
    result = main([*TINY, *PLAIN, "--max_train_steps", "6", "--checkpointing_steps", "2", "--output_dir", str(out),
                   "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert result.global_step == 6 and np.isfinite(result.final_loss)


def test_bf16_autocast_step_keeps_fp32_master_weights_and_loss(tmp_path):
    """bf16 autocast: float32 weights, optimizer state and loss; the loss agrees with fp32 to 1%."""
    losses, trainers = {}, {}
    for precision in ("no", "bf16"):
        reset_accelerate()
        config = TrainingConfig.from_args([*TINY, *PLAIN[:-2], "--mixed_precision", precision,
                                           "--output_dir", str(tmp_path / precision)])  # fmt: skip
        trainer = trainers[precision] = Trainer(config)
        assert trainer.mixed_precision == precision
        images = torch.stack([trainer.data.images[i] for i in range(8)])
        losses[precision] = [trainer.training_step(images, seed=s)[0] for s in range(3)]
    for fp32, bf16 in zip(losses["no"], losses["bf16"], strict=True):
        assert bf16.dtype == torch.float32
        assert abs(bf16.item() - fp32.item()) <= 0.01 * fp32.item()
    unet = trainers["bf16"].accelerator.unwrap_model(trainers["bf16"].unet)
    assert all(p.dtype == torch.float32 for p in unet.parameters())
    state = trainers["bf16"].optimizer.state_dict()["state"]
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_a_run_logs_its_resolved_fast_paths_and_the_launcher_s_precision(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as `accelerate launch --mixed_precision bf16` sets it
    config = TrainingConfig.from_args([*TINY, "--output_dir", str(tmp_path), "--log_every", "4"])
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        trainer = Trainer(config)
    assert trainer.mixed_precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    assert ("on cpu: bf16 autocast (from accelerate launch's mixed_precision bf16), NCHW, eager, fused AdamW, "
            "data loaded in the main process, loss read every 4 steps") in caplog.text  # fmt: skip


def test_mu_target_stays_in_fp32_by_default(tmp_path):
    config = TrainingConfig.from_args([*TINY, "--prediction_type", "mu", "--output_dir", str(tmp_path)])
    trainer = Trainer(config)
    assert config.mixed_precision == "auto" and trainer.mixed_precision == "no" and trainer.allow_tf32 is False


def tiny_pipeline(prediction_type="epsilon", **scheduler_options):
    torch.manual_seed(0)
    scheduler = DDPMTargetScheduler(prediction_type=prediction_type, **scheduler_options)
    return DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), scheduler)


# μ: an untrained μ network's output *is* the next state, so iterating it is chaotic: float32
# rounding differences between memory layouts (~1e-7) grow about tenfold every 10 steps (1e-5
# after 10, 0.5 after 50). The μ check therefore runs a short full chain (T = 10, cosine).
@pytest.mark.parametrize(
    ("prediction_type", "steps", "options", "atol"),
    [
        ("epsilon", 12, {}, 1e-5),
        ("x0", 12, {}, 1e-5),
        ("mu", None, {"num_train_timesteps": 10, "beta_schedule": "cosine"}, 5e-5),
    ],
)
def test_fast_sampling_gives_the_same_images_on_cpu(prediction_type, steps, options, atol):
    """channels_last (fp32, CPU) samples the same images as the plain pipeline."""
    plain = tiny_pipeline(prediction_type, **options)
    fast = tiny_pipeline(prediction_type, **options).enable_fast_sampling(channels_last=True, compile=False)
    assert fast.unet.dtype == torch.float32  # auto on the CPU
    kwargs = {"batch_size": 3, "num_inference_steps": steps, "output_type": "np"}
    expected = plain(generator=torch.Generator().manual_seed(5), **kwargs).images
    images = fast(generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(images, expected, atol=atol)


@pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason="no C++ compiler for Inductor's CPU kernels")
def test_compiled_sampling_on_the_cpu_gives_the_same_images():
    """The CPU's opt-in torch.compile (Inductor's C++ kernels, with channels_last, which compiling
    turns on there) samples the same images as the plain float32 pipeline. About 45 s, nearly all
    of it Inductor's first compile."""
    plain = tiny_pipeline()
    fast = tiny_pipeline().enable_fast_sampling(compile=True)
    assert is_compiled(fast.unet) and is_channels_last(fast.unet) and fast.unet.dtype == torch.float32
    kwargs = {"batch_size": 3, "num_inference_steps": 6, "output_type": "np"}
    expected = plain(generator=torch.Generator().manual_seed(5), **kwargs).images
    images = fast(generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(images, expected, atol=1e-5)


def test_half_precision_unet_sees_the_float32_noise():
    """A bf16 UNet (CPU here) samples from the same x_T and step noise as the float32 one: the
    trajectories start equal and the images differ only by the network's rounding."""
    plain = tiny_pipeline()
    half = tiny_pipeline().enable_fast_sampling(dtype=torch.bfloat16, channels_last=False, compile=False)
    assert half.unet.dtype == torch.bfloat16
    kwargs = {"batch_size": 3, "num_inference_steps": 10, "output_type": "np", "trajectory_steps": 10}
    expected = plain(generator=torch.Generator().manual_seed(5), **kwargs)
    output = half(generator=torch.Generator().manual_seed(5), **kwargs)
    assert output.trajectory.samples.dtype == torch.float32
    assert torch.equal(output.trajectory.samples[0], expected.trajectory.samples[0])  # x_T, drawn in float32
    assert 0 < np.abs(output.images - expected.images).mean() < 0.02


def test_half_precision_sampling_on_the_cpu_is_cast_quietly_and_advised(tmp_path, monkeypatch, caplog):
    """Casting the UNet does not trip diffusers' warning that names no float32 modules; an emulated
    half precision warns; eval_metrics' auto float32 on a CPU with bfloat16 instructions says what is faster."""
    fake_cpu(monkeypatch, avx512_bf16=True)
    diffusers_records = []  # diffusers' loggers do not propagate to pytest's, and conftest quiets them
    handler, diffusers_logger = logging.Handler(), logging.getLogger("diffusers")
    handler.emit = diffusers_records.append
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.WARNING)  # setLevel, not the attribute: it clears the loggers' caches
    diffusers_logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe = tiny_pipeline().enable_fast_sampling(dtype=torch.bfloat16, channels_last=False, compile=False)
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logger.setLevel(level)
    assert pipe.unet.dtype == torch.bfloat16
    assert not [r for r in diffusers_records if "kept in float32" in r.getMessage()]
    fake_cpu(monkeypatch)
    with pytest.warns(UserWarning, match="so bfloat16 is emulated"):
        tiny_pipeline().enable_fast_sampling(dtype="bfloat16", compile=False)
    tiny_pipeline().save_pretrained(tmp_path)
    fake_cpu(monkeypatch, avx512_bf16=True)
    monkeypatch.setattr(sampling, "_ADVICE_GIVEN", set())  # as in a new process
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.evaluation"):
        assert sampling_pipeline(str(tmp_path), torch.device("cpu")).unet.dtype == torch.float32
        sampling_pipeline(str(tmp_path), torch.device("cpu"), dtype="float32")
        sampling_pipeline(str(tmp_path), torch.device("cpu"), fast_sampling="off")
        sampling_pipeline(str(tmp_path), torch.device("cpu"))  # once a process: not again for each snapshot
    assert caplog.text.count("--sampling_dtype bfloat16 is faster here") == 1


def test_eval_metrics_compile_unet_compiles_the_sampling_unet(tmp_path, monkeypatch):
    """--compile_unet reaches enable_fast_sampling (whose auto stays eager on the CPU); it
    contradicts --fast_sampling off."""
    modes = []

    def record(module, mode=None):
        modes.append(mode)
        return module.compile(backend="eager")  # Dynamo alone: the plumbing, not Inductor's C++

    monkeypatch.setattr("ddpm_pipeline.pipeline_ddpm_target.compile_module", record)
    tiny_pipeline().save_pretrained(tmp_path)
    assert not is_compiled(sampling_pipeline(str(tmp_path), torch.device("cpu")).unet)
    assert is_compiled(sampling_pipeline(str(tmp_path), torch.device("cpu"), compile=True).unet)
    assert modes == [None]  # the default mode on the CPU (CUDA graphs are CUDA's)
    base = ["--model", str(tmp_path)]
    assert [EvaluationConfig.from_args([*base, *flag]).compile_unet for flag in ([], ["--compile_unet"], ["--no-compile_unet"])] == [None, True, False]  # fmt: skip
    with pytest.raises(ValueError, match="--compile_unet compiles the fast sampling path, which --fast_sampling off turns off"):
        EvaluationConfig.from_args([*base, "--compile_unet", "--fast_sampling", "off"]).validate()


@needs_cuda
def test_compiled_bf16_cuda_sampling_agrees_with_fp32():
    """bf16 + channels_last + torch.compile with CUDA graphs, against fp32 on the same GPU."""
    plain = tiny_pipeline().to("cuda")
    plain.enable_fast_sampling(dtype=torch.float32, channels_last=False, compile=False, allow_tf32=False)
    fast = tiny_pipeline().to("cuda").enable_fast_sampling()
    assert fast.unet.dtype == torch.bfloat16
    kwargs = {"batch_size": 4, "num_inference_steps": 20, "output_type": "np"}
    expected = plain(generator=torch.Generator("cuda").manual_seed(5), **kwargs).images
    images = fast(generator=torch.Generator("cuda").manual_seed(5), **kwargs).images
    assert np.abs(images - expected).mean() < 0.01


@needs_cuda
def test_compiled_cuda_training_step_matches_eager(tmp_path):
    """torch.compile of the UNet on the GPU: same losses as eager in fp32 (TF32 off)."""
    runs = {}
    for name, compiled in (("eager", "--no-compile_unet"), ("compiled", "--compile_unet")):
        reset_accelerate()
        result = main([*TINY, compiled, "--mixed_precision", "no", "--no-allow_tf32", "--max_train_steps", "6",
                       "--log_every", "1", "--output_dir", str(tmp_path / name)])  # fmt: skip
        rows = (tmp_path / name / "loss_history.csv").read_text().splitlines()[1:]
        runs[name] = np.array([float(row.split(",")[1]) for row in rows])
        assert result.global_step == 6
    np.testing.assert_allclose(runs["compiled"], runs["eager"], rtol=1e-3)


@needs_cuda
def test_default_cuda_run_trains_saves_and_resumes(tmp_path):
    """The GPU defaults together, end to end — bf16 autocast, TF32, channels_last, torch.compile,
    fused AdamW, the data set on the device, losses read back every 10 steps: the loss falls, the
    saved pipeline holds float32 weights that stock diffusers loads, and the run resumes."""
    from diffusers import DDPMPipeline

    trainer = Trainer(TrainingConfig.from_args([*TINY, "--output_dir", str(tmp_path / "flags")]))
    chosen = (trainer.mixed_precision, trainer.allow_tf32, trainer.channels_last, trainer.compile_unet, trainer.fused_adam)
    assert chosen == ("bf16" if has_native_bf16("cuda") else "fp16", True, True, True, True)
    del trainer
    reset_accelerate()
    out = tmp_path / "run"
    options = [*TINY, "--data_on_device", "--log_every", "10", "--checkpointing_steps", "40", "--output_dir", str(out)]
    result = main([*options, "--max_train_steps", "80"])
    assert result.global_step == 80 and np.isfinite(result.final_loss)
    rows = (out / "loss_history.csv").read_text().splitlines()[1:]
    losses = np.array([float(row.split(",")[1]) for row in rows])
    assert len(losses) == 80 and losses[-20:].mean() < losses[:20].mean()
    pipeline = DDPMPipeline.from_pretrained(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in pipeline.unet.parameters())
    reset_accelerate()
    resumed = main([*options, "--max_train_steps", "90", "--resume_from_checkpoint", "latest"])
    assert resumed.global_step == 90 and np.isfinite(resumed.final_loss)
