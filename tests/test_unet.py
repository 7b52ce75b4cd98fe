"""DDPMUNet presets and their round trips through diffusers' loaders."""

import pytest
import torch
from conftest import public_config
from diffusers import UNet2DModel

from ddpm_pipeline import DDPMUNet
from ddpm_pipeline.unet_presets import downsampling_factor, nearest_trainable_size, preset_for_image_size


def test_cifar10_preset_is_the_ddpm_paper_network():
    unet = DDPMUNet.from_preset("ddpm-cifar10-32")
    num_params = sum(p.numel() for p in unet.parameters())
    assert num_params == 35_746_307  # "35.7M" in Ho et al. 2020
    config = unet.config
    assert tuple(config.block_out_channels) == (128, 256, 256, 256)
    assert tuple(config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert tuple(config.up_block_types) == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert (config.layers_per_block, config.sample_size, config.dropout) == (2, 32, 0.1)
    assert (config.flip_sin_to_cos, config.freq_shift, config.downsample_padding) == (False, 1, 0)


def test_preset_overrides():
    unet = DDPMUNet.from_preset("ddpm-cifar10-32", in_channels=1, dropout=0.0, block_out_channels=(32, 32, 32, 32))
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.dropout) == (1, 1, 0.0)
    assert DDPMUNet.preset_config("ddpm-small-32", in_channels=3, out_channels=6)["out_channels"] == 6
    with pytest.raises(ValueError, match="Unknown UNet preset 'ddpm-huge'.*ddpm-cifar10-32"):
        DDPMUNet.from_preset("ddpm-huge")
    with pytest.raises(ValueError, match="num_layers is not an option of diffusers' UNet2DModel, whose options are .*layers_per_block"):
        DDPMUNet.from_preset("ddpm-tiny-16", num_layers=3)
    with pytest.raises(ValueError, match=r"norm_groups \(did you mean norm_num_groups\?\), spam are not options"):
        DDPMUNet.preset_config("ddpm-tiny-16", norm_groups=4, spam=1)


@pytest.mark.parametrize("preset", ["ddpm-small-32", "ddpm-tiny-16"])
def test_save_load_with_ours_and_stock(tmp_path, preset):
    unet = DDPMUNet.from_preset(preset).eval()
    unet.save_pretrained(tmp_path)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size)
    t = torch.tensor([3, 900])
    with torch.no_grad():
        expected = unet(x, t).sample
    for cls in (DDPMUNet, UNet2DModel):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is cls
        assert public_config(loaded.config) == public_config(unet.config)
        with torch.no_grad():
            assert torch.equal(loaded(x, t).sample, expected)


# `google/ddpm-celebahq-256`'s unet/config.json (the church, bedroom and cat models share it),
# less the keys diffusers adds itself.
CELEBAHQ_256_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}


def test_celebahq_preset_is_the_published_256_network():
    config = DDPMUNet.preset_config("ddpm-celebahq-256")
    assert {key: config[key] for key in CELEBAHQ_256_CONFIG} == CELEBAHQ_256_CONFIG
    assert config["dropout"] == 0.0  # the published config leaves it at UNet2DModel's default
    with torch.device("meta"):  # counted without allocating 114M parameters
        unet = DDPMUNet.from_preset("ddpm-celebahq-256")
    assert sum(p.numel() for p in unet.parameters()) == 113_673_219  # "114M" in Ho et al. 2020


@pytest.mark.parametrize("preset", ["ddpm-cifar10-32", "ddpm-64", "ddpm-128", "ddpm-celebahq-256"])
def test_large_presets_attend_at_16x16_only(preset):
    config = DDPMUNet.preset_config(preset)
    down_sizes = {config["sample_size"] // 2**level for level, kind in enumerate(config["down_block_types"]) if "Attn" in kind}
    levels = len(config["up_block_types"])
    up_sizes = {config["sample_size"] // 2 ** (levels - 1 - level) for level, kind in enumerate(config["up_block_types"]) if "Attn" in kind}
    assert down_sizes == up_sizes == {16}
    assert config["sample_size"] % downsampling_factor(config) == 0 and config["layers_per_block"] == 2


def test_the_preset_for_each_image_size():
    assert [preset_for_image_size(size) for size in (8, 28, 29, 32, 33, 64, 100, 128, 256, 1024)] == [
        "ddpm-small-28", "ddpm-small-28", "ddpm-cifar10-32", "ddpm-cifar10-32", "ddpm-64", "ddpm-64", "ddpm-128",
        "ddpm-128", "ddpm-celebahq-256", "ddpm-celebahq-256",
    ]  # fmt: skip
    assert downsampling_factor(DDPMUNet.preset_config("ddpm-small-28")) == 4
    assert downsampling_factor(DDPMUNet.preset_config("ddpm-celebahq-256")) == 32
    # the nearest multiple, the larger one on a tie, never below the factor itself
    assert [nearest_trainable_size(size, 8) for size in (28, 29, 30, 31, 32, 36, 3)] == [32, 32, 32, 32, 32, 40, 8]
    assert [nearest_trainable_size(size, 16) for size in (100, 104, 120)] == [96, 112, 128]
