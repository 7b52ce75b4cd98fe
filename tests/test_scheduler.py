"""DDPMTargetScheduler: stock equivalence for ε/x0, exactness for μ, round trips."""

import json

import numpy as np
import pytest
import torch
from conftest import public_config
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ddpm_pipeline import DDPMTargetScheduler

SHAPE = (2, 3, 8, 8)


def stock_twin(**config) -> DDPMScheduler:
    stock_config = dict(config)
    if stock_config.get("beta_schedule") == "cosine":
        stock_config["beta_schedule"] = "squaredcos_cap_v2"
    if stock_config.get("prediction_type") == "x0":
        stock_config["prediction_type"] = "sample"
    return DDPMScheduler(**stock_config)


STOCK_CASES = [
    dict(prediction_type="epsilon", beta_schedule="linear", variance_type="fixed_small"),
    dict(prediction_type="epsilon", beta_schedule="cosine", variance_type="fixed_large"),
    dict(prediction_type="x0", beta_schedule="linear", variance_type="fixed_large"),
    dict(prediction_type="x0", beta_schedule="cosine", variance_type="fixed_small", clip_sample=False),
    dict(prediction_type="epsilon", beta_schedule="linear", timestep_spacing="trailing"),
    dict(prediction_type="x0", beta_schedule="cosine", timestep_spacing="linspace"),
]


def run_side_by_side(ours, stock, steps, dtype):
    """Step both schedulers over the same chain with the same outputs and generator seeds; yield pairs."""
    ours.set_timesteps(steps)
    stock.set_timesteps(steps)
    assert torch.equal(ours.timesteps, stock.timesteps)
    gen_ours, gen_stock = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    data = torch.Generator().manual_seed(2)
    sample = torch.randn(SHAPE, generator=data, dtype=dtype)
    for t in stock.timesteps:
        model_output = torch.randn(SHAPE, generator=data, dtype=dtype)
        a = ours.step(model_output, t, sample, generator=gen_ours)
        b = stock.step(model_output, t, sample, generator=gen_stock)
        yield a, b
        sample = b.prev_sample  # both continue from the same state
    # the generators were consumed identically (same draws, same order)
    assert torch.equal(torch.randn(3, generator=gen_ours), torch.randn(3, generator=gen_stock))


@pytest.mark.parametrize("config", STOCK_CASES)
@pytest.mark.parametrize("num_inference_steps", [None, 100, 7])
def test_step_equals_stock_ddpm_scheduler(config, num_inference_steps):
    """Same arithmetic: with stock given our float64 tables, every step agrees to float64 rounding."""
    ours, stock = DDPMTargetScheduler(**config), stock_twin(**config)
    stock.betas = ours.schedule.betas
    stock.alphas = ours.schedule.alphas
    stock.alphas_cumprod = ours.schedule.alphas_cumprod
    stock.one = torch.tensor(1.0, dtype=torch.float64)
    pairs = run_side_by_side(ours, stock, num_inference_steps or 1000, torch.float64)
    for a, b in pairs:
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", STOCK_CASES[:4])
@pytest.mark.parametrize("num_inference_steps", [None, 10])
def test_step_matches_unmodified_stock_in_float32(config, num_inference_steps):
    """Against stock as shipped. It keeps float32 tables (ᾱ from a float32 cumprod) and forms
    β'_t = 1 - ᾱ_t/ᾱ_{t'} in float32: for the cosine schedule that is ~1e-3 relative error at t = 1,
    so the steps agree to 1e-3 (see the next test for which one is right)."""
    ours, stock = DDPMTargetScheduler(**config), stock_twin(**config)
    for a, b in run_side_by_side(ours, stock, num_inference_steps or 1000, torch.float32):
        torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=0, atol=1e-3)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, rtol=0, atol=1e-3)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_float32_step_mean_is_exact_to_float32_rounding(beta_schedule, monkeypatch):
    """With the noise draw set to zero, our float32 step mean stays within 1e-6 of the float64-exact
    mean at every t; stock's float32 mean is off by far more at small t."""
    zeros = lambda shape, generator=None, device=None, dtype=None, layout=None: torch.zeros(shape, dtype=dtype)  # noqa: E731
    monkeypatch.setattr("ddpm_pipeline.scheduling_ddpm_target.randn_tensor", zeros)
    monkeypatch.setattr("diffusers.schedulers.scheduling_ddpm.randn_tensor", zeros)
    config = dict(prediction_type="x0", beta_schedule=beta_schedule, clip_sample=False)
    ours, stock = DDPMTargetScheduler(**config), stock_twin(**config)
    data = torch.Generator().manual_seed(2)
    ours_error, stock_error = [], []
    for t in [999, 500, 10, 2, 1]:
        sample, model_output = torch.randn(SHAPE, generator=data), torch.randn(SHAPE, generator=data)
        exact = ours.step(model_output.double(), t, sample.double()).prev_sample
        ours_error.append((ours.step(model_output, t, sample).prev_sample.double() - exact).abs().max().item())
        stock_error.append((stock.step(model_output, t, sample).prev_sample.double() - exact).abs().max().item())
    assert max(ours_error) < 1e-6, ours_error
    assert stock_error[-1] > 10 * max(ours_error), (stock_error, ours_error)


