"""sample_ddpm.py / ddpm_pipeline.generation: a trained pipeline's samples written to disk."""

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import launched_cpu_threads, run_to_success, torch_threads, two_process_launch
from diffusers import UNet2DModel
from PIL import Image
from pixel_features import FEATURES

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet, evaluate
from ddpm_pipeline import pace as pace_module
from ddpm_pipeline.console import run_command
from ddpm_pipeline.evaluation import EvaluationConfig, long_evaluation_advice
from ddpm_pipeline.evaluation_config import QUICK_CPU_EVALUATION
from ddpm_pipeline.generation import SampleConfig, generate_samples, main
from ddpm_pipeline.pace import Pace, duration
from ddpm_pipeline.sample_store import SETTINGS_FILE
from ddpm_pipeline.sampling import new_folder_batch_size, sample_store, sampling_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised 16×16 grayscale ε pipeline with T = 40, saved to disk."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipeline")
    DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=40)).save_pretrained(folder)
    return folder


def sample(tmp_path, model, folder="out", **options):
    settings = dict(model=str(model), output_dir=str(tmp_path / folder), num_images=6, num_inference_steps=3,
                    batch_size=4, device="cpu")  # fmt: skip
    settings.update(options)
    return generate_samples(**settings)


def pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def pixels(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path), dtype=int) for path in sorted(folder.glob("*.png"))])


