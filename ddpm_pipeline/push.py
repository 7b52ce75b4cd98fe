"""Publish a trained pipeline folder on the Hugging Face Hub, with its model card.

    python -m ddpm_pipeline.push outputs/ddpm-fashion-mnist --repo_id USER/NAME [--private] [--token T]

One push is one commit (`HfApi.upload_folder`): the repo is created if needed, large files go
through the Hub's LFS storage, files the Hub already holds are not sent again (so a push that
was interrupted can simply be repeated), and pushing an unchanged folder makes no new commit.
Checkpoints and temporary folders stay local.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi

from .bound_store import SETTINGS_FILE as BOUND_SETTINGS_FILE
from .console import run_command
from .generation import NPZ_NAME, REPORT_NAME
from .model_card import load_eval_report, write_model_card
from .sample_store import SETTINGS_FILE

logger = logging.getLogger(__name__)

#: What stays local: resumable checkpoints, --snapshot_* pipelines and the temporary folders of atomic writes.
IGNORE_PATTERNS = ["checkpoint-*", "snapshot-*", ".*", "*.tmp", "*.partial"]


def sample_patterns(folder: str | Path) -> list[str]:
    """The ignore patterns of the samples written into ``folder``, found in one walk: each folder of
    numbered sample PNGs (one that holds a ``sampling.json``, such as the ``eval_results-samples/``
    of ``eval_metrics.py --output FOLDER/eval_results.json``: up to 50,000 images), each folder of an
    interrupted evaluation's bound terms (``bound.json``, pickled ``.pt`` batches) and each
    ``samples.npz`` that ``sample_ddpm.py`` wrote (beside its ``sampling_report.json``). Those are
    evaluation data, not the model; their grids and reports, a few kB, are pushed."""
    folder = Path(folder)
    patterns = []
    for path in sorted(folder.rglob("*")):
        if path.name in (SETTINGS_FILE, BOUND_SETTINGS_FILE):
            patterns.append(f"{path.parent.relative_to(folder).as_posix()}/*")
        elif path.name == NPZ_NAME and (path.parent / REPORT_NAME).is_file():
            patterns.append(path.relative_to(folder).as_posix())
    return patterns


def check_repo_id(repo_id: str | None) -> str:
    """``repo_id`` if it has the ``namespace/name`` form the Hub expects, else a clear error."""
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(
            f"--hub_model_id / --repo_id must be 'user-or-org/model-name', got {repo_id!r}."
        )
    return repo_id


#: what a training run that cannot reach the Hub at start-up is told
TRAINING_HUB_ADVICE = ("Log in with `hf auth login` or pass --hub_token; or drop --push_to_hub and push the finished "
                       "folder later with `python -m ddpm_pipeline.push OUTPUT_DIR --repo_id USER/NAME`.")  # fmt: skip
#: what `python -m ddpm_pipeline.push` is told when it cannot reach the Hub
PUSH_HUB_ADVICE = ("Log in with `hf auth login` or pass --token, and check that this machine reaches huggingface.co "
                   "(HF_HUB_OFFLINE unset); the folder is unchanged, so run the same command again then.")  # fmt: skip


def check_hub_access(token: str | None = None, api: HfApi | None = None, advice: str = TRAINING_HUB_ADVICE) -> str:
    """The Hub user name the token (or saved login) belongs to; a clear error when there is none,
    so a training run that is to be pushed fails at start-up rather than after training, and a push
    fails before it writes anything."""
    api = api or HfApi(token=token)
    try:
        return api.whoami()["name"]
    except Exception as error:  # offline, no login, bad token: all mean the push cannot happen
        raise RuntimeError(f"Cannot reach the Hugging Face Hub with these credentials ({type(error).__name__}: {error}). {advice}") from error


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    license: str = "apache-2.0",
    eval_report: str | Path | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
    skip_stale_report: bool = False,
) -> Any:
    """Write the model card into ``folder`` and upload the folder to ``repo_id`` in one commit.

    An evaluation report of other weights than the folder's is refused, or with
    ``skip_stale_report`` (a training run's own push) left off the card
    (:func:`~ddpm_pipeline.model_card.load_eval_report`).
    Returns `upload_folder`'s `CommitInfo` (its ``commit_url``). ``api`` defaults to
    ``HfApi(token=token)``; ``token=None`` uses the locally saved login (``hf auth login``).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    card = write_model_card(folder, repo_id, license=license, eval_report=eval_report, skip_stale_report=skip_stale_report)
    logger.info(f"wrote the model card {card}")
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    samples = sample_patterns(folder)
    logger.info(f"uploading {folder} to {url}" + (f"; its samples stay local ({', '.join(samples)})" if samples else ""))
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        commit_message=commit_message or f"Upload DDPM pipeline from {folder.name}",
        ignore_patterns=IGNORE_PATTERNS + samples,
    )


def main(argv: list[str] | None = None) -> Any:
    """The ``python -m ddpm_pipeline.push`` command line."""
    parser = argparse.ArgumentParser(prog="python -m ddpm_pipeline.push", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="a train_ddpm.py --output_dir (or any DDPMPipeline folder)")
    parser.add_argument("--repo_id", required=True, help="user-or-org/model-name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", help="a Hub token with write access (default: the saved login)")
    parser.add_argument("--license", default="apache-2.0", help="the license in the card's metadata")
    parser.add_argument("--eval_report", type=Path, help="eval_metrics.py's JSON (default: FOLDER/eval_results.json if present)")
    parser.add_argument("--commit_message")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        check_repo_id(args.repo_id)
        if not (args.folder / "model_index.json").is_file():
            raise FileNotFoundError(f"{args.folder} has no model_index.json: give a finished train_ddpm.py --output_dir.")
        load_eval_report(args.folder, args.eval_report)  # a missing or wrong report, before the Hub is asked
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    api = HfApi(token=args.token)
    try:
        user = check_hub_access(api=api, advice=PUSH_HUB_ADVICE)
    except RuntimeError as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    logger.info(f"pushing to {args.repo_id} as {user}")
    info = push_to_hub(args.folder, args.repo_id, private=args.private, license=args.license,
                       eval_report=args.eval_report, commit_message=args.commit_message, api=api)  # fmt: skip
    print(getattr(info, "commit_url", info))
    return info


if __name__ == "__main__":
    run_command(main, "python -m ddpm_pipeline.push")
