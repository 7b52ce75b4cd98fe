"""Learned variance (Improved DDPM's ``learned_range``): the scheduler's step and bound, the hybrid
objective, training, saving as stock diffusers, other samplers, and fine-tuning."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import load_benchmark, reset_accelerate
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from test_finetune import fine_tune_config
from test_training import run_training

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet, diffusion_loss
from ddpm_pipeline.likelihood import timestep_bpd, variational_bound
from ddpm_pipeline.model_card import build_model_card
from ddpm_pipeline.preflight import check_pipeline_folder
from ddpm_pipeline.pretrained import PretrainedDDPM
from ddpm_pipeline.training import Trainer
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T = 20


def scheduler(variance_type="learned_range", **options) -> DDPMTargetScheduler:
    return DDPMTargetScheduler(num_train_timesteps=T, beta_schedule="cosine", variance_type=variance_type, **options)


def learned_unet(seed=0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**DDPMUNet.preset_config("ddpm-tiny-16", out_channels=2, **overrides))


def quantized_images(count=4, seed=0) -> torch.Tensor:
    values = torch.randint(0, 256, (count, 1, 16, 16), generator=torch.Generator().manual_seed(seed))
    return values / 127.5 - 1


class WithVariance(torch.nn.Module):
    """A fixed-variance network's prediction followed by the variance value ``v`` everywhere."""

    def __init__(self, unet: torch.nn.Module, value: float):
        super().__init__()
        self.unet, self.value = unet, value

    def forward(self, sample, timestep):
        prediction = self.unet(sample, timestep).sample
        return UNet2DOutput(sample=torch.cat([prediction, torch.full_like(prediction, self.value)], dim=1))


