"""benchmarks/quality_fmnist.py at toy scale on the CPU: budgeted training (ours and the stock
recipe), sampling, FID/KID against the training statistics, bits/dim of the test split, the JSON
records, pieces that repeat an uninterrupted run, the real-data floor and the report."""

import gzip
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_benchmark, reset_accelerate
from PIL import Image
from pixel_features import FEATURES

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    module = load_benchmark("quality_fmnist")
    command = module.main

    def main(argv):
        """One command, with a fresh Accelerate state as a new process would have."""
        reset_accelerate()
        return command(argv)

    module.main = main
    return module


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files: 48 training and 24 test images of 12×12 smooth blobs."""
    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 48), ("t10k", 24)):
        coarse = rng.uniform(0, 255, (count, 3, 3))
        images = np.stack([np.asarray(Image.fromarray(c.astype(np.uint8)).resize((12, 12), Image.BILINEAR)) for c in coarse])
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    return folder


def toy_options(data: Path, work: Path) -> list[str]:
    return ["--data_dir", str(data), "--work_dir", str(work), "--model", "ddpm-tiny-16", "--unet_overrides", "{}", "--resolution", "16",
            "--num_train_timesteps", "40", "--batch_size", "8", "--budget", "4", "--budget_unit", "steps",
            "--milestones", "2", "--sampler_steps", "40,5", "--num_samples", "8", "--sample_batch_size", "4",
            "--bpd_num_images", "12", "--bpd_timesteps", "3", "--bpd_batch_size", "8", "--feature_extractor", FEATURES,
            "--device", "cpu", "--stock_check_every", "1"]  # fmt: skip


def run_in_pieces(study, argv: list[str]) -> int:
    """Repeat the command, each time stopped after its first unit of work, until it finishes."""
    commands = 0
    while True:
        commands += 1
        assert commands < 60, "the study does not finish in pieces"
        try:
            study.main([*argv, "--stop_after_minutes", "1e-9"])
            return commands
        except SystemExit as stop:
            assert stop.code == study.PIECE_OVER_EXIT


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("recipe", ["mu_vlb-cosine", "stock"])
def test_a_recipe_run_in_pieces_repeats_the_uninterrupted_run(tmp_path, fashion_like, recipe):
    study = load_study()
    whole = tmp_path / "whole"
    study.main(["run", recipe, *toy_options(fashion_like, whole)])
    records = records_of(whole / "results.jsonl")
    # one record per (milestone, sampler), in that order; bits/dim only for the final budget
    assert [(r["budget"], r["sampler_steps"]) for r in records] == [(2, 40), (2, 5), (4, 40), (4, 5)]
    assert [r["steps"] for r in records] == [2, 2, 4, 4]
    assert all(r["recipe"] == recipe and r["study"] == "quality_fmnist" and r["num_samples"] == 8 for r in records)
    assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 and np.isfinite(r["kid_mean"]) for r in records)
    assert "bpd" not in records[0] and records[2]["bpd"] == records[3]["bpd"] > 0
    assert records[2]["bpd_num_images"] == 12 and records[2]["bpd_timesteps"] == 3
    assert records[2]["final"] and not records[0]["final"]
    assert Path(records[2]["grid"]).is_file() and Path(records[2]["eval_report"]).is_file()
    expected = {"stock": ("stock diffusers", "epsilon", "linear", "simple"),
                "mu_vlb-cosine": ("ddpm_pipeline", "mu", "cosine", "vlb")}[recipe]  # fmt: skip
    assert (records[0]["trainer"], records[0]["prediction_type"], records[0]["beta_schedule"],
            records[0]["loss_weighting"]) == expected  # fmt: skip
    # the scores were taken against the whole training split (48 images), from the saved snapshots
    report = json.loads(Path(records[0]["eval_report"]).read_text())
    assert report["reference"]["num_images"] == 48 and report["num_inference_steps"] == 40
    assert records[0]["reference"]["num_images"] == 48 and records[0]["feature_extractor"]["name"] == FEATURES
    assert records[0]["command"].startswith(f"python benchmarks/quality_fmnist.py run {recipe} --data_dir")

    # Again, each command stopped after one unit of work: the same records.
    pieces = tmp_path / "pieces"
    commands = run_in_pieces(study, ["run", recipe, *toy_options(fashion_like, pieces)])
    assert commands > 10
    split = records_of(pieces / "results.jsonl")
    for one, other in zip(records, split, strict=True):
        for key in ("steps", "sampler_steps", "num_samples"):
            assert one[key] == other[key]
        assert ("bpd" in one) == ("bpd" in other)
        for key in ("fid", "kid_mean", "bpd"):
            if key in one:
                assert one[key] == pytest.approx(other[key], rel=1e-6, abs=1e-9)

    # a finished recipe is not recorded twice; other options for the same run folder are refused
    study.main(["run", recipe, *toy_options(fashion_like, whole)])
    assert len(records_of(whole / "results.jsonl")) == 4
    with pytest.raises(ValueError, match="other options"):
        study.main(["run", recipe, *toy_options(fashion_like, whole), "--num_samples", "6"])


def test_our_recipes_pass_train_ddpm_options_and_the_stock_recipe_refuses_them(tmp_path, fashion_like):
    study = load_study()
    work = tmp_path / "work"
    options = [*toy_options(fashion_like, work), "--milestones", "", "--budget", "2", "--sampler_steps", "5",
               "--no-bpd", "--learning_rate", "1e-3", "--random_flip"]  # fmt: skip
    records = study.main(["run", "eps-linear", *options])
    assert [r["train_options"] for r in records] == [["--learning_rate", "1e-3", "--random_flip"]]
    saved = json.loads((Path(records[0]["eval_report"]).parent / "model-2steps" / "training_config.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["random_flip"] and saved["prediction_type"] == "epsilon"
    assert saved["lr_scheduler"] == "constant_with_warmup" and saved["train_batch_size"] == 8
    assert "bpd" not in records[0]
    with pytest.raises(ValueError, match="stock recipe takes none"):
        study.main(["run", "stock", *options])


def test_real_data_floor_and_report(tmp_path, fashion_like):
    study = load_study()
    work = tmp_path / "work"
    floor = study.main(["floor", *toy_options(fashion_like, work)])
    assert floor["recipe"] == "real data" and floor["num_samples"] == 8 and floor["fid"] >= 0
    # a pilot's subset of the training images is its own data set, and so its own FID reference
    pilot = study.main(["floor", *toy_options(fashion_like, work), "--train_images", "20"])
    assert floor["reference"]["source"].endswith("train") and pilot["reference"]["source"].endswith("train-first-20")
    assert len(study.DataSource.parse(pilot["reference"]["source"]).load()) == 20 and pilot["fid"] != floor["fid"]
    with pytest.raises(ValueError, match="--train_images must lie in"):
        study.main(["floor", *toy_options(fashion_like, tmp_path / "other"), "--train_images", "49"])
    # the floor images are the test images, padded as the training images are
    first = np.asarray(Image.open(work / "floor-test-8" / "000000.png"))
    assert first.shape == (16, 16) and not first[:2].any() and not first[:, -2:].any()

    def record(recipe, minutes, steps, fid, final=True, **extra):
        return {"study": "quality_fmnist", "recipe": recipe, "prediction_type": "epsilon", "beta_schedule": "cosine",
                "loss_weighting": "simple", "steps": 100, "train_minutes": minutes, "sampler_steps": steps,
                "num_samples": 5000, "fid": fid, "kid_mean": fid / 1000, "final": final, **extra}  # fmt: skip

    results = work / "results.jsonl"
    with results.open("a") as handle:
        for item in [record("eps-cosine", 1.0, 1000, 30.0, final=False), record("eps-cosine", 5.0, 1000, 12.0, bpd=3.2, bpd_stderr=0.01),
                     record("eps-cosine", 5.0, 100, 15.0), record("x0-linear", 5.0, 1000, 20.0, grid=floor["grid"]),
                     record("stock", 5.0, 1000, 40.0), record("stock", 5.0, 100, 44.0)]:  # fmt: skip
            handle.write(json.dumps(item) + "\n")
    plot, markdown, grids = tmp_path / "fid.png", tmp_path / "study.md", tmp_path / "grids.png"
    text = study.main(["report", "--results", str(results), "--plot", str(plot), "--markdown", str(markdown),
                       "--grids", str(grids)])  # fmt: skip
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| recipe |") and "FID-5k @1000" in rows[0] and "FID-5k @100" in rows[0]
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| eps-cosine", "| x0-linear", "| stock", "| real data (8 test images)"]
    assert "| 12.00 | 15.00 | 12.00 | 3.200 ± 0.010 |" in rows[2] and "| 20.00 | – |" in rows[3]
    assert "Best recipe eps-cosine: FID 12.00 vs stock diffusers 40.00 at 1000 sampling steps (ratio 0.30" in text
    assert markdown.read_text().strip() == text.strip()
    with Image.open(plot) as image:
        assert image.size[0] > 400
    # the recipes with a grid (x0-linear here) and the floor's, side by side
    assert f"![samples of each recipe (1000 sampling steps)]({grids})" in text
    with Image.open(grids) as image:
        assert image.size[0] > 1.5 * image.size[1]  # two panels in one row


def test_report_over_seeds(tmp_path, fashion_like):
    """A recipe repeated at other seeds runs in a folder of its own, and the report gives each
    cell as mean ± std over the seeds and compares the best two seed by seed."""
    study = load_study()
    options = ["--work_dir", str(tmp_path), "--data_dir", str(fashion_like), "--budget", "600", "--budget_unit", "steps"]
    folders = [study.Study(study.build_parser().parse_args(["run", "eps-cosine", *options, "--seed", str(seed)])).run_dir("eps-cosine")
               for seed in (0, 2)]  # fmt: skip
    assert [folder.name for folder in folders] == ["eps-cosine-600steps", "eps-cosine-600steps-seed2"]

    def record(recipe, seed, fid, bpd):
        return {"study": "quality_fmnist", "recipe": recipe, "seed": seed, "prediction_type": "epsilon", "beta_schedule": "cosine",
                "loss_weighting": "simple", "steps": 600, "train_minutes": 7.0 + seed, "sampler_steps": 50, "budget": 600,
                "num_samples": 500, "fid": fid, "kid_mean": fid / 1000, "final": True, "bpd": bpd, "bpd_stderr": 0.25}  # fmt: skip

    records = [record("eps-cosine", 0, 80.0, 4.5), record("eps-cosine", 1, 84.0, 4.4), record("eps-cosine", 2, 82.0, 4.6),
               record("eps-linear", 0, 85.0, 4.7), record("eps-linear", 1, 83.0, 4.8), record("stock", 0, 250.0, 6.2)]  # fmt: skip
    text = study.report(records, plot=tmp_path / "fid.png")
    assert (tmp_path / "fid.png").is_file()  # the best two, each at its mean over seeds
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[2] == "| eps-cosine | epsilon | cosine | simple | 0, 1, 2 | 600 | 8.00 ± 1.00 | 82.00 ± 2.00 | 82.00 ± 2.00 | 4.500 ± 0.100 |"
    assert rows[3].startswith("| eps-linear | epsilon | cosine | simple | 0, 1 | 600 | 7.50 ± 0.71 | 84.00 ± 1.41 |")
    assert rows[4].endswith("| 0 | 600 | 7.00 | 250.00 | 250.00 | 6.200 ± 0.250 |")  # one seed: bits/dim ± its standard error
    assert "Best recipe eps-cosine: FID 82.00 vs stock diffusers 250.00 at 50 sampling steps (ratio 0.33" in text
    assert ("Seed by seed (0, 1), eps-cosine minus eps-linear at 50 sampling steps: FID -5.00, +1.00 (mean -2.00); "
            "eps-cosine is better at 1 of 2 seeds.") in text  # fmt: skip


def test_sessions_take_the_next_recipe_and_collect_their_records(tmp_path, fashion_like):
    """A GPU session runs one recipe (the first of the study's order that no record has) and its
    quality.tgz is collected here into the records kept in the repository, grids and all."""
    study = load_study()
    work = tmp_path / "device" / "runs" / "quality-fmnist"
    floor = study.main(["floor", *toy_options(fashion_like, work)])
    results = work / "results.jsonl"
    assert study.next_recipe(study.read_records([results])) == "eps-cosine"  # the floor is no recipe

    # a recipe's records as the device writes them: paths as seen from the device's repository root
    run = work / "runs" / "eps-cosine-5min"
    run.mkdir(parents=True)
    grid = run / "eval-5min-1000steps-grid.png"
    Image.new("L", (16, 16)).save(grid)
    (run / "bpd.json").write_text("{}")
    device_path = f"runs/quality-fmnist/runs/eps-cosine-5min/{grid.name}"
    record = {"study": "quality_fmnist", "recipe": "eps-cosine", "prediction_type": "epsilon", "beta_schedule": "cosine",
              "loss_weighting": "simple", "steps": 900, "train_minutes": 5.0, "sampler_steps": 1000, "num_samples": 5000,
              "fid": 12.0, "kid_mean": 0.01, "final": True, "seed": 0, "budget": 5.0, "budget_unit": "minutes",
              "date": "2026-12-02T00:00:00+00:00", "grid": device_path, "eval_report": device_path.replace("-grid.png", ".json")}  # fmt: skip
    with results.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    (work / "session.log").write_text("== setup\n")
    assert study.next_recipe(study.read_records([results])) == "stock"
    assert study.next_recipe(study.read_records([results]), seed=1) == "eps-cosine"  # another seed is another study
    assert study.next_recipe(study.read_records([results]), budget=10.0) == "eps-cosine"
    everything = [{**record, "recipe": name} for name in study.STUDY_ORDER]
    assert study.next_recipe(everything) is None

    archive = tmp_path / "quality.tgz"  # what quality_session.sh returns
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and "samples" not in path.parent.name and path.parent.name != "data" and "cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(work)))
    kept = tmp_path / "kept"
    added = study.main(["collect", str(archive), "--into", str(kept)])
    assert [r["recipe"] for r in added] == ["real data", "eps-cosine"]
    by_recipe = {r["recipe"]: r for r in records_of(kept / "records.jsonl")}
    assert by_recipe["eps-cosine"]["grid"] == str(kept / "runs" / "eps-cosine-5min" / grid.name)
    assert Path(by_recipe["eps-cosine"]["grid"]).is_file() and Path(by_recipe["real data"]["grid"]).is_file()
    assert Path(floor["grid"]).name == Path(by_recipe["real data"]["grid"]).name
    assert (kept / "runs" / "eps-cosine-5min" / "bpd.json").is_file() and len(list((kept / "logs").glob("session-*.log"))) == 1
    study_md = (kept / "study.md").read_text()
    assert "| eps-cosine |" in study_md and "real data (8 test images)" in study_md and (kept / "sample_grids.png").is_file()
    # the next session's `next` reads the kept records; collecting the same archive again adds nothing
    assert study.main(["next", "--records", str(kept / "records.jsonl"), str(tmp_path / "none.jsonl"), "--milestones", "1,2"]) == "stock"
    assert study.main(["collect", str(archive), "--into", str(kept)]) == []
    assert len(records_of(kept / "records.jsonl")) == 2
