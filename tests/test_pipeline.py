"""DDPMTargetPipeline: sampling, outputs, trajectories and folders stock diffusers loads."""

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import public_config
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from PIL import Image

from ddpm_pipeline import DDPMTargetPipeline, DDPMTargetScheduler, DDPMUNet

TARGETS = ["epsilon", "x0", "mu"]


def make_pipeline(target="epsilon", channels=1, **scheduler_options) -> DDPMTargetPipeline:
    torch.manual_seed(0)
    unet = DDPMUNet.from_preset("ddpm-tiny-16", in_channels=channels).eval()
    options = dict(prediction_type=target, num_train_timesteps=100, beta_schedule="cosine")
    pipe = DDPMTargetPipeline(unet=unet, scheduler=DDPMTargetScheduler(**{**options, **scheduler_options}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps=10, batch_size=2, seed=0, **kwargs):
    return pipe(
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        output_type="pt",
        **kwargs,
    )


def stock_sample(pipe, steps=10, batch_size=2, seed=0):
    """Stock DDPMPipeline images as an NCHW tensor in [0, 1] (its output_type="pt" is new in diffusers 0.41)."""
    images = pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_through_ours_and_stock_loaders(tmp_path, target):
    pipe = make_pipeline(target, variance_type="fixed_large", timestep_spacing="trailing")
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    expected_scheduler = ["ddpm_pipeline", "DDPMTargetScheduler"] if target == "mu" else ["diffusers", "DDPMScheduler"]
    assert index["scheduler"] == expected_scheduler

    reference = sample(pipe).images
    ours = DDPMTargetPipeline.from_pretrained(tmp_path)
    assert isinstance(ours.scheduler, DDPMTargetScheduler)
    assert public_config(ours.scheduler.config) == public_config(pipe.scheduler.config)
    assert public_config(ours.unet.config) == public_config(pipe.unet.config)
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(ours.unet.state_dict()[name], tensor), name
    assert torch.equal(sample(ours).images, reference)

    for loader in (DDPMPipeline, DiffusionPipeline):
        stock = loader.from_pretrained(tmp_path)
        stock.set_progress_bar_config(disable=True)
        assert type(stock) is DDPMPipeline
        images = stock_sample(stock)
        if target == "mu":  # the stock pipeline drives our scheduler: identical
            assert isinstance(stock.scheduler, DDPMTargetScheduler)
            assert torch.equal(images, reference)
        else:  # a stock DDPMScheduler with float32 tables
            assert type(stock.scheduler) is DDPMScheduler
            torch.testing.assert_close(images, reference, rtol=0, atol=2e-3)


def test_stock_diffusers_without_the_package(tmp_path):
    """ε and x0 folders load and sample where ddpm_pipeline cannot be imported; a μ folder cannot."""
    for target in TARGETS:
        make_pipeline(target).save_pretrained(tmp_path / target)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ddpm_pipeline"] = None  # as if the package were not installed
        import torch
        from diffusers import DDPMPipeline
        for target in {TARGETS!r}:
            try:
                pipe = DDPMPipeline.from_pretrained({str(tmp_path)!r} + "/" + target)
                images = pipe(batch_size=1, num_inference_steps=5, output_type="np").images
                print(target, "loaded", images.shape)
            except Exception as error:
                print(target, "failed", type(error).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "epsilon loaded (1, 16, 16, 1)" in lines
    assert "x0 loaded (1, 16, 16, 1)" in lines
    assert any(line.startswith("mu failed") for line in lines)


def test_same_images_as_stock_pipeline_on_the_full_chain():
    """With a stock DDPMScheduler given, our pipeline draws the same noise and follows the same chain."""
    pipe = make_pipeline("epsilon")
    stock_scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    stock = DDPMPipeline(unet=pipe.unet, scheduler=stock_scheduler)
    ours = DDPMTargetPipeline(unet=pipe.unet, scheduler=stock_scheduler)
    for p in (stock, ours):
        p.set_progress_bar_config(disable=True)
    assert isinstance(ours.scheduler, DDPMTargetScheduler)
    a = ours(batch_size=3, generator=torch.Generator().manual_seed(1), num_inference_steps=100, output_type="pt").images
    b = stock_sample(stock, steps=100, batch_size=3, seed=1)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_other_diffusers_schedulers_swap_in_with_the_training_betas(tmp_path, beta_schedule):
    """diffusers' idiom `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` keeps the
    training betas (T = 100: our linear schedule is scaled, diffusers' is not), samples as stock
    DDPMPipeline does with that scheduler, saves and loads as that class, and swaps back."""
    pipe = make_pipeline("x0", beta_schedule=beta_schedule)
    training_betas = pipe.scheduler.schedule.betas
    for scheduler_class in (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler):
        swapped = scheduler_class.from_config(pipe.scheduler.config)
        torch.testing.assert_close(swapped.betas.double(), training_betas, rtol=1e-6, atol=0)
        assert swapped.config.prediction_type == "sample"

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert tuple(pipe.config.scheduler) == ("diffusers", "DPMSolverMultistepScheduler")
    images = sample(pipe).images
    stock = DDPMPipeline(unet=pipe.unet, scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    torch.testing.assert_close(images, stock_sample(stock), rtol=0, atol=1e-6)

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    for loader in (DDPMTargetPipeline, DDPMPipeline):
        loaded = loader.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded.scheduler) is DPMSolverMultistepScheduler
        torch.testing.assert_close(stock_sample(loaded), images, rtol=0, atol=1e-6)

    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # back to ancestral sampling
    assert isinstance(pipe.scheduler, DDPMTargetScheduler)
    assert tuple(pipe.config.scheduler) == ("ddpm_pipeline", "DDPMTargetScheduler")
    assert torch.equal(pipe.scheduler.schedule.betas, training_betas)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_ddim_at_eta_one_is_ancestral_sampling_and_euler_is_ddim_at_eta_zero(beta_schedule):
    """Two exact identities, run through the pipeline (an x0 network, so that an untrained one keeps
    its samples in range; no clipping, which DDIM applies differently):

    * DDIM with η = 1 has σ² = (1 - ᾱ_s)/(1 - ᾱ_t) · (1 - ᾱ_t/ᾱ_s) = the respaced posterior variance
      β̃ and the posterior mean, so it is this package's respaced ancestral sampler (fixed_small),
      with the same noise draws;
    * Euler's method in (x/√ᾱ, σ = √((1-ᾱ)/ᾱ)) coordinates is deterministic DDIM (η = 0), which
      exercises the pipeline's init_noise_sigma and scale_model_input for σ-space schedulers."""
    pipe = make_pipeline("x0", beta_schedule=beta_schedule, clip_sample=False)
    config = pipe.scheduler.config
    ancestral = sample(pipe).images
    pipe.scheduler = DDIMScheduler.from_config(config)
    torch.testing.assert_close(sample(pipe, eta=1.0).images, ancestral, rtol=0, atol=2e-5)
    deterministic = sample(pipe).images
    assert (deterministic - ancestral).abs().max() > 0.1  # η matters: the two samplers differ
    pipe.scheduler = EulerDiscreteScheduler.from_config(config, timestep_spacing="leading")
    torch.testing.assert_close(sample(pipe).images, deterministic, rtol=0, atol=2e-5)


def test_trajectory_with_another_scheduler():
    """With DDIM the trajectory records x_t, the network's ε̂ (an ε model) and the clipped x̂0 DDIM
    stepped with; a scheduler with fractional timesteps cannot record one."""
    pipe = make_pipeline("epsilon")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    trajectory = sample(pipe, trajectory_steps=3).trajectory
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    for k, t in enumerate(trajectory.timesteps):
        x_t = trajectory.samples[k]
        noise = pipe.unet(x_t, t).sample
        torch.testing.assert_close(trajectory.noise_predictions[k], noise, rtol=0, atol=1e-6)
        x0 = ((x_t - (1 - alphas_cumprod[t]).sqrt() * noise) / alphas_cumprod[t].sqrt()).clamp(-1, 1)
        torch.testing.assert_close(trajectory.x0_predictions[k], x0, rtol=0, atol=1e-5)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # "linspace" spacing
    with pytest.raises(ValueError, match="integer timesteps"):
        sample(pipe, steps=7, trajectory_steps=2)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_output_types_grayscale_and_rgb(channels, mode):
    pipe = make_pipeline("x0", channels=channels)
    kwargs = dict(batch_size=2, num_inference_steps=4)
    pt = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    np_images = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    pil = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert pt.shape == (2, channels, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 16, 16, channels)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and pil[0].mode == mode and pil[0].size == (16, 16)
    (images,) = pipe(generator=torch.Generator().manual_seed(0), output_type="pt", return_dict=False, **kwargs)
    assert torch.equal(images, pt)


@pytest.mark.parametrize("target", TARGETS)
def test_trajectory(tmp_path, target):
    pipe = make_pipeline(target)
    out = sample(pipe, steps=20, trajectory_steps=5)
    trajectory = out.trajectory
    visited = [int(t) for t in pipe.scheduler.timesteps]
    assert trajectory.timesteps[0] == visited[0] and trajectory.timesteps[-1] == 0
    assert len(trajectory.timesteps) == 5
    assert trajectory.samples.shape == (5, 2, 1, 16, 16)
    # the first snapshot is the initial noise x_T
    assert torch.equal(trajectory.samples[0], torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    # the last step maps x_1 to x̂0 exactly (b_0 = 1, c_0 = 0), so the image is the last x̂0
    torch.testing.assert_close(out.images, (trajectory.x0_predictions[-1] / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    # predicted noise is the network's ε̂, converted for x0 and μ models
    t0 = trajectory.timesteps[0]
    with torch.no_grad():
        raw = pipe.unet(trajectory.samples[0], t0).sample
    expected_noise = pipe.scheduler.predict_epsilon(raw, trajectory.samples[0], t0)
    torch.testing.assert_close(trajectory.noise_predictions[0], expected_noise)
    image = trajectory.save_png(tmp_path / "trajectory.png", max_images=2, cell_size=32)
    reopened = Image.open(tmp_path / "trajectory.png")
    assert reopened.size == image.size and reopened.size[0] > 5 * 32 and reopened.size[1] > 6 * 32


def test_trajectory_at_chosen_steps_and_errors():
    pipe = make_pipeline("epsilon")
    pipe.scheduler.set_timesteps(10)
    chosen = [int(pipe.scheduler.timesteps[2]), 0]
    out = sample(pipe, steps=10, trajectory_steps=chosen)
    assert out.trajectory.timesteps == chosen
    with pytest.raises(ValueError, match="not visited"):
        sample(pipe, steps=10, trajectory_steps=[5])
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and num_train_timesteps=100"):
        sample(pipe, steps=101)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="latent")
    with pytest.raises(ValueError, match="generators for batch_size"):
        pipe(batch_size=2, generator=[torch.Generator()])
    with pytest.raises(TypeError, match="DDPMTargetScheduler"):
        DDPMTargetPipeline(unet=pipe.unet, scheduler=object())


def test_default_steps_is_the_full_chain_and_generators_per_image():
    # ε, not μ: an untrained μ net's x̂0 = (μ̂ - c_t x_t)/b_t magnifies batch-size rounding by 1/b_t
    pipe = make_pipeline("epsilon")
    out = pipe(batch_size=2, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt")
    assert len(pipe.scheduler.timesteps) == 100
    single = pipe(batch_size=1, generator=[torch.Generator().manual_seed(1)], output_type="pt").images
    torch.testing.assert_close(out.images[1:], single)


def test_given_starting_noise_is_the_chain_a_generator_would_have_started():
    pipe = make_pipeline("epsilon")
    drawn = sample(pipe, steps=10).images
    generator = torch.Generator().manual_seed(0)
    start = torch.randn((2, 1, 16, 16), generator=generator)  # x_T as the pipeline draws it; the rest is step noise
    given = pipe(batch_size=2, generator=generator, num_inference_steps=10, output_type="pt", latents=start).images
    torch.testing.assert_close(given, drawn, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"latents have shape \(3, 1, 16, 16\); .* \(2, 1, 16, 16\)"):
        sample(pipe, latents=torch.randn(3, 1, 16, 16))


def test_step_end_callbacks_see_and_replace_the_state_and_can_interrupt():
    pipe = make_pipeline("epsilon")
    seen = []

    def record(pipeline, step_index, timestep, callback_kwargs):
        seen.append((step_index, int(timestep), callback_kwargs["latents"].clone()))
        return callback_kwargs

    out = sample(pipe, steps=10, trajectory_steps=10, callback_on_step_end=record)
    assert pipe.num_timesteps == 10
    assert [(index, t) for index, t, _ in seen] == list(enumerate(pipe.scheduler.timesteps.tolist()))
    # the state after step i is the state the trajectory records before step i + 1, and the last one the images
    for (_, _, state), recorded in zip(seen, out.trajectory.samples[1:], strict=False):
        torch.testing.assert_close(state, recorded, rtol=0, atol=0)
    torch.testing.assert_close((seen[-1][2] / 2 + 0.5).clamp(0, 1), out.images, rtol=0, atol=0)
    torch.testing.assert_close(sample(pipe, steps=10).images, out.images, rtol=0, atol=0)  # watching changes nothing

    def zero_at_the_end(pipeline, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step_index == 9 else {}

    assert torch.all(sample(pipe, steps=10, callback_on_step_end=zero_at_the_end).images == 0.5)

    def stop_after_four(pipeline, step_index, timestep, callback_kwargs):
        seen.append(step_index)
        pipeline._interrupt = step_index == 3
        return callback_kwargs

    seen.clear()
    stopped = sample(pipe, steps=10, trajectory_steps=10, callback_on_step_end=stop_after_four)
    assert seen == [0, 1, 2, 3] and pipe.interrupt
    full = sample(pipe, steps=10, trajectory_steps=10)
    torch.testing.assert_close(stopped.images, (full.trajectory.samples[4] / 2 + 0.5).clamp(0, 1), rtol=0, atol=0)
    assert not pipe.interrupt  # each call starts afresh

    class ZeroTheStateAtOneStep(PipelineCallback):  # diffusers' callback classes work too
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == self.config.cutoff_step_index:
                callback_kwargs["latents"] = callback_kwargs["latents"] * 0
            return callback_kwargs

    zeroed = sample(pipe, steps=10, callback_on_step_end=MultiPipelineCallbacks([ZeroTheStateAtOneStep(None, 9)]))
    assert torch.all(zeroed.images == 0.5)
    with pytest.raises(ValueError, match=r"\['x0'\] are not tensors of this pipeline; pick from \['latents'\]"):
        sample(pipe, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["x0"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_matches_cpu(monkeypatch):
    # ε: an untrained μ net magnifies rounding by 1/b_t (see above); TF32 off for an fp32 comparison
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    pipe = make_pipeline("epsilon")
    cpu = sample(pipe, steps=10).images
    pipe.to("cuda")
    gpu = pipe(
        batch_size=2, generator=torch.Generator("cpu").manual_seed(0), num_inference_steps=10, output_type="pt"
    ).images
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize("clip_sample", [False, True])
def test_diverged_sampling_warns_and_is_never_stored(tmp_path, clip_sample):
    """A network that outputs NaN yields NaN images: the pipeline warns (naming clip_sample only when
    it is off), and a sample store refuses the batch instead of writing black PNGs."""
    from ddpm_pipeline.sample_store import SampleStore

    pipe = make_pipeline("mu", clip_sample=clip_sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy chain does not warn
        assert torch.isfinite(sample(pipe, steps=5).images).all()
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"diverged: 2 of 2 images") as caught:
        images = sample(pipe, steps=5).images
    assert torch.isnan(images).all()
    assert ("clip_sample=True" in str(caught[0].message)) is not clip_sample
    assert caught[0].filename == __file__  # the warning points at the caller, not at torch.no_grad

    store = SampleStore(tmp_path / "samples", {"seed": 0, "batch_size": 2, "num_inference_steps": 5})
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="batch 0 diverged: 2 of 2 images"):
        store.fill(pipe, num_samples=3, show_progress=False)
    assert store.existing() == 0
