"""The stock diffusers recipe the benchmarks compare against: diffusers'
``examples/unconditional_image_generation/train_unconditional.py``, step for step.

``UNet2DModel`` + ``DDPMScheduler`` (ε target, linear schedule) + ``AdamW(lr 1e-4, betas (0.95,
0.999), weight decay 1e-6, eps 1e-8)`` + a cosine learning rate with 500 warm-up steps + ``EMAModel``
(max decay 0.9999, warm-up 1 - (1 + n)^-3/4, no foreach) + gradient clipping at 1 and, on CUDA, fp16
autocast with a ``GradScaler`` (the example's ``--mixed_precision fp16``) under torch's default TF32
flags (convolutions yes, matmuls no). The loss is ``mse(output.float(), noise)``.

What differs from the example is only where the batch comes from: the benchmarks hand it images
already on the device, and noise and timesteps come from a seeded generator (so a run split into
pieces repeats an unsplit one).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

#: The example's defaults (``train_unconditional.py --help``) that the benchmarks keep.
STOCK_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "adam_betas": (0.95, 0.999),
    "adam_weight_decay": 1e-6,
    "adam_epsilon": 1e-8,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 500,
    "num_epochs": 100,
    "ema_max_decay": 0.9999,
    "ema_inv_gamma": 1.0,
    "ema_power": 0.75,
    "max_grad_norm": 1.0,
    "prediction_type": "epsilon",
    "beta_schedule": "linear",
}


def use_torch_default_tf32() -> None:
    """torch's own TF32 defaults, which the example runs under: convolutions on TF32, matmuls not."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


class StockRecipe:
    """The example's model, optimizer, schedules and EMA; :meth:`step` is one optimizer step."""

    def __init__(
        self,
        unet_config: dict[str, Any],
        device: torch.device | str,
        num_training_steps: int = 10**6,
        num_train_timesteps: int = 1000,
        seed: int = 0,
        mixed_precision: str | None = None,
    ):
        device = torch.device(device)
        torch.manual_seed(seed)  # the example's set_seed before building the model
        self.device = device
        self.unet = UNet2DModel(**unet_config).to(device).train()
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=STOCK_DEFAULTS["beta_schedule"],
            prediction_type=STOCK_DEFAULTS["prediction_type"],
        )
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=STOCK_DEFAULTS["learning_rate"],
            betas=STOCK_DEFAULTS["adam_betas"],
            weight_decay=STOCK_DEFAULTS["adam_weight_decay"],
            eps=STOCK_DEFAULTS["adam_epsilon"],
        )
        self.lr_scheduler = get_scheduler(
            STOCK_DEFAULTS["lr_scheduler"],
            optimizer=self.optimizer,
            num_warmup_steps=STOCK_DEFAULTS["lr_warmup_steps"],
            num_training_steps=num_training_steps,
        )
        self.ema = EMAModel(
            self.unet.parameters(),
            decay=STOCK_DEFAULTS["ema_max_decay"],
            use_ema_warmup=True,
            inv_gamma=STOCK_DEFAULTS["ema_inv_gamma"],
            power=STOCK_DEFAULTS["ema_power"],
        )
        self.ema.to(device)
        self.mixed_precision = mixed_precision or ("fp16" if device.type == "cuda" else "no")
        self.autocast = self.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast and device.type == "cuda" else None

    def step(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One optimizer step on ``images`` in [-1, 1]; returns the loss (detached, on the device).

        ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε`` with ``t ~ U{0..T-1}``, loss ``‖ε̂(x_t, t) - ε‖²``.
        """
        if images.is_cuda:
            use_torch_default_tf32()
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device, generator=generator
        ).long()
        noisy = self.noise_scheduler.add_noise(images, noise, timesteps)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
            output = self.unet(noisy, timesteps).sample
            loss = F.mse_loss(output.float(), noise)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), STOCK_DEFAULTS["max_grad_norm"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), STOCK_DEFAULTS["max_grad_norm"])
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.ema.step(self.unet.parameters())
        return loss.detach()

    def ema_unet(self) -> UNet2DModel:
        """A copy of the network holding the EMA weights (what the example saves and samples)."""
        unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(unet.parameters())
        return unet

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (weights, EMA, optimizer, learning-rate schedule, scaler)."""
        return {
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unet.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        self.ema.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