def test_samples_grid_npz_and_report(tmp_path, tiny_pipeline):
    report = sample(tmp_path, tiny_pipeline, npz=True, grid_images=4)
    out = tmp_path / "out"
    assert sorted(pngs(out / "images")) == [f"{i:06d}.png" for i in range(6)]
    with np.load(out / "samples.npz") as archive:
        images = archive["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 1)
    for index in range(6):  # the array holds exactly the PNGs' pixels
        np.testing.assert_array_equal(images[index, ..., 0], np.asarray(Image.open(out / "images" / f"{index:06d}.png")))
    assert Image.open(out / "grid.png").size[0] > 2 * 16  # 4 images side by side
    assert json.loads((out / "sampling_report.json").read_text()) == report
    assert report["num_images"] == 6 and report["samples_reused"] == 0 and report["num_inference_steps"] == 3
    assert report["sampling"]["scheduler"] == "DDPMTargetScheduler" and report["images_per_s"] > 0
    assert report["processes"] == 1 and report["versions"]["diffusers"]
    # more images later, without --npz: the array left by the first call is rewritten with all of them
    more = sample(tmp_path, tiny_pipeline, num_images=9, grid_images=4)
    with np.load(out / "samples.npz") as archive:
        np.testing.assert_array_equal(archive["arr_0"][:6], images)
        assert archive["arr_0"].shape == (9, 16, 16, 1) and more["npz"] == str(out / "samples.npz")


def test_the_trajectory_shows_the_chain_of_the_first_images(tmp_path, tiny_pipeline):
    report = sample(tmp_path, tiny_pipeline, num_inference_steps=10, trajectory=True)
    assert report["trajectory"] == str(tmp_path / "out" / "trajectory.png")
    width, height = Image.open(report["trajectory"]).size
    assert width > 8 * 64 and height > 4 * 3 * 64  # 8 steps by 3 rows for each of 4 images
    # it comes from batch 0 sampled again: the same images as the folder's first ones
    store = sample_store(tmp_path / "out" / "images", str(tiny_pipeline), 10, 0, 4)
    recorded = store.sample_batch(DDPMTargetPipeline.from_pretrained(tiny_pipeline), 0, trajectory_steps=8)
    assert recorded.trajectory.timesteps[-1] == 0 and len(recorded.trajectory.timesteps) == 8
    first = np.round(np.clip(recorded.images[..., 0], 0, 1) * 255)
    np.testing.assert_array_equal(first, pixels(tmp_path / "out" / "images")[:4])
    with pytest.raises(ValueError, match="--trajectory needs a sampler with integer timesteps"):
        SampleConfig(model=str(tiny_pipeline), scheduler="euler", trajectory=True).validate()


def test_more_images_later_keep_the_first_and_equal_a_fresh_run(tmp_path, tiny_pipeline):
    """Asked for more images, a folder keeps its own and adds the rest, with its own batch size
    when none is given (image i depends on it)."""
    sample(tmp_path, tiny_pipeline, num_images=6)
    first = pngs(tmp_path / "out" / "images")
    report = sample(tmp_path, tiny_pipeline, num_images=10, batch_size=None)
    assert report["samples_reused"] == 6 and report["batch_size"] == 4
    grown = pngs(tmp_path / "out" / "images")
    assert len(grown) == 10 and all(grown[name] == data for name, data in first.items())
    sample(tmp_path, tiny_pipeline, folder="fresh", num_images=10)
    assert pngs(tmp_path / "fresh" / "images") == grown  # image i does not depend on how many were asked for
    assert SampleConfig(model="m").batch_size is None


def test_a_new_folder_on_a_cpu_samples_no_more_images_than_asked_for(tmp_path, tiny_pipeline, monkeypatch, caplog):
    """A batch is sampled whole, so on a CPU (whose time per step grows with the batch) a new folder's
    default batch is at most --num_images, and at most 64; the network sees only those images. A GPU
    keeps 64 (a batch of 64 costs it about what one of 4 does), and so does a --batch_size given."""
    seen = []
    forward = UNet2DModel.forward  # the class a saved pipeline's network loads as
    monkeypatch.setattr(UNet2DModel, "forward", lambda self, sample, *args, **kwargs: seen.append(len(sample))
                        or forward(self, sample, *args, **kwargs))  # fmt: skip
    report = sample(tmp_path, tiny_pipeline, folder="preview", num_images=3, batch_size=None, grid_images=0)
    assert report["batch_size"] == 3 and seen == [3] * 3  # 3 steps of the 3 images, not of 64
    seen.clear()
    assert sample(tmp_path, tiny_pipeline, folder="many", num_images=70, batch_size=None, grid_images=0)["batch_size"] == 64
    assert seen == [64] * 3 + [64] * 3  # two batches, the second sampled whole (images 64–127, 6 of them kept)
    preview = pixels(tmp_path / "preview" / "images")
    assert not np.array_equal(preview, pixels(tmp_path / "many" / "images")[:3])  # image i depends on the batch size
    sample(tmp_path, tiny_pipeline, folder="preview-64", num_images=3, batch_size=64, grid_images=0)
    np.testing.assert_array_equal(pixels(tmp_path / "preview-64" / "images"), pixels(tmp_path / "many" / "images")[:3])
    # a preview grown later keeps its batch, and says so
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.sampling"):
        grown = sample(tmp_path, tiny_pipeline, folder="preview", num_images=8, batch_size=None, grid_images=0)
    assert grown["batch_size"] == 3 and grown["samples_reused"] == 3
    assert f"{tmp_path / 'preview' / 'images'} holds samples drawn in batches of 3, so its new ones are too" in caplog.text
    assert "a new folder would sample in batches of 8" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert new_folder_batch_size(64, 3, None) == 64
    assert new_folder_batch_size(256, 3, "cpu") == 3 and new_folder_batch_size(256, 1000, "cpu") == 256


def test_a_long_sampling_on_a_cpu_is_announced_from_the_first_batchs_pace(tmp_path, tiny_pipeline, monkeypatch, caplog):
    """The first batch's second step is timed, and a job longer than LONG_JOB_SECONDS is told with
    its length (the steps of every batch ahead at that pace) and how to shorten it, once; the timing
    changes no image."""
    ticks = iter([10.0, 12.5, 99.0])  # the ends of steps 1 and 2: 2.5 s a step
    pace = Pace("this sampling", "fewer steps", clock=lambda: next(ticks))
    pace.expect(evaluations=3 * 1000, batch_size=64)
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.pace"):
        for step in range(3):
            assert pace(None, step, 999 - step, {"latents": step}) == {"latents": step}
    assert caplog.messages == ["this sampling takes about 2.1 h on this CPU (3,000 network evaluations of a batch of 64 "
                               "at 2.50 s each, the pace of the first batch); fewer steps"]  # fmt: skip
    assert [duration(seconds) for seconds in (61, 7199, 7200, 172800)] == ["1 min", "120 min", "2.0 h", "2.0 days"]
    caplog.clear()
    quiet = sample(tmp_path, tiny_pipeline, folder="quiet", num_images=6, num_inference_steps=40, grid_images=0)
    assert "this sampling takes" not in caplog.text  # a few seconds
    monkeypatch.setattr(pace_module, "LONG_JOB_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.pace"):
        told = sample(tmp_path, tiny_pipeline, folder="told", num_images=6, num_inference_steps=40, grid_images=0)
    announced = [message for message in caplog.messages if message.startswith("this sampling takes about")]
    assert len(announced) == 1 and "(80 network evaluations of a batch of 4 at " in announced[0]  # 2 batches × 40
    assert announced[0].endswith("the pace of the first batch)")  # 40 steps: no fewer to advise
    assert pngs(tmp_path / "told" / "images") == pngs(tmp_path / "quiet" / "images")
    assert told["batch_size"] == quiet["batch_size"] == 4
    # an evaluation's advice: the quick protocol, where it asks for more than that
    assert long_evaluation_advice(EvaluationConfig(model="m")).endswith(f"give {QUICK_CPU_EVALUATION}")
    assert long_evaluation_advice(EvaluationConfig(model="m", num_samples=1000, num_inference_steps=100)) == ""


def test_the_full_chain_by_default_and_other_options_refused(tmp_path, tiny_pipeline):
    report = sample(tmp_path, tiny_pipeline, num_images=2, batch_size=2, num_inference_steps=None, grid_images=0)
    assert report["num_inference_steps"] == 40 and "grid" not in report
    settings = json.loads((tmp_path / "out" / "images" / SETTINGS_FILE).read_text())
    assert settings["num_inference_steps"] == 40 and "noise_device" not in settings  # CPU noise, as stores always had
    with pytest.raises(ValueError, match="num_inference_steps: 40 there vs 3 now") as refused:
        sample(tmp_path, tiny_pipeline, num_images=2, batch_size=2)
    assert "sample with its options (--num_inference_steps 40)" in str(refused.value)
    with pytest.raises(ValueError, match="sample with its options \\(--batch_size 2 --scheduler ddpm\\)"):
        sample(tmp_path, tiny_pipeline, num_images=2, batch_size=4, num_inference_steps=40, scheduler="ddim")
    with pytest.raises(ValueError, match="exceeds the 40 diffusion steps"):
        sample(tmp_path, tiny_pipeline, folder="more", num_inference_steps=41)


def test_eval_metrics_scores_these_samples_without_sampling_again(tmp_path, tiny_pipeline):
    """The same store: eval_metrics.py --samples_dir <output_dir>/images with the same sampling
    options finds every image there; given no --batch_size it takes the folder's (4, not its own
    default 256), and another one given is refused, naming the folder's."""
    sample(tmp_path, tiny_pipeline, scheduler="ddim")
    options = dict(model=str(tiny_pipeline), samples_dir=str(tmp_path / "out" / "images"), num_samples=6,
                   num_inference_steps=3, scheduler="ddim", metrics="fid", reference=str(tmp_path / "out" / "images"),
                   feature_extractor=FEATURES, output=str(tmp_path / "results.json"), cache_dir=str(tmp_path / "cache"),
                   device="cpu")  # fmt: skip
    report = evaluate(**options)
    assert report["samples_reused"] == 6 and report["sampling"]["scheduler"] == "DDIMScheduler"
    assert report["options"]["batch_size"] == 4
    assert report["metrics"]["fid"] == pytest.approx(0.0, abs=1e-3)  # scored against themselves
    with pytest.raises(ValueError, match="sample with its options \\(--batch_size 4\\)"):
        evaluate(**{**options, "batch_size": 3})


def test_ddim_eta_one_writes_the_ancestral_samplers_images(tmp_path):
    """--scheduler ddim --eta 1 is this package's respaced ancestral sampler (the identity
    test_pipeline checks on tensors), here through the store to PNGs; η is part of the folder's
    options, and η = 0 makes other images."""
    torch.manual_seed(0)
    model = tmp_path / "x0-model"  # an x0 network without clipping: the identity is exact (test_pipeline)
    DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"),
                       DDPMTargetScheduler(num_train_timesteps=40, prediction_type="sample", clip_sample=False)).save_pretrained(model)  # fmt: skip
    sample(tmp_path, model, folder="ancestral", num_inference_steps=5)
    report = sample(tmp_path, model, folder="ddim1", num_inference_steps=5, scheduler="ddim", eta=1.0)
    sample(tmp_path, model, folder="ddim0", num_inference_steps=5, scheduler="ddim")
    assert report["options"]["eta"] == 1.0 and report["sampling"]["scheduler"] == "DDIMScheduler"
    ancestral, ddim1, ddim0 = (pixels(tmp_path / name / "images") for name in ("ancestral", "ddim1", "ddim0"))
    assert np.abs(ddim1 - ancestral).max() <= 1  # the same up to 8-bit rounding
    assert np.abs(ddim0 - ancestral).max() > 25  # deterministic DDIM is another sampler
    assert json.loads((tmp_path / "ddim1" / "images" / SETTINGS_FILE).read_text())["eta"] == 1.0
    with pytest.raises(ValueError, match="eta: 1.0 there vs 0.5 now"):
        sample(tmp_path, model, folder="ddim1", num_inference_steps=5, scheduler="ddim", eta=0.5)