class FixedOutput(torch.nn.Module):
    """A "network" whose output is a trainable tensor, to read the loss's gradients per channel."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = torch.nn.Parameter(output.clone())

    def forward(self, sample, timestep):
        return UNet2DOutput(sample=self.output)


# -- the scheduler ----------------------------------------------------------------------------


@pytest.mark.parametrize("num_inference_steps", [T, 7])
def test_a_step_interpolates_the_log_variance_between_the_fixed_ones(num_inference_steps):
    learned, small, large = scheduler(), scheduler("fixed_small"), scheduler("fixed_large")
    for s in (learned, small, large):
        s.set_timesteps(num_inference_steps)
    sample = torch.randn(3, 1, 8, 8)
    prediction = torch.randn(3, 1, 8, 8)
    values = torch.rand(3, 1, 8, 8) * 2 - 1

    def step(s, output, t, seed=1):
        return s.step(output, t, sample, generator=torch.Generator().manual_seed(seed)).prev_sample

    for t in learned.timesteps.tolist():
        fixed_small = step(small, prediction, t)
        # v = -1 is fixed_small and v = +1 is fixed_large, the respaced step's β̃'_t and β'_t
        torch.testing.assert_close(step(learned, torch.cat([prediction, -torch.ones_like(values)], 1), t), fixed_small)
        torch.testing.assert_close(step(learned, torch.cat([prediction, torch.ones_like(values)], 1), t),
                                   step(large, prediction, t))  # fmt: skip
        # in between: σ = exp(½(f log β'_t + (1-f) log β̃'_t)), f = (v+1)/2, per pixel
        prev = learned.previous_timestep(t)
        bar_t = float(learned.schedule.alphas_cumprod[t])
        bar_prev = float(learned.schedule.alphas_cumprod[prev]) if prev >= 0 else 1.0
        beta = 1 - bar_t / bar_prev
        beta_tilde = (1 - bar_prev) / (1 - bar_t) * beta
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)) if t > 0 else torch.zeros_like(sample)
        f = (values.double() + 1) / 2
        sigma = torch.exp(0.5 * (f * math.log(beta) + (1 - f) * math.log(beta_tilde))) if t > 0 else 0
        sigma_small = math.sqrt(beta_tilde) if t > 0 else 0
        expected = fixed_small.double() + (sigma - sigma_small) * noise.double()
        torch.testing.assert_close(step(learned, torch.cat([prediction, values], 1), t).double(), expected,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_the_reverse_step_s_variance_on_the_training_chain():
    s = scheduler()
    x_t = torch.randn(T, 1, 4, 4)
    values = torch.rand(T, 1, 4, 4) * 2 - 1
    timesteps = torch.arange(T)
    _, log_variance = s.model_mean_variance(torch.cat([torch.randn_like(x_t), values], 1).double(), x_t.double(), timesteps)
    f = (values.double() + 1) / 2
    min_log = s.schedule.posterior_log_variance_clipped  # log β̃_t, β̃_1 at t = 0
    max_log = s.schedule.betas.log()
    expected = f * max_log.view(-1, 1, 1, 1) + (1 - f) * min_log.view(-1, 1, 1, 1)
    torch.testing.assert_close(log_variance, expected)


def test_the_bound_of_v_minus_one_is_the_fixed_small_bound():
    torch.manual_seed(0)
    fixed = UNet2DModel(**DDPMUNet.preset_config("ddpm-tiny-16")).eval()
    images = quantized_images()

    def bound(model, s):
        return variational_bound(model, s, images, generator=torch.Generator().manual_seed(3))

    small = bound(fixed, scheduler("fixed_small"))
    learned_small = bound(WithVariance(fixed, -1.0), scheduler())
    torch.testing.assert_close(learned_small.total, small.total, rtol=1e-10, atol=1e-10)
    large = bound(fixed, scheduler("fixed_large"))
    learned_large = bound(WithVariance(fixed, 1.0), scheduler())
    # the decoder term differs: fixed_large uses β̃_1 at t = 0, the learned range log β_0
    torch.testing.assert_close(learned_large.per_timestep[:, 1:], large.per_timestep[:, 1:], rtol=1e-10, atol=1e-10)


def test_the_network_must_output_twice_the_channels():
    s = scheduler()
    s.set_timesteps(T)
    with pytest.raises(ValueError, match="needs a network with 2 × 1 output channels"):
        s.step(torch.randn(1, 1, 4, 4), 5, torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="use variance_type 'learned_range'"):
        scheduler("fixed_small").split_model_output(torch.randn(1, 2, 4, 4), torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="loss weights need a fixed variance"):
        s.loss_weight(torch.arange(3), "vlb")


# -- the hybrid objective ---------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["simple", "min_snr"])
def test_the_hybrid_loss_is_the_mse_plus_lambda_t_times_the_bound_term_with_the_mean_frozen(weighting):
    s = scheduler()
    images = quantized_images()
    timesteps = torch.tensor([0, 1, 9, 19])  # the decoder term, a KL near the data, and two more
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    output = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    output[:, 1] = output[:, 1].tanh()

    def loss_and_grad(weight):
        model = FixedOutput(output)
        loss = diffusion_loss(model, s, images, weighting, timesteps=timesteps, noise=noise, vlb_weight=weight)
        loss.backward()
        return loss, model.output.grad

    loss, grad = loss_and_grad(0.001)
    noisy = s.add_noise(images, noise, timesteps)
    mse = s.loss_weight(timesteps, weighting) * (output[:, :1] - noise).pow(2).flatten(1).mean(1)
    if weighting == "min_snr":  # min(1, 5/SNR_t): the two steps nearest the data are down-weighted
        assert mse.shape == (4,) and (s.loss_weight(timesteps, weighting) < 1).tolist() == [True, True, False, False]
    bound_term = timestep_bpd(output, s, images, noisy, timesteps)
    torch.testing.assert_close(loss, (mse + 0.001 * T * bound_term.float()).mean())
    simple_loss, simple_grad = loss_and_grad(0.0)
    torch.testing.assert_close(simple_loss, mse.mean())
    # the bound reaches the variance channel only: the mean's gradient is the weighted MSE's
    torch.testing.assert_close(grad[:, :1], simple_grad[:, :1], rtol=0, atol=0)
    assert torch.all(simple_grad[:, 1:] == 0) and torch.all(grad[:, 1:].flatten(1).abs().sum(1) > 0)


def test_a_run_learns_the_variance_and_saves_a_stock_pipeline(tmp_path):
    def train(name, *options):
        reset_accelerate()
        out = tmp_path / name
        run_training(out, "--resolution", "16", "--max_train_steps", "6", "--train_batch_size", "8",
                     "--num_train_timesteps", str(T), "--variance_type", "learned_range", *options)  # fmt: skip
        return out

    hybrid, no_bound = train("hybrid"), train("no-bound", "--vlb_weight", "0")
    index = json.loads((hybrid / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    check_pipeline_folder(hybrid)
    stock = DDPMPipeline.from_pretrained(hybrid)
    assert stock.unet.config.out_channels == 2 and stock.scheduler.config.variance_type == "learned_range"
    # without the bound's term the variance row of the output layer gets no gradient and stays as it
    # was built; with it, it trains
    torch.manual_seed(0)
    built = DDPMUNet(**{**DDPMUNet.preset_config("ddpm-tiny-16", sample_size=16), "out_channels": 2})
    untrained = UNet2DModel.from_pretrained(no_bound / "unet").conv_out
    trained = stock.unet.conv_out
    torch.testing.assert_close(untrained.weight[1:], built.conv_out.weight[1:], rtol=0, atol=1e-6)
    assert (trained.weight[1:] - built.conv_out.weight[1:]).abs().max() > 1e-4
    assert not torch.equal(untrained.weight[:1], built.conv_out.weight[:1])  # the mean trained in both
    config = TrainingConfig.load(hybrid / "training_config.json")
    assert config.variance_type == "learned_range" and config.vlb_weight == 0.001
    assert "a learned variance (Improved DDPM's `learned_range`" in build_model_card(hybrid, "someone/model").text


def test_stock_diffusers_samples_a_learned_variance_pipeline_as_ours_does(tmp_path):
    ours = DDPMTargetPipeline(unet=learned_unet(), scheduler=scheduler())
    ours.save_pretrained(tmp_path / "pipe")
    stock = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert type(stock.scheduler) is DDPMScheduler
    for steps in (T, 7):
        mine = ours(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=steps, output_type="np")
        theirs = stock(batch_size=2, generator=torch.Generator().manual_seed(5), num_inference_steps=steps, output_type="np")
        np.testing.assert_allclose(mine.images, theirs.images, atol=2e-5)


def test_the_variance_profile_benchmark_runs(tmp_path):
    DDPMTargetPipeline(unet=learned_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    rows = load_benchmark("learned_variance_profile").main(["--model", str(tmp_path / "pipe"), "--output", str(tmp_path / "p.png"),
                                                  "--json", str(tmp_path / "p.json"), "--num_images", "4",
                                                  "--num_timesteps", "4"])  # fmt: skip
    assert (tmp_path / "p.png").is_file() and json.loads((tmp_path / "p.json").read_text()) == rows
    assert [row["t"] for row in rows][-1] == T - 1 and len(rows) >= 3
    for row in rows:
        assert row["f_q10"] <= row["f_mean"] <= row["f_q90"]
        assert all(row[name] > 0 for name in ("learned", "fixed_small (β̃)", "fixed_large (β)"))


def test_other_samplers_use_the_prediction_channels_alone():
    learned = learned_unet()
    prediction_only = UNet2DModel(**{**learned.config, "out_channels": 1})
    weights = learned.state_dict()
    weights["conv_out.weight"], weights["conv_out.bias"] = weights["conv_out.weight"][:1], weights["conv_out.bias"][:1]
    prediction_only.load_state_dict(weights)
    images = []
    for unet in (learned, prediction_only):
        pipe = DDPMTargetPipeline(unet=unet, scheduler=scheduler())
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="pt",
                   trajectory_steps=2)  # fmt: skip
        images.append(out)
    torch.testing.assert_close(images[0].images, images[1].images)
    torch.testing.assert_close(images[0].trajectory.x0_predictions, images[1].trajectory.x0_predictions)


# -- options and fine-tuning ------------------------------------------------------------------


def test_options(tmp_path):
    small = "ddpm-small-28"
    assert TrainingConfig(model=small, variance_type="learned_range").unet_overrides_dict()["out_channels"] == 2
    assert TrainingConfig(model=small, variance_type="learned_range", channels=3).unet_overrides_dict()["out_channels"] == 6
    assert "out_channels" not in TrainingConfig(model=small).unet_overrides_dict()
    TrainingConfig(variance_type="learned_range", loss_weighting="vlb")  # L_vlb (tests/test_timestep_sampling.py)
    with pytest.raises(ValueError, match="--vlb_weight must be ≥ 0"):
        TrainingConfig(vlb_weight=-1.0)
    with pytest.raises(ValueError, match="out_channels 3, but with variance_type learned_range"):
        Trainer(TrainingConfig(model="ddpm-tiny-16", variance_type="learned_range", unet_overrides='{"out_channels": 3}',
                               output_dir=str(tmp_path)))  # fmt: skip


def test_fine_tuning_keeps_a_learned_variance_and_refuses_to_add_or_drop_one(tmp_path):
    learned = tmp_path / "learned"
    DDPMPipeline(unet=learned_unet(), scheduler=DDPMScheduler(num_train_timesteps=T, variance_type="learned_range")).save_pretrained(learned)
    trainer = Trainer(fine_tune_config(learned, tmp_path / "out", "--max_train_steps", "1"))
    assert trainer.noise_scheduler.learns_variance and trainer.unet_config["out_channels"] == 2
    reset_accelerate()
    with pytest.raises(ValueError, match="fine-tuning keeps the pretrained output layer"):
        Trainer(fine_tune_config(learned, tmp_path / "out2", "--variance_type", "fixed_small"))
    reset_accelerate()
    fixed = tmp_path / "fixed"
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**DDPMUNet.preset_config("ddpm-tiny-16")), scheduler=DDPMScheduler()).save_pretrained(fixed)
    with pytest.raises(ValueError, match="fine-tuning keeps the pretrained output layer"):
        Trainer(fine_tune_config(fixed, tmp_path / "out3", "--variance_type", "learned_range"))
    reset_accelerate()
    assert Trainer(fine_tune_config(learned, tmp_path / "out4", "--loss_weighting", "vlb")).noise_scheduler.learns_variance
    # a bare UNet with twice its input's channels learned its variance
    learned_unet().save_pretrained(tmp_path / "bare")
    assert PretrainedDDPM.load(str(tmp_path / "bare")).noise_scheduler().config.variance_type == "learned_range"
