"""Model cards and Hub pushes, offline.

The upload path is tested by recording the exact `HfApi` calls on a stand-in object (no HTTP, no
network): which repo is created, with which privacy, which folder is uploaded in how many commits,
and which of its files the ignore patterns let through (huggingface_hub's own filter).
"""

import json
import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects
from PIL import Image

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet
from ddpm_pipeline import push as push_module
from ddpm_pipeline.metrics import feature_metrics, gaussian_statistics
from ddpm_pipeline.model_card import BUNDLED_DATASET_ID, build_model_card, write_model_card
from ddpm_pipeline.push import IGNORE_PATTERNS, check_hub_access, push_to_hub
from ddpm_pipeline.sampling import weights_fingerprint
from ddpm_pipeline.training import main as train_main
from ddpm_pipeline.training_config import TrainingConfig


def metrics_as_evaluated() -> dict:
    """The metrics of a report as eval_metrics.py writes them: the metric functions' own output
    (on small random features), so that the card reads the keys evaluation really writes."""
    generator = torch.Generator().manual_seed(0)
    generated = {"2048": torch.randn(40, 8, generator=generator), "logits_unbiased": torch.randn(40, 10, generator=generator)}
    reference = torch.randn(50, 8, generator=generator) + 0.5
    metrics = feature_metrics(["fid", "isc", "kid", "prc"], generated, gaussian_statistics(reference), reference,
                              kid_subsets=10, kid_subset_size=20, isc_splits=2)  # fmt: skip
    return {**metrics, "bpd": {"bits_per_dim": 3.21, "bits_per_dim_stderr": 0.02, "num_images": 1000, "timesteps": 20,
                               "data": "my_images", "split": "test"}}  # fmt: skip


REPORT = {
    "num_samples": 5000,
    "num_inference_steps": 1000,
    "metrics": metrics_as_evaluated(),
    "reference": {"source": "my_images", "split": "train", "num_images": 10000},
}


class RecordingHfApi:
    """Stands in for `huggingface_hub.HfApi`: records each call and its arguments, sends nothing."""

    def __init__(self, token=None, fail_whoami=False):
        self.token, self.fail_whoami, self.calls = token, fail_whoami, []

    def whoami(self):
        self.calls.append(("whoami", {}))
        if self.fail_whoami:
            raise OSError("offline")
        return {"name": "someone"}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def pipeline_folder(path, prediction_type="epsilon", config=None, report=None):
    torch.manual_seed(0)
    scheduler = DDPMTargetScheduler(prediction_type=prediction_type, beta_schedule="cosine")
    DDPMTargetPipeline(DDPMUNet.from_preset("ddpm-tiny-16"), scheduler).save_pretrained(path)
    (config or TrainingConfig(model="ddpm-tiny-16", prediction_type=prediction_type)).save(path / "training_config.json")
    Image.new("L", (8, 8)).save(path / "samples.png")
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "model.safetensors").write_bytes(b"x")
    (path / ".pipeline.tmp").mkdir()
    if report:
        (path / "eval_results.json").write_text(json.dumps(report))
    return path


def card_metadata(card: ModelCard) -> dict:
    return yaml.safe_load(str(card).split("---")[1])