def test_timestep_spacing_picks_the_visited_timesteps_and_keys_the_folder(tmp_path, tiny_pipeline):
    """--timestep_spacing trailing starts a respaced chain at t = T-1 (leading, the saved default,
    lower: at 26 for 3 of 40 steps), for the folder's own sampler and diffusers' alike; its images are
    others, so the folder records it, while the default, given or not, records nothing."""
    for scheduler in ("ddpm", "ddim", "dpmsolver++"):
        visited = {}
        for spacing in ("leading", "trailing", None):
            pipeline = sampling_pipeline(str(tiny_pipeline), torch.device("cpu"), scheduler=scheduler, spacing=spacing)
            pipeline.scheduler.set_timesteps(3)
            visited[spacing] = [int(t) for t in pipeline.scheduler.timesteps]
        assert visited["trailing"][0] == 39 and visited["leading"][0] < 39 and visited[None] == visited["leading"], scheduler
        assert scheduler != "ddpm" or visited["leading"] == [26, 13, 0]
    leading = sample(tmp_path, tiny_pipeline, folder="leading")
    trailing = sample(tmp_path, tiny_pipeline, folder="trailing", timestep_spacing="trailing")
    assert (leading["sampling"]["timestep_spacing"], trailing["sampling"]["timestep_spacing"]) == ("leading", "trailing")
    assert np.abs(pixels(tmp_path / "trailing" / "images") - pixels(tmp_path / "leading" / "images")).max() > 25
    assert "timestep_spacing" not in json.loads((tmp_path / "leading" / "images" / SETTINGS_FILE).read_text())
    assert json.loads((tmp_path / "trailing" / "images" / SETTINGS_FILE).read_text())["timestep_spacing"] == "trailing"
    assert sample(tmp_path, tiny_pipeline, folder="leading", timestep_spacing="leading")["samples_reused"] == 6
    with pytest.raises(ValueError, match="timestep_spacing: 'trailing' there vs 'leading' now.*--timestep_spacing trailing"):
        sample(tmp_path, tiny_pipeline, folder="trailing")
    with pytest.raises(ValueError, match="--timestep_spacing must be one of linspace, leading, trailing"):
        sample(tmp_path, tiny_pipeline, folder="sideways", timestep_spacing="sideways")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_noise_is_drawn_there_and_recorded(tmp_path, tiny_pipeline):
    """No CPU generator on a GPU (each step would wait for a copy of its noise): the store records
    noise_device cuda, and the images are still fixed by (seed, batch)."""
    sample(tmp_path, tiny_pipeline, device="cuda", fast_sampling="off")
    sample(tmp_path, tiny_pipeline, folder="again", device="cuda", fast_sampling="off")
    assert json.loads((tmp_path / "out" / "images" / SETTINGS_FILE).read_text())["noise_device"] == "cuda"
    assert pngs(tmp_path / "out" / "images") == pngs(tmp_path / "again" / "images")
    with pytest.raises(ValueError, match="sample with its options \\(--device cuda\\)"):
        sample(tmp_path, tiny_pipeline, fast_sampling="off")  # the same folder on the CPU