def test_step_return_dict_false_and_generator_determinism():
    scheduler = DDPMTargetScheduler(prediction_type="mu")
    scheduler.set_timesteps(10)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    t = scheduler.timesteps[0]
    first = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    second = scheduler.step(out, t, x, generator=torch.Generator().manual_seed(5), return_dict=False)
    assert isinstance(first, tuple) and len(first) == 2
    assert torch.equal(first[0], second[0])


def oracle_predictions(scheduler, x0, noise, t):
    """The exact ε, x0 and μ̃ for x_t = add_noise(x0, ε, t), computed independently in float64."""
    tables = scheduler.schedule
    a_bar = tables.alphas_cumprod[t].item()
    a_bar_prev = tables.alphas_cumprod_prev[t].item()
    beta = tables.betas[t].item()
    x_t = a_bar**0.5 * x0 + (1 - a_bar) ** 0.5 * noise
    mu = a_bar_prev**0.5 * beta / (1 - a_bar) * x0 + (1 - beta) ** 0.5 * (1 - a_bar_prev) / (1 - a_bar) * x_t
    return x_t, {"epsilon": noise, "sample": x0, "mu": mu}


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_get_target_mu_equals_independent_posterior_mean(beta_schedule):
    scheduler = DDPMTargetScheduler(prediction_type="mu", beta_schedule=beta_schedule)
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, dtype=torch.float64)
    for t in [0, 1, 10, 500, 998, 999]:
        x_t, exact = oracle_predictions(scheduler, x0, noise, t)
        timesteps = torch.full((SHAPE[0],), t)
        torch.testing.assert_close(scheduler.add_noise(x0, noise, timesteps), x_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scheduler.get_target(x0, noise, timesteps), exact["mu"], rtol=1e-12, atol=1e-12)
        # float32 training path agrees to float32 accuracy
        target32 = scheduler.get_target(x0.float(), noise.float(), timesteps)
        torch.testing.assert_close(target32, exact["mu"].float(), rtol=1e-5, atol=1e-5)
    for name, reference in [("epsilon", noise), ("sample", x0)]:
        other = DDPMTargetScheduler(prediction_type=name)
        assert torch.equal(other.get_target(x0, noise, torch.zeros(2, dtype=torch.long)), reference)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize("num_inference_steps", [1000, 50, 10])
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_exact_eps_x0_mu_give_the_same_step(dtype, tolerance, num_inference_steps, beta_schedule, variance_type):
    """Oracle predictions of the three targets step identically, on the full and respaced chains."""
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    schedulers = {
        name: DDPMTargetScheduler(prediction_type=name, beta_schedule=beta_schedule, variance_type=variance_type)
        for name in ("epsilon", "sample", "mu")
    }
    for scheduler in schedulers.values():
        scheduler.set_timesteps(num_inference_steps)
    timesteps = schedulers["mu"].timesteps
    for t in [int(timesteps[0]), int(timesteps[len(timesteps) // 2]), int(timesteps[-2]), int(timesteps[-1])]:
        x_t, exact = oracle_predictions(schedulers["mu"], x0, noise, t)
        outputs = {
            name: scheduler.step(exact[name].to(dtype), t, x_t.to(dtype), generator=torch.Generator().manual_seed(t))
            for name, scheduler in schedulers.items()
        }
        for name in ("epsilon", "mu"):
            torch.testing.assert_close(
                outputs[name].prev_sample, outputs["sample"].prev_sample, rtol=tolerance, atol=tolerance
            )
            if dtype == torch.float64:  # x̂0 = x_t/√ᾱ_t - …: float32 cannot resolve it where ᾱ_t ≈ 0
                torch.testing.assert_close(outputs[name].pred_original_sample, x0, rtol=0, atol=1e-6)


def test_mu_respacing_uses_training_chain_coefficients():
    """Treating the μ output as the respaced step's mean would be wrong; the scheduler converts first."""
    scheduler = DDPMTargetScheduler(prediction_type="mu", clip_sample=False)
    scheduler.set_timesteps(10)
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, dtype=torch.float64)
    t = int(scheduler.timesteps[3])
    x_t, exact = oracle_predictions(scheduler, x0, noise, t)
    step = scheduler.step(exact["mu"], t, x_t, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step.pred_original_sample, x0, rtol=1e-9, atol=1e-9)
    # the one-step mean of the training chain is far from the 100-step jump's mean
    prev_t = scheduler.previous_timestep(t)
    assert prev_t == t - 100
    a_bar, a_bar_prev = scheduler.schedule.alphas_cumprod[t].item(), scheduler.schedule.alphas_cumprod[prev_t].item()
    beta = 1 - a_bar / a_bar_prev
    respaced_mean = a_bar_prev**0.5 * beta / (1 - a_bar) * x0 + (1 - beta) ** 0.5 * (1 - a_bar_prev) / (1 - a_bar) * x_t
    noiseless = DDPMTargetScheduler(prediction_type="mu", clip_sample=False)
    noiseless.set_timesteps(10)
    assert (respaced_mean - exact["mu"]).abs().max() > 1e-2


def test_oracle_chains_agree_across_targets():
    """Whole respaced sampling chains driven by oracle ε, x0 and μ predictions end in the same image."""
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    finals = {}
    for name in ("epsilon", "sample", "mu"):
        scheduler = DDPMTargetScheduler(prediction_type=name, beta_schedule="cosine")
        scheduler.set_timesteps(25)
        generator = torch.Generator().manual_seed(7)
        x = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
        tables = scheduler.schedule
        for t in scheduler.timesteps:
            t = int(t)
            a_bar = tables.alphas_cumprod[t].item()
            eps = (x - a_bar**0.5 * x0) / (1 - a_bar) ** 0.5  # the noise that makes x the forward sample of x0
            exact = {"epsilon": eps, "sample": x0, "mu": scheduler.posterior_mean(x0, x, t)}[name]
            x = scheduler.step(exact, t, x, generator=generator).prev_sample
        finals[name] = x
    torch.testing.assert_close(finals["epsilon"], finals["sample"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(finals["mu"], finals["sample"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(finals["sample"], x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("target", ["epsilon", "sample", "mu", "v_prediction"])
def test_conversions_round_trip(target):
    scheduler = DDPMTargetScheduler(prediction_type=target, beta_schedule="cosine")
    x0 = torch.rand(SHAPE, dtype=torch.float64) * 2 - 1
    noise = torch.randn(SHAPE, dtype=torch.float64)
    timesteps = torch.tensor([3, 700])
    x_t = scheduler.add_noise(x0, noise, timesteps)
    prediction = scheduler.get_target(x0, noise, timesteps, noisy_samples=x_t)
    torch.testing.assert_close(scheduler.predict_x0(prediction, x_t, timesteps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(scheduler.predict_epsilon(prediction, x_t, timesteps), noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        scheduler.predict_mu(prediction, x_t, timesteps),
        scheduler.posterior_mean(x0, x_t, timesteps),
        rtol=1e-9,
        atol=1e-9,
    )


def test_loss_weight():
    scheduler = DDPMTargetScheduler(prediction_type="mu", variance_type="fixed_large")
    timesteps = torch.tensor([0, 1, 500, 999])
    assert torch.equal(scheduler.loss_weight(timesteps, "simple"), torch.ones(4))
    expected = scheduler.schedule.vlb_weights("mu", "fixed_large")[timesteps].float()
    assert torch.equal(scheduler.loss_weight(timesteps, "vlb"), expected)
    assert scheduler.loss_weight(torch.arange(1000), "vlb").double().mean().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="Unknown loss weighting 'elbo'"):
        scheduler.loss_weight(timesteps, "elbo")


EVERY_OPTION = dict(
    num_train_timesteps=500,
    beta_start=2e-4,
    beta_end=0.03,
    beta_schedule="linear",
    variance_type="fixed_large",
    clip_sample=False,
    prediction_type="mu",
    thresholding=True,
    dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0,
    sample_max_value=1.5,
    timestep_spacing="trailing",
    steps_offset=1,
)


@pytest.mark.parametrize(
    "options",
    [
        EVERY_OPTION,
        {**EVERY_OPTION, "beta_schedule": "cosine", "prediction_type": "x0"},
        {},
        {"trained_betas": [1e-3] * 10, "num_train_timesteps": 10},
    ],
)
def test_save_load_round_trip(tmp_path, options):
    scheduler = DDPMTargetScheduler(**options)
    scheduler.save_pretrained(tmp_path)
    loaded = DDPMTargetScheduler.from_pretrained(tmp_path)
    assert public_config(loaded.config) == public_config(scheduler.config)
    for name, table in scheduler.schedule.tables().items():
        assert torch.equal(getattr(loaded.schedule, name), table), name
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMTargetScheduler"


@pytest.mark.parametrize(
    "options",
    [
        {"beta_schedule": "cosine", "prediction_type": "x0", "num_train_timesteps": 1000},
        {"beta_schedule": "linear", "num_train_timesteps": 250, "variance_type": "fixed_large"},
        {"beta_schedule": "linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    ],
)
def test_stock_form_round_trip(tmp_path, options):
    """Saved as a stock DDPMScheduler: stock diffusers loads the same chain, we load every option back."""
    scheduler = DDPMTargetScheduler(**options)
    scheduler.to_stock_scheduler().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler"
    stock = DDPMScheduler.from_pretrained(tmp_path)
    np.testing.assert_allclose(
        stock.alphas_cumprod.double().numpy(), scheduler.schedule.alphas_cumprod.numpy(), rtol=2e-5
    )
    assert stock.config.prediction_type == scheduler.config.prediction_type
    ours = DDPMTargetScheduler.from_pretrained(tmp_path)
    assert public_config(ours.config) == public_config(scheduler.config)
    assert torch.equal(ours.schedule.betas, scheduler.schedule.betas)
    assert torch.equal(DDPMTargetScheduler.from_stock_scheduler(stock).schedule.betas, scheduler.schedule.betas)


def test_config_is_in_stock_terms_and_older_configs_load(tmp_path):
    """The config names the cosine schedule as diffusers does and carries a scaled linear schedule
    (T ≠ 1000) as its betas, so any diffusers scheduler built from it has the training betas; a
    config saved before (``"cosine"``, no betas) loads to the same scheduler."""
    cosine = DDPMTargetScheduler(beta_schedule="cosine", num_train_timesteps=250)
    assert cosine.config.beta_schedule == "squaredcos_cap_v2" and cosine.config.trained_betas is None
    scaled = DDPMTargetScheduler(num_train_timesteps=250)
    assert scaled.config.beta_schedule == "linear" and scaled.config.trained_betas == scaled.schedule.betas.tolist()
    assert DDPMTargetScheduler().config.trained_betas is None  # T = 1000: diffusers' own linear schedule
    for scheduler in (cosine, scaled):
        stock = DDIMScheduler.from_config(scheduler.config)
        np.testing.assert_allclose(stock.betas.double().numpy(), scheduler.schedule.betas.numpy(), rtol=1e-6)
        old = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        old.update(beta_schedule="cosine" if scheduler is cosine else "linear", trained_betas=None)
        (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMTargetScheduler", **old}))
        loaded = DDPMTargetScheduler.from_pretrained(tmp_path)
        assert public_config(loaded.config) == public_config(scheduler.config)
        assert torch.equal(loaded.schedule.betas, scheduler.schedule.betas)


@pytest.mark.parametrize("sampler", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_back_from_another_samplers_saved_config(tmp_path, sampler):
    """A folder saved with another diffusers sampler gives back the DDPM chain of its betas, with the
    default variance (DPM-Solver's variance_type, None, means something else)."""
    ours = DDPMTargetScheduler(num_train_timesteps=250, beta_schedule="cosine", prediction_type="x0")
    sampler.from_config(ours.config).save_pretrained(tmp_path)
    saved = sampler.from_pretrained(tmp_path)
    back = DDPMTargetScheduler.from_config(saved.config)
    assert torch.equal(back.schedule.betas, ours.schedule.betas)
    assert (back.config.prediction_type, back.config.variance_type) == ("sample", "fixed_small")


def test_plain_stock_config_keeps_its_betas():
    """A stock "linear" schedule with T ≠ 1000 is unscaled; converting must not rescale it."""
    stock = DDPMScheduler(num_train_timesteps=200, beta_schedule="linear")
    ours = DDPMTargetScheduler.from_stock_scheduler(stock)
    np.testing.assert_allclose(ours.schedule.betas.numpy(), stock.betas.double().numpy(), rtol=1e-6)
    scaled = DDPMTargetScheduler(num_train_timesteps=200, beta_schedule="linear")
    assert scaled.schedule.betas[-1].item() == pytest.approx(0.1)


def test_mu_has_no_stock_form():
    with pytest.raises(ValueError, match="no stock diffusers equivalent"):
        DDPMTargetScheduler(prediction_type="mu").to_stock_scheduler()


def test_bad_options_give_clear_errors():
    with pytest.raises(ValueError, match="Unknown prediction_type"):
        DDPMTargetScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="Unknown beta_schedule 'quadratic'"):
        DDPMTargetScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="Unsupported variance_type 'learned'"):
        DDPMTargetScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        DDPMTargetScheduler(trained_betas=[0.1, 0.2, 0.3], num_train_timesteps=10)
    scheduler = DDPMTargetScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        scheduler.step(torch.zeros(SHAPE), 5, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="use variance_type .learned_range."):
        scheduler.step(torch.zeros(2, 6, 8, 8), 900, torch.zeros(SHAPE))
