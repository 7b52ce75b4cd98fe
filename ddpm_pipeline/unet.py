"""`DDPMUNet`: diffusers' `UNet2DModel` with named architecture presets."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from diffusers import UNet2DModel

from .unet_presets import PRESETS


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
            close = {name: difflib.get_close_matches(name, allowed, n=1) for name in unknown}
            named = ", ".join(f"{name} (did you mean {close[name][0]}?)" if close[name] else name for name in unknown)
            raise ValueError(
                f"{named} {'is not an option' if len(unknown) == 1 else 'are not options'} of diffusers' UNet2DModel, "
                f"whose options are {', '.join(sorted(allowed))}."
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
