"""The UNet presets as plain data: the diffusers `UNet2DModel` configs that ``--model`` names, which
preset a run without ``--model`` gets for its image size, and the sizes a network can take.

Free of torch and diffusers, so that the command lines read them (``--help``, ``--model`` choices)
without loading either; :class:`~ddpm_pipeline.unet.DDPMUNet` builds the networks.
"""

from __future__ import annotations

from typing import Any

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


def _ddpm_design(sample_size: int, block_out_channels: tuple[int, ...], dropout: float) -> dict[str, Any]:
    """The DDPM paper's network for RGB ``sample_size`` images: two ResNet blocks per level of
    ``block_out_channels`` and self-attention at the level whose feature maps are 16x16 (level
    ``log2(sample_size / 16)`` on the way down, its mirror on the way up)."""
    attention_level = (sample_size // 16).bit_length() - 1
    down = ["AttnDownBlock2D" if level == attention_level else "DownBlock2D" for level in range(len(block_out_channels))]
    return {
        **_DDPM_COMMON,
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 2,
        "block_out_channels": block_out_channels,
        "down_block_types": tuple(down),
        "up_block_types": tuple(kind.replace("Down", "Up") for kind in reversed(down)),
        "norm_num_groups": 32,
        "dropout": dropout,
    }


def _cpu_design(sample_size: int, block_out_channels: tuple[int, ...]) -> dict[str, Any]:
    """The DDPM design narrowed for a CPU, for grayscale ``sample_size`` images: one ResNet block per
    level of ``block_out_channels``, no attention in the levels (the middle block keeps
    ``UNet2DModel``'s), 8 normalization groups and no dropout."""
    levels = len(block_out_channels)
    return {
        **_DDPM_COMMON,
        "sample_size": sample_size,
        "in_channels": 1,
        "out_channels": 1,
        "layers_per_block": 1,
        "block_out_channels": block_out_channels,
        "down_block_types": ("DownBlock2D",) * levels,
        "up_block_types": ("UpBlock2D",) * levels,
        "norm_num_groups": 8,
        "dropout": 0.0,
    }


PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters, attention at 16x16, dropout 0.1.
    "ddpm-cifar10-32": _ddpm_design(32, (128, 256, 256, 256), dropout=0.1),
    # The same design, narrowed for a CPU: attention only in the 8x8 middle block.
    "ddpm-small-32": _cpu_design(32, (32, 64, 128)),
    # The main job's network: Fashion-MNIST at its native 28x28 (levels 28, 14, 7) on two CPU cores.
    "ddpm-small-28": _cpu_design(28, (24, 48, 96)),
    # Larger images, the DDPM design carried to them with guided-diffusion's channel multipliers,
    # (1,2,3,4) at 64 and (1,1,2,3,4) at 128. Dropout 0.1 as for CIFAR-10: own data sets are small.
    "ddpm-64": _ddpm_design(64, (128, 256, 384, 512), dropout=0.1),
    "ddpm-128": _ddpm_design(128, (128, 128, 256, 384, 512), dropout=0.1),
    # Ho et al. 2020, CelebA-HQ and LSUN at 256x256 (`google/ddpm-celebahq-256`, and the church,
    # bedroom and cat models): channel multipliers (1,1,2,2,4,4), no dropout.
    "ddpm-celebahq-256": _ddpm_design(256, (128, 128, 256, 256, 512, 512), dropout=0.0),
    # For tests: a few thousand parameters per block, 16x16.
    "ddpm-tiny-16": _cpu_design(16, (16, 32)),
}

#: The presets made to train on a CPU (the others are the DDPM paper's GPU-sized designs).
CPU_PRESETS = ("ddpm-tiny-16", "ddpm-small-28", "ddpm-small-32")

#: Without ``--model``, the network for images of a given size: the first preset made for images
#: at least that large, else the last (see :func:`preset_for_image_size`).
PRESETS_BY_IMAGE_SIZE: tuple[tuple[int, str], ...] = (
    (28, "ddpm-small-28"),
    (32, "ddpm-cifar10-32"),
    (64, "ddpm-64"),
    (128, "ddpm-128"),
    (256, "ddpm-celebahq-256"),
)


def preset_for_image_size(size: int) -> str:
    """The preset for ``size``-pixel images: the smallest made for images at least that large
    (:data:`PRESETS_BY_IMAGE_SIZE`: the main job's small CPU network up to 28 pixels, then the DDPM
    paper's CIFAR-10 network, and its design at 64, 128 and 256), or the largest."""
    for largest, name in PRESETS_BY_IMAGE_SIZE:
        if size <= largest:
            return name
    return PRESETS_BY_IMAGE_SIZE[-1][1]


def sample_height_width(sample_size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """A `UNet2DModel`'s ``sample_size`` (one size, or ``[height, width]``) as ``(height, width)``."""
    if isinstance(sample_size, int):
        return sample_size, sample_size
    height, width = sample_size
    return int(height), int(width)


def describe_sample_size(sample_size: int | list[int] | tuple[int, int]) -> str:
    """``"32²"`` for a square ``sample_size``, ``"32×64"`` (height × width) otherwise."""
    height, width = sample_height_width(sample_size)
    return f"{height}²" if height == width else f"{height}×{width}"


def downsampling_factor(config: dict[str, Any]) -> int:
    """How much a `UNet2DModel` shrinks its input: ``2^(levels - 1)``, each level but the last
    halving it; image sides must be multiples of it."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def nearest_trainable_size(size: int, factor: int) -> int:
    """The multiple of ``factor`` nearest ``size`` (the larger one on a tie: padding a little beats
    cropping), at least ``factor``."""
    return max(factor, (size + factor // 2) // factor * factor)