def test_model_card_of_an_epsilon_model_with_metrics(tmp_path):
    folder = pipeline_folder(tmp_path / "p", report=REPORT)
    card = build_model_card(folder, "someone/fmnist-ddpm", license="mit")
    meta = card_metadata(card)
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert meta["tags"] == ["pytorch", "diffusers", "unconditional-image-generation", "ddpm"]
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["datasets"] == [BUNDLED_DATASET_ID]
    (index,) = meta["model-index"]
    assert index["name"] == "fmnist-ddpm"
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    reported = REPORT["metrics"]
    assert metrics == pytest.approx({  # every metric eval_metrics.py computes, as the model index's types
        "fid": reported["fid"], "kid": reported["kid_mean"], "inception_score": reported["isc_mean"],
        "precision": reported["precision"], "recall": reported["recall"], "bits_per_dim": 3.21,
    }, abs=1e-6)  # fmt: skip
    assert index["results"][0]["task"]["type"] == "unconditional-image-generation"
    body = card.text
    assert 'DDPMPipeline.from_pretrained("someone/fmnist-ddpm")().images[0]' in body
    assert "Stock diffusers is all it needs" in body and "pip install ddpm_pipeline" not in body
    assert "![samples from the EMA weights](samples.png)" in body
    assert "the noise ε" in body and "with the cosine noise schedule" in body
    assert "| `model` | `ddpm-tiny-16` |" in body and f"| FID | {reported['fid']:.4g} |" in body
    assert f"| KID | {reported['kid_mean']:.4g} ± {reported['kid_std']:.2g} |" in body
    assert f"| Inception Score | {reported['isc_mean']:.4g} ± {reported['isc_std']:.2g} |" in body
    assert "5000 samples with 1000 sampling steps against 10000 reference images (my_images, split train)" in body
    assert "over 1000 images of my_images, split test, 20 stratified timesteps per image" in body  # held out, it says
    # the bundled set is Fashion-MNIST's test set, though datasets names its one split "train"
    bundled = {**REPORT, "reference": {"source": "bundled", "split": "train", "num_images": 1000},
               "metrics": {**REPORT["metrics"], "bpd": {**REPORT["metrics"]["bpd"], "data": "bundled", "split": "train[:500]"}}}
    (folder / "eval_results.json").write_text(json.dumps(bundled))
    body = build_model_card(folder, "someone/fmnist-ddpm").text
    assert "against 1000 reference images (the bundled Fashion-MNIST test set)" in body
    assert "over 1000 images of the bundled Fashion-MNIST test set, split train[:500]," in body
    assert "padded" not in body
    # images padded onto the canvas: the card says their bound counts the image's own dimensions, and gives the other
    padded = {**bundled, "metrics": {**bundled["metrics"], "bpd": {**bundled["metrics"]["bpd"], "padded_images": 1000,
                                                                    "canvas_bits_per_dim": 2.4581}}}  # fmt: skip
    (folder / "eval_results.json").write_text(json.dumps(padded))
    body = build_model_card(folder, "someone/fmnist-ddpm").text
    assert "| NLL bound, bits/dim | 3.21 ± 0.02 |" in body
    assert ("1000 of them are padded onto the network's canvas: their bound is per dimension of the image itself, the "
            "padding not counted (per dimension of the canvas: 2.458).") in body  # fmt: skip


def test_model_card_names_a_sampler_other_than_the_folders_own(tmp_path):
    """FID of DDIM samples on trailing timesteps is not the ancestral sampler's: the card and the
    metric names say which; the folder's own sampler on leading timesteps needs no words."""
    report = {**REPORT, "model": "outputs/x", "num_inference_steps": 50, "options": {"scheduler": "ddim", "eta": 0.5},
              "sampling": {"scheduler": "DDIMScheduler", "timestep_spacing": "trailing"}}  # fmt: skip
    folder = pipeline_folder(tmp_path / "p", report=report)
    card = build_model_card(folder, "someone/x")
    assert "5000 samples with 50 sampling steps (DDIM, η = 0.5; trailing timesteps) against 10000 reference images" in card.text
    names = {m["name"] for result in card_metadata(card)["model-index"][0]["results"] for m in result["metrics"]}
    assert "FID (5000 samples, 50 steps; DDIM, η = 0.5; trailing timesteps)" in names
    report.update(options={"scheduler": "ddpm", "eta": 0.0}, sampling={"scheduler": "DDPMTargetScheduler", "timestep_spacing": "leading"})
    (folder / "eval_results.json").write_text(json.dumps(report))
    assert "5000 samples with 50 sampling steps against" in build_model_card(folder, "someone/x").text


