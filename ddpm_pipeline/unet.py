"""`DDPMUNet`: diffusers' `UNet2DModel` with named architecture presets."""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import UNet2DModel

# Settings every preset shares: the DDPM paper's network as ported to diffusers
# (`google/ddpm-cifar10-32`): sinusoidal time embedding without the cos/sin flip and with
# frequency shift 1, no padding in the strided downsampling convolutions, single-head attention.
_DDPM_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "center_input_sample": False,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-6,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters, attention at 16x16, dropout 0.1.
    "ddpm-cifar10-32": {
        **_DDPM_COMMON,
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "dropout": 0.1,
    },
    # The same design, narrowed for a CPU: attention only in the 8x8 middle block.
    "ddpm-small-32": {
        **_DDPM_COMMON,
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
    # The main job's network: Fashion-MNIST at its native 28x28 (levels 28, 14, 7) on two CPU cores.
    "ddpm-small-28": {
        **_DDPM_COMMON,
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (24, 48, 96),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
    # For tests: a few thousand parameters per block, 16x16.
    "ddpm-tiny-16": {
        **_DDPM_COMMON,
        "sample_size": 16,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": (16, 32),
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "dropout": 0.0,
    },
}


class DDPMUNet(UNet2DModel):
    """A `UNet2DModel` built from a named preset; its folders load with the stock class too.

    It adds no configuration of its own, so ``UNet2DModel.from_pretrained`` reads what
    ``DDPMUNet.save_pretrained`` writes, and pipelines record it as a stock ``UNet2DModel``.
    """

    @classmethod
    def preset_names(cls) -> list[str]:
        """The names :meth:`from_preset` accepts."""
        return sorted(PRESETS)

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> dict[str, Any]:
        """The `UNet2DModel` config of preset ``name`` with ``overrides`` applied.

        Giving ``in_channels`` alone sets ``out_channels`` to the same value (a DDPM predicts a
        tensor shaped like its input).
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown UNet preset {name!r}: choose one of {', '.join(cls.preset_names())}.")
        allowed = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(
                f"{', '.join(unknown)} {'is not' if len(unknown) == 1 else 'are not'} UNet2DModel option(s)."
            )
        # lists, as JSON gives them back, so a reloaded config compares equal
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in {**PRESETS[name], **overrides}.items()}
        if "in_channels" in overrides and "out_channels" not in overrides:
            config["out_channels"] = overrides["in_channels"]
        return config

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> DDPMUNet:
        """A freshly initialized network of preset ``name`` (see :data:`PRESETS`), e.g.
        ``DDPMUNet.from_preset("ddpm-cifar10-32", in_channels=1)``."""
        return cls(**cls.preset_config(name, **overrides))
