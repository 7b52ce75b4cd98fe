"""DDPMUNet presets and their round trips through diffusers' loaders."""

import pytest
import torch
from conftest import public_config
from diffusers import UNet2DModel

from ddpm_pipeline import DDPMUNet


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
    with pytest.raises(ValueError, match="num_layers is not"):
        DDPMUNet.from_preset("ddpm-tiny-16", num_layers=3)


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
