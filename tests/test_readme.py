"""The README stays true to the code: every option it names exists, and every link it makes resolves."""

import argparse
import re
from pathlib import Path

import pytest
from conftest import load_benchmark

from ddpm_pipeline import convert, evaluation, generation, inception_weights, push, training
from ddpm_pipeline.training_config import DIFFUSERS_EXAMPLE_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

#: options of the other programs the README names: `accelerate launch`, pip, tensorboard, SLURM's sbatch
OTHER_PROGRAMS_OPTIONS = {
    "config_file", "multi_gpu", "num_processes", "num_machines", "machine_rank", "main_process_ip",
    "main_process_port", "cpu", "no-deps", "logdir", "signal",
}  # fmt: skip


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every ``--name`` of ``parser`` and of its sub-commands, without the dashes."""
    names = set()
    for action in parser._actions:
        names.update(option[2:] for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= _option_names(subparser)
    return names


def _command_line_options(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The options of every command line of the project, read off the parser each one builds."""

    def capture(parser, args=None, namespace=None):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    mains = [training.main, evaluation.main, generation.main, convert.main, push.main, inception_weights.main]
    benchmarks = [load_benchmark(path.stem) for path in sorted((ROOT / "benchmarks").glob("*.py"))]
    mains += [getattr(module, "main", None) for module in benchmarks]  # a library of the others has none
    names = set()
    for main in filter(None, mains):
        with pytest.raises(_Parsed) as parsed:
            main(["--help"])
        names |= _option_names(parsed.value.parser)
    return names


def test_every_option_the_readme_names_exists(monkeypatch):
    known = _command_line_options(monkeypatch) | OTHER_PROGRAMS_OPTIONS
    known |= {name[2:] for name in DIFFUSERS_EXAMPLE_OPTIONS}  # named to say what this script calls them
    assert {"output_dir", "compile_unet", "no-compile_unet", "sampling_dtype", "repo_id", "milestones"} <= known
    named = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9_-]*)", README))
    # `--no-…` and `--snapshot_*` name a family: some option must start so
    families = {name for name in named if name.endswith(("-", "_"))}
    unknown = sorted(name for name in named - families if name not in known)
    assert not unknown, f"the README names options that no command line has: {unknown}"
    for family in families:
        assert any(name.startswith(family) for name in known), family


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_readme_resolves():
    anchors = {_github_anchor(line.lstrip("#")) for line in README.splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert len(links) > 10
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        path, _, anchor = link.partition("#")
        if path:
            assert (ROOT / path).exists(), f"the README links to {path}, which is not in the repository"
        else:
            assert anchor in anchors, f"the README links to #{anchor}, which no heading has"