def test_model_index_names_the_data_each_metric_was_measured_on(tmp_path):
    # FID against the bundled images (Fashion-MNIST's test split), bits/dim on a Hub data set's test
    # split: each result says so, not the data the model trained on; a report without kinds (older)
    # keeps the training data set
    report = {**REPORT, "reference": {"source": "bundled", "kind": "bundled", "location": "bundled", "split": "train"},
              "metrics": {"fid": 12.5, "bpd": {"bits_per_dim": 3.2, "num_images": 100, "timesteps": 20, "kind": "hub",
                                               "data": "someone/faces", "split": "test", "config": "small"}}}  # fmt: skip
    folder = pipeline_folder(tmp_path / "p", report=report)
    results = card_metadata(build_model_card(folder, "someone/x"))["model-index"][0]["results"]
    datasets = {result["metrics"][0]["type"]: result["dataset"] for result in results}
    assert datasets == {"fid": {"name": "Fashion-MNIST", "type": BUNDLED_DATASET_ID, "split": "test"},
                        "bits_per_dim": {"name": "someone/faces", "type": "someone/faces", "split": "test", "config": "small"}}
    report["reference"] = {"source": "/data/mine.npz", "kind": "imagefolder", "location": "/data/my_faces", "split": "train"}
    (folder / "eval_results.json").write_text(json.dumps(report))
    results = card_metadata(build_model_card(folder, "someone/x"))["model-index"][0]["results"]
    assert results[0]["dataset"] == {"name": "my_faces", "type": "custom", "split": "train"}  # local data: named, no Hub id
    body = build_model_card(folder, "someone/x").text
    assert "reference images (local data `mine.npz`, split train)" in body and "/data/" not in body  # no path of the disk
    del report["reference"]["kind"]
    (folder / "eval_results.json").write_text(json.dumps(report))
    results = card_metadata(build_model_card(folder, "someone/x"))["model-index"][0]["results"]
    assert results[0]["dataset"] == {"name": "Fashion-MNIST", "type": BUNDLED_DATASET_ID}  # pipeline_folder's training data


def test_model_card_of_a_folder_without_its_training_options_claims_no_training_data(tmp_path):
    folder = pipeline_folder(tmp_path / "p", report={**REPORT, "reference": {"source": "x.npz", "split": "train"}})
    (folder / "training_config.json").unlink()  # e.g. a pipeline saved with save_pretrained
    card = build_model_card(folder, "someone/x")
    assert "An unconditional DDPM (Ho et al. 2020) trained with [ddpm_pipeline]" in card.text  # on no named data
    assert "holds no `training_config.json`, so this card cannot say what the model was trained on" in card.text
    assert "datasets" not in card_metadata(card)
    assert card_metadata(card)["model-index"][0]["results"][0]["dataset"] == {"name": "custom", "type": "custom"}
    folder = pipeline_folder(tmp_path / "local", config=TrainingConfig(model="ddpm-tiny-16", train_data_dir="/data/faces"))
    card = build_model_card(folder, "someone/x").text
    assert "trained on a local image data set with" in card and "| `train_data_dir` | `faces` |" in card  # named only


def test_model_card_of_a_mu_model_says_the_package_is_needed(tmp_path):
    folder = pipeline_folder(tmp_path / "p", prediction_type="mu")
    card = build_model_card(folder, "someone/mu")
    assert "pip install ddpm_pipeline" in card.text and "the posterior mean μ" in card.text
    meta = card_metadata(card)
    assert "model-index" not in meta  # no evaluation report, no metrics claimed


def test_model_card_of_local_data_names_no_hub_dataset(tmp_path):
    config = TrainingConfig(model="ddpm-tiny-16", train_data_dir=str(tmp_path))
    card = build_model_card(pipeline_folder(tmp_path / "p", config=config), "someone/x")
    assert "datasets" not in card_metadata(card)
    config = TrainingConfig(model="ddpm-tiny-16", dataset_name="cifar10")
    card = build_model_card(pipeline_folder(tmp_path / "q", config=config), "someone/x")
    assert card_metadata(card)["datasets"] == ["cifar10"]


def test_model_card_of_a_fine_tuned_model_names_its_hub_base_model_and_says_so_of_a_local_one(tmp_path):
    config = TrainingConfig(pretrained_model_name_or_path="google/ddpm-cifar10-32")
    card = build_model_card(pipeline_folder(tmp_path / "p", config=config), "someone/x")
    assert card_metadata(card)["base_model"] == "google/ddpm-cifar10-32"
    assert "fine-tuned from [google/ddpm-cifar10-32](https://huggingface.co/google/ddpm-cifar10-32)" in card.text
    config = TrainingConfig(pretrained_model_name_or_path=str(tmp_path / "local-run"))  # a local folder: no base_model
    card = build_model_card(pipeline_folder(tmp_path / "q", config=config), "someone/x")
    assert "base_model" not in card_metadata(card)
    assert "fine-tuned from a local model (`local-run`)" in card.text and str(tmp_path) not in card.text
    assert "| `pretrained_model_name_or_path` | `local-run` |" in card.text