def test_bad_options_name_the_fix(tmp_path, tiny_pipeline):
    for options, message in [
        ({"model": None}, "Give --model"),
        ({"num_images": 0}, "--num_images must be positive"),
        ({"grid_images": -1}, "--grid_images must be ≥ 0"),
        ({"scheduler": "pndm"}, "--scheduler must be one of ddpm, ddim"),
        ({"compile_unet": True, "fast_sampling": "off"}, "drop one of the two"),
        ({"eta": 0.5}, "--eta is DDIM's η: it applies with --scheduler ddim, not ddpm"),
        ({"eta": -1.0, "scheduler": "ddim"}, "--eta must be between 0 (deterministic DDIM) and 1"),
        ({"eta": 2.0, "scheduler": "ddim"}, "--eta must be between 0 (deterministic DDIM) and 1 (the DDPM posterior's "
         "variance), got 2.0"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            SampleConfig(**{"model": str(tiny_pipeline), **options}).validate()
    with pytest.raises(FileNotFoundError, match="is not a folder, nor a Hub repo id"):
        sample(tmp_path, tmp_path / "no-such-run")
    with pytest.raises(FileNotFoundError, match=re.escape("--model 'my run' is not a folder, nor a Hub repo id (owner/name")):
        sample(tmp_path, "my run")  # a folder's name with a space: huggingface_hub's HFValidationError before
    refused = f"--output_dir {tiny_pipeline} holds a pipeline .* e.g. --output_dir {tiny_pipeline}-samples"
    with pytest.raises(ValueError, match=refused):  # its trajectory.png would be replaced, its push would carry the images
        SampleConfig(model=str(tiny_pipeline), output_dir=str(tiny_pipeline)).validate()
    assert not (tiny_pipeline / "images").exists()
    with pytest.raises(ValueError, match="'gpu' is not a device torch knows"):
        sample(tmp_path, tiny_pipeline, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device on this machine; drop --device"):
            sample(tmp_path, tiny_pipeline, device="cuda")


def test_options_from_python_may_be_paths_and_numpy_numbers_and_text_for_a_number_is_named(tmp_path, tiny_pipeline):
    """A `Path` and numpy's integers, natural in Python, were written into the JSON report after the
    sampling (a TypeError then); text where a number is wanted failed in a comparison."""
    report = generate_samples(model=tiny_pipeline, output_dir=tmp_path / "out", num_images=np.int64(2),
                              num_inference_steps=2, batch_size=2, grid_images=0, device="cpu")  # fmt: skip
    assert report["num_images"] == 2 and json.loads((tmp_path / "out" / "sampling_report.json").read_text()) == report
    with pytest.raises(ValueError, match="--num_images must be an integer, got '10'"):
        SampleConfig(model=str(tiny_pipeline), num_images="10")
    config = EvaluationConfig(model=tiny_pipeline, metrics="bpd", bpd_held_out=0.05, output=tmp_path / "results.json")
    assert config.model == str(tiny_pipeline) and config.output == str(tmp_path / "results.json")
    assert config.bpd_held_out == "0.05"  # a share, as --bpd_held_out 0.05 gives it
    with pytest.raises(ValueError, match="--num_samples must be an integer, got '100'"):
        EvaluationConfig(model=str(tiny_pipeline), num_samples="100")


def test_the_command_line(tmp_path, tiny_pipeline):
    report = main(["--model", str(tiny_pipeline), "--output_dir", str(tmp_path / "cli"), "--num_images", "3",
                   "--num_inference_steps", "2", "--batch_size", "3", "--device", "cpu", "--npz", "--seed", "7"])  # fmt: skip
    assert report["seed"] == 7 and report["options"]["npz"] is True and (tmp_path / "cli" / "samples.npz").is_file()
    assert SampleConfig.from_args(["--model", "m", "--no-npz"]).npz is False
    assert SampleConfig.from_args(["--model", "m", "--scheduler", "ddim", "--eta", "0.5"]).eta == 0.5


def test_two_launched_processes_write_the_images_one_process_would(tmp_path, tiny_pipeline):
    """`accelerate launch --multi_gpu --num_processes 2 sample_ddpm.py` (gloo on the CPU): the
    processes share the batches, the folder equals one process's on as many threads as each of
    them (on another number, a pixel may round the other way), the main one writes the rest."""
    options = ["--model", str(tiny_pipeline), "--num_images", "7", "--num_inference_steps", "2", "--batch_size", "2",
               "--device", "cpu", "--npz"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run_to_success([*two_process_launch(), str(ROOT / "sample_ddpm.py"), *options, "--output_dir", str(tmp_path / "two")],
                   env=env, timeout=600, cwd=ROOT)  # fmt: skip
    with torch_threads(launched_cpu_threads()):
        main([*options, "--output_dir", str(tmp_path / "one")])
    assert pngs(tmp_path / "two" / "images") == pngs(tmp_path / "one" / "images") and len(pngs(tmp_path / "one" / "images")) == 7
    report = json.loads((tmp_path / "two" / "sampling_report.json").read_text())
    assert report["processes"] == 2 and report["num_images"] == 7
    with np.load(tmp_path / "two" / "samples.npz") as two, np.load(tmp_path / "one" / "samples.npz") as one:
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])


def test_a_launch_asked_for_two_processes_that_starts_one_says_so(tmp_path, tiny_pipeline):
    """`accelerate launch --cpu --num_processes 2` (and, on a machine without CUDA, the same without
    --cpu) starts one process: it samples everything alone, and the log names --multi_gpu."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    result = run_to_success([*launch, str(ROOT / "sample_ddpm.py"), "--model", str(tiny_pipeline), "--num_images", "2",
                             "--num_inference_steps", "2", "--output_dir", str(tmp_path / "s"), "--grid_images", "0"],
                            env=env, timeout=600, cwd=ROOT)  # fmt: skip
    assert json.loads((tmp_path / "s" / "sampling_report.json").read_text())["processes"] == 1
    assert "started this one alone" in result.stderr and "--multi_gpu --num_processes N sample_ddpm.py" in result.stderr


@pytest.mark.parametrize(
    ("damaged", "content", "problem"),
    [
        ("model_index.json", '{"_class_name": "DDPMPipeline",}', r"is not valid JSON \(Expecting property name .*line 1"),
        ("unet/config.json", "", "is empty"),
        ("scheduler/scheduler_config.json", "[]", "holds a JSON list, not an object"),
        ("training_summary.json", '{"global_step": 4', r"is not valid JSON \("),
    ],
)
def test_a_pipeline_file_that_is_not_json_is_named_on_the_command_line(tmp_path, tiny_pipeline, capsys, damaged, content,
                                                                        problem):  # fmt: skip
    """A JSON file of the pipeline edited by hand with a typo, emptied or cut short: the command
    names the file and where its JSON breaks, in one line, before it samples anything."""
    folder = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, folder)
    (folder / damaged).write_text(content)
    with pytest.raises(SystemExit):
        run_command(lambda: main(["--model", str(folder), "--output_dir", str(tmp_path / "s"), "--num_images", "1"]),
                    "sample_ddpm.py")  # fmt: skip
    error = capsys.readouterr().err
    assert re.match(f"sample_ddpm.py: error: {re.escape(str(folder / damaged))} {problem}", error), error
    assert error.rstrip().endswith(": correct it, or restore it from a copy.")
    assert not (tmp_path / "s" / "images").exists()


def test_a_sample_folder_whose_record_is_not_json_says_how_to_start_afresh(tmp_path, tiny_pipeline):
    sample(tmp_path, tiny_pipeline, num_images=2)
    (tmp_path / "out" / "images" / SETTINGS_FILE).write_text('{"seed": 0, "num_inf')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'out' / 'images' / SETTINGS_FILE} is not valid JSON (")
                       + ".*" + re.escape(f"delete {tmp_path / 'out' / 'images'} (or give another folder) to sample afresh.")):
        sample(tmp_path, tiny_pipeline, num_images=4)


def test_damaged_samples_are_drawn_again_as_they_were(tmp_path, tiny_pipeline, caplog):
    """A sample cut short (a copy), emptied or zero-filled under its name (a power cut before its
    data reached the disk) is not counted as there: the next call draws it again, the same image."""
    sample(tmp_path, tiny_pipeline, num_images=6)
    images = tmp_path / "out" / "images"
    before = {path.name: path.read_bytes() for path in sorted(images.glob("*.png"))}
    (images / "000001.png").write_bytes(before["000001.png"][: len(before["000001.png"]) // 2])
    (images / "000002.png").write_bytes(b"")
    (images / "000004.png").write_bytes(bytes(len(before["000004.png"])))
    with caplog.at_level("WARNING"):
        report = sample(tmp_path, tiny_pipeline, num_images=6)
    assert "000001.png, 000002.png, 000004.png cut short or empty" in caplog.text
    assert report["samples_reused"] == 3
    assert {path.name: path.read_bytes() for path in sorted(images.glob("*.png"))} == before
    (images / "000003.png").write_bytes(b"")  # and scoring the folder as --samples names a damaged file
    with pytest.raises(ValueError, match=re.escape(f"{images / '000003.png'} cannot be read as an image (Unidentified")):
        evaluate(samples=str(tmp_path / "out"), reference=str(images), metrics="fid", feature_extractor=FEATURES,
                 output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip


def test_a_bad_option_is_one_line_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        run_command(lambda: main(["--model", str(tmp_path / "missing")]), "sample_ddpm.py")
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("sample_ddpm.py: error: --model") and "Traceback" not in error
    assert not (tmp_path / "samples").exists()  # nothing written for a run that could not start
