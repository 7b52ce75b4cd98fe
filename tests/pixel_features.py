"""A tiny torch-fidelity feature extractor for tests: features and logits are simple functions of
the pixels (exact results, no Inception network, no download). Importing registers it as
``"test-features"``."""

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

FEATURES = "test-features"


class PixelFeatures(FeatureExtractorBase):
    """"2048": 16 block means of the image; "logits_unbiased": 4 logits from the channel means.
    Counts its forward calls so tests can tell a cache hit from a recomputation."""

    calls = 0

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list():
        return "2048", "logits_unbiased"

    def forward(self, x):
        PixelFeatures.calls += 1
        images = x.float() / 255.0
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.mean(1, keepdim=True), 4).flatten(1)
        logits = logits_of(images)
        out = {"2048": pooled, "logits_unbiased": logits}
        return tuple(out[name] for name in self.features_list)


def logits_of(images: torch.Tensor) -> torch.Tensor:
    mean = images.mean(dim=(1, 2, 3))
    return torch.stack([8 * mean, -8 * mean, 4 * mean**2, torch.zeros_like(mean)], dim=1)


if FEATURES not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(FEATURES, PixelFeatures)