SUMMARY = {
    "global_step": 80000, "epochs": 170.666, "global_batch_size": 128, "num_processes": 2, "train_seconds": 9000.0,
    "device": "NVIDIA H100 80GB HBM3", "mixed_precision": "bf16",
    "data": {"source": "Hub data set cifar10, split train", "num_images": 60000, "fingerprint": "abc"},
    "recent_loss": {"steps": 100, "loss": 0.031234, "loss_q0": 0.08, "loss_q2": 0.01, "loss_q3": 0.002},
}  # fmt: skip


def test_model_card_tells_the_training_results(tmp_path):
    folder = pipeline_folder(tmp_path / "p")
    assert "## Training results" not in build_model_card(folder, "someone/x").text  # nothing to tell
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY))
    (folder / "loss_curve.png").write_bytes(b"png")
    text = build_model_card(folder, "someone/x").text
    results = text[text.index("## Training results"):text.index("## Training\n")]
    assert (
        "Trained for 80,000 optimizer steps of 128 images (171 epochs of 60,000 images), 2.5 h of training on "
        "2 × NVIDIA H100 80GB HBM3, bf16 mixed precision. The training loss averaged 0.03123 over the last 100 steps. "
        "By quarter of the timesteps, from the least noisy (t < T/4) to the noisiest: 0.08, –, 0.01, 0.002."
    ) in results
    assert "](loss_curve.png)" in results and "trajectory.png" not in results  # only the figures the folder has
    snapshot = pipeline_folder(tmp_path / "snapshot-2min")
    (snapshot / "snapshot.json").write_text(json.dumps({**SUMMARY, "global_step": 900, "epochs": 1.92, "train_seconds": 120.0,
                                                        "num_processes": 1, "mixed_precision": "no"}))  # fmt: skip
    assert "This snapshot was taken after 900 optimizer steps of 128 images (1.92 epochs of 60,000 images), 2.0 min of " \
           "training on NVIDIA H100 80GB HBM3, float32." in build_model_card(snapshot, "someone/x").text


def test_a_report_of_other_weights_is_refused_or_left_off(tmp_path):
    folder = pipeline_folder(tmp_path / "p", report={**REPORT, "model_training": {"global_step": 50000}})
    (folder / "training_summary.json").write_text(json.dumps(SUMMARY))  # trained on to step 80000 since
    with pytest.raises(ValueError, match=r"scored the model at another training step \(the report saw step 50000, the "
                                         r"folder holds step 80000\).* give the report of these weights as --eval_report"):
        build_model_card(folder, "someone/x")
    assert "model-index" not in card_metadata(build_model_card(folder, "someone/x", skip_stale_report=True))
    for report in ({**REPORT, "model_training": {"global_step": 80000}}, REPORT):  # its step, or no record: taken as is
        (folder / "eval_results.json").write_text(json.dumps(report))
        assert "model-index" in card_metadata(build_model_card(folder, "someone/x"))
    matching = {**REPORT, "weights": weights_fingerprint(str(folder)), "model_training": {"global_step": 1}}
    (folder / "eval_results.json").write_text(json.dumps(matching))  # the same weights, however the step was recorded
    assert "model-index" in card_metadata(build_model_card(folder, "someone/x"))


def test_model_card_needs_a_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        build_model_card(tmp_path, "someone/x")
    folder = pipeline_folder(tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="--eval_report"):
        build_model_card(folder, "someone/x", eval_report=tmp_path / "missing.json")


def test_push_makes_one_commit_of_the_folder_without_checkpoints(tmp_path):
    folder = pipeline_folder(tmp_path / "p", report=REPORT)
    (folder / "snapshot-2min" / "unet").mkdir(parents=True)
    (folder / "snapshot-2min" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"an earlier model")
    api = RecordingHfApi()
    info = push_to_hub(folder, "someone/fmnist-ddpm", private=True, api=api)
    assert info.commit_url.endswith("/commit/abc")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "someone/fmnist-ddpm", "repo_type": "model", "private": True, "exist_ok": True}
    upload = api.calls[1][1]
    assert upload["repo_id"] == "someone/fmnist-ddpm" and upload["folder_path"] == str(folder)
    assert upload["ignore_patterns"] == IGNORE_PATTERNS
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    sent = sorted(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert "README.md" in sent and "unet/diffusion_pytorch_model.safetensors" in sent and "eval_results.json" in sent
    assert not any(p.startswith(("checkpoint-", "snapshot-", ".")) for p in sent)
    assert ModelCard.load(folder / "README.md").data.library_name == "diffusers"


def test_push_leaves_the_samples_written_into_the_folder_local(tmp_path):
    folder = pipeline_folder(tmp_path / "p", report=REPORT)
    store = folder / "eval_results-samples"  # eval_metrics.py --output FOLDER/eval_results.json
    generated = folder / "generated"  # sample_ddpm.py --output_dir FOLDER/generated --npz
    for images in (store, store / "snapshot-2min", generated / "images"):
        images.mkdir(parents=True)
        (images / "sampling.json").write_text("{}")
        (images / "000000.png").write_bytes(b"a sample")
    (folder / "eval_results-grid.png").write_bytes(b"the evaluation's grid")
    (folder / "eval_results-bpd-partial").mkdir()  # an interrupted evaluation's bound terms
    (folder / "eval_results-bpd-partial" / "bound.json").write_text("{}")
    (folder / "eval_results-bpd-partial" / "batch-000000.pt").write_bytes(b"pickled terms")
    for name in ("grid.png", "sampling_report.json", "samples.npz"):
        (generated / name).write_bytes(b"sample_ddpm.py's output")
    api = RecordingHfApi()
    push_to_hub(folder, "someone/fmnist-ddpm", api=api)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    sent = set(filter_repo_objects(files, ignore_patterns=api.calls[1][1]["ignore_patterns"]))
    assert not any("sampling.json" in p or "000000.png" in p or p.endswith((".npz", ".pt")) or "bound" in p for p in sent)
    assert {"eval_results.json", "eval_results-grid.png", "generated/grid.png", "generated/sampling_report.json",
            "unet/diffusion_pytorch_model.safetensors", "README.md"} <= sent  # fmt: skip


def test_repo_id_and_hub_access_errors_are_clear(tmp_path):
    folder = pipeline_folder(tmp_path / "p")
    with pytest.raises(ValueError, match="user-or-org/model-name"):
        push_to_hub(folder, "no-namespace", api=RecordingHfApi())
    with pytest.raises(RuntimeError, match="hf auth login"):
        check_hub_access(api=RecordingHfApi(fail_whoami=True))
    with pytest.raises(SystemExit):
        push_module.main([str(tmp_path / "nowhere"), "--repo_id", "someone/x"])


def test_the_push_command_refuses_a_missing_or_wrong_eval_report_before_asking_the_hub(tmp_path, monkeypatch, capsys):
    folder = pipeline_folder(tmp_path / "p")
    apis = []
    monkeypatch.setattr(push_module, "HfApi", lambda token=None: apis.append(RecordingHfApi(token)) or apis[-1])
    summary = tmp_path / "results.json"  # what eval_metrics.py --snapshots writes (tests/test_evaluation.py)
    summary.write_text(json.dumps({"run": str(folder), "points": [{"name": "final", "report": "results-final.json"}]}))
    for report, message in [(tmp_path / "missing.json", "--eval_report .* does not exist"),
                            (summary, "summary of eval_metrics.py --snapshots.*results-final.json")]:  # fmt: skip
        with pytest.raises(SystemExit):
            push_module.main([str(folder), "--repo_id", "someone/x", "--eval_report", str(report)])
        assert re.search(message, capsys.readouterr().err)
    assert apis == []  # the Hub was not asked



def test_the_push_command_checks_the_hub_first_and_says_how_to_try_again(tmp_path, monkeypatch, capsys):
    folder = pipeline_folder(tmp_path / "p")
    monkeypatch.setattr(push_module, "HfApi", lambda token=None: RecordingHfApi(token, fail_whoami=True))
    with pytest.raises(SystemExit) as stopped:
        push_module.main([str(folder), "--repo_id", "someone/x", "--token", "hf_abc"])
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert "Cannot reach the Hugging Face Hub" in error and "run the same command again" in error and "Traceback" not in error
    assert not (folder / "README.md").exists()  # nothing written before the Hub answered
    apis = []
    monkeypatch.setattr(push_module, "HfApi", lambda token=None: apis.append(RecordingHfApi(token)) or apis[-1])
    push_module.main([str(folder), "--repo_id", "someone/x", "--token", "hf_abc"])
    assert [api.token for api in apis] == ["hf_abc"]
    assert [name for name, _ in apis[0].calls] == ["whoami", "create_repo", "upload_folder"]


def test_train_ddpm_push_to_hub(tmp_path, monkeypatch, fresh_accelerate_state):
    apis = []
    monkeypatch.setattr(push_module, "HfApi", lambda token=None: apis.append(RecordingHfApi(token)) or apis[-1])
    out = tmp_path / "run"
    train_main(["--model", "ddpm-tiny-16", "--resolution", "16", "--max_train_steps", "2", "--train_batch_size", "4",
                "--grid_inference_steps", "2", "--num_grid_images", "4", "--report_to", "none", "--output_dir", str(out),
                "--push_to_hub", "--hub_model_id", "someone/tiny", "--hub_private", "--hub_token", "hf_secret"])  # fmt: skip
    calls = [name for api in apis for name, _ in api.calls]
    assert calls == ["whoami", "create_repo", "upload_folder"]  # access checked at start-up, one commit at the end
    assert all(api.token == "hf_secret" for api in apis)
    assert (out / "README.md").is_file() and "someone/tiny" in (out / "README.md").read_text()
    assert "hf_secret" not in (out / "training_config.json").read_text()  # the token never reaches the disk
    # scored as eval_metrics.py scores it (its report names the weights), then trained further in place:
    # those scores are no longer this model's, and no push puts them on its card
    scored = {**REPORT, "weights": weights_fingerprint(str(out)), "model_training": {"global_step": 2}}
    (out / "eval_results.json").write_text(json.dumps(scored))
    assert "## Evaluation" in build_model_card(out, "someone/tiny").text
    train_main(["--model", "ddpm-tiny-16", "--resolution", "16", "--max_train_steps", "3", "--train_batch_size", "4",
                "--grid_inference_steps", "2", "--num_grid_images", "4", "--report_to", "none", "--output_dir", str(out),
                "--resume_from_checkpoint", "latest", "--push_to_hub", "--hub_model_id", "someone/tiny"])  # fmt: skip
    assert [name for name, _ in apis[-1].calls] == ["create_repo", "upload_folder"]  # the run's push went ahead
    assert "## Evaluation" not in (out / "README.md").read_text()  # without the earlier weights' scores
    with pytest.raises(ValueError, match=r"eval_results.json does not score the pipeline now in .*: the folder's UNet is not "
                                         r"the one it scored \(the report saw step 2, the folder holds step 3\)"):
        build_model_card(out, "someone/tiny")
    asked = len(apis)
    with pytest.raises(SystemExit):  # the push command refuses it before asking the Hub
        push_module.main([str(out), "--repo_id", "someone/tiny"])
    assert len(apis) == asked


class FailingUploadHfApi(RecordingHfApi):
    def upload_folder(self, **kwargs):
        raise OSError("connection reset by peer")


def test_a_failed_push_after_training_names_the_saved_folder_and_the_command_to_push_again(
    tmp_path, monkeypatch, fresh_accelerate_state
):
    monkeypatch.setattr(push_module, "HfApi", lambda token=None: FailingUploadHfApi(token))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="Training finished and everything is saved in") as failure:
        train_main(["--model", "ddpm-tiny-16", "--resolution", "16", "--max_train_steps", "1", "--train_batch_size", "4",
                    "--grid_inference_steps", "2", "--num_grid_images", "4", "--report_to", "none", "--output_dir",
                    str(out), "--push_to_hub", "--hub_model_id", "someone/tiny"])  # fmt: skip
    assert f"python -m ddpm_pipeline.push {out} --repo_id someone/tiny" in str(failure.value)
    assert "connection reset by peer" in str(failure.value)
    assert (out / "model_index.json").is_file() and (out / "checkpoint-1").is_dir()


def test_push_to_hub_without_a_repo_id_stops_before_training(tmp_path):
    with pytest.raises(SystemExit):
        TrainingConfig.from_args(["--push_to_hub", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--hub_model_id"):
        TrainingConfig(push_to_hub=True, hub_model_id="bad")


def test_card_file_is_replaced_atomically(tmp_path):
    folder = pipeline_folder(tmp_path / "p")
    (folder / "README.md").write_text("old")
    path = write_model_card(folder, "someone/x")
    assert path.read_text().startswith("---") and not list(folder.glob(".README*"))  # no partial write left
