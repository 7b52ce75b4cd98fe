"""Importance-sampled timesteps (Improved DDPM §3.3) and the bound as the whole objective (L_vlb):
the sampler's history, probabilities, draws and weights; the losses; and training with them."""

import collections
import json
import math

import pytest
import torch
from conftest import load_benchmark, reset_accelerate
from test_learned_variance import FixedOutput, learned_unet, quantized_images, scheduler
from test_training import run_training

from ddpm_pipeline import DDPMTargetPipeline, ImportanceTimestepSampler, diffusion_loss, diffusion_loss_terms
from ddpm_pipeline.likelihood import timestep_bpd
from ddpm_pipeline.training import TIMESTEP_SAMPLER_STATE_NAME
from ddpm_pipeline.training_config import TrainingConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

T = 20


def warmed_sampler(per_timestep_loss: torch.Tensor, history: int = 3, uniform_prob: float = 0.001):
    """A sampler whose history holds ``per_timestep_loss[t]`` ``history`` times for every t."""
    sampler = ImportanceTimestepSampler(len(per_timestep_loss), history=history, uniform_prob=uniform_prob)
    timesteps = torch.arange(len(per_timestep_loss)).repeat(history)
    sampler.update(timesteps, per_timestep_loss.repeat(history))
    return sampler


# -- the sampler ------------------------------------------------------------------------------


def test_the_history_keeps_each_timestep_s_last_losses_in_order_and_skips_non_finite_ones():
    history = 3
    sampler = ImportanceTimestepSampler(7, history=history)
    reference = {t: collections.deque(maxlen=history) for t in range(7)}
    seen = collections.Counter()
    generator = torch.Generator().manual_seed(0)
    for batch in range(30):
        size = int(torch.randint(1, 25, (1,), generator=generator))  # often more than `history` of one t
        timesteps = torch.randint(0, 7, (size,), generator=generator)
        losses = torch.rand(size, generator=generator, dtype=torch.float64)
        if batch % 7 == 3:
            losses[0], losses[-1] = math.nan, math.inf
        sampler.update(timesteps, losses)
        for t, loss in zip(timesteps.tolist(), losses.tolist(), strict=True):
            if math.isfinite(loss):
                reference[t].append(loss)
                seen[t] += 1
        for t in range(7):
            assert sampler.counts[t] == seen[t]
            stored = sampler.losses[t, : min(seen[t], history)] if seen[t] < history else sampler.losses[t]
            assert sorted(stored.tolist()) == sorted(reference[t])


def test_probabilities_are_uniform_until_warm_then_proportional_to_the_root_mean_square_loss():
    sampler = ImportanceTimestepSampler(4, history=2, uniform_prob=0.1)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]))
    assert not sampler.warm
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    sampler.update(torch.tensor([3]), torch.tensor([8.0]))
    assert sampler.warm
    rms = torch.tensor([math.sqrt(5), 2.0, math.sqrt(5), math.sqrt(40)], dtype=torch.float64)
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-12, atol=0)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_draws_follow_the_probabilities_and_carry_the_weights_one_over_t_p():
    losses = torch.linspace(0.1, 3.0, 10, dtype=torch.float64) ** 2
    sampler = warmed_sampler(losses, uniform_prob=0.05)
    p = sampler.probabilities()
    timesteps, weights = sampler.sample(200_000, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(timesteps, minlength=10).double() / 200_000
    # multinomial frequencies: within 5 standard errors
    assert torch.all((frequencies - p).abs() <= 5 * (p * (1 - p) / 200_000).sqrt())
    torch.testing.assert_close(weights, (1 / (10 * p[timesteps])).float())
    # the same generator state, the same draws
    again, _ = sampler.sample(200_000, torch.Generator().manual_seed(1))
    assert torch.equal(timesteps, again)


def test_the_weighted_estimate_is_unbiased_and_far_less_noisy_when_the_terms_span_orders_of_magnitude():
    # terms like the bound's: the first timesteps dominate
    per_timestep = 1.0 / torch.arange(1, T + 1, dtype=torch.float64) ** 3
    exact = per_timestep.mean()
    sampler = warmed_sampler(per_timestep)
    # exactly: E_p[L_t / (T p_t)] is the uniform mean, and its variance is far below uniform draws'
    p = sampler.probabilities()
    importance_terms = per_timestep / (T * p)
    torch.testing.assert_close((p * importance_terms).sum(), exact, rtol=1e-12, atol=0)
    importance_variance = (p * importance_terms**2).sum() - exact**2
    uniform_variance = (per_timestep**2).mean() - exact**2
    assert importance_variance < 1e-3 * uniform_variance
    # and by simulation, through sample()'s weights
    timesteps, weights = sampler.sample(100_000, torch.Generator().manual_seed(2))
    estimates = per_timestep[timesteps] * weights.double()
    assert abs(estimates.mean() - exact) < 5 * estimates.std() / math.sqrt(100_000)
    uniform = per_timestep[torch.randint(0, T, (100_000,), generator=torch.Generator().manual_seed(2))]
    assert estimates.std() < 0.05 * uniform.std()


def test_the_state_round_trips_and_refuses_another_shape():
    sampler = warmed_sampler(torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    sampler.update(torch.tensor([3, 3, 5]), torch.tensor([7.0, 8.0, 9.0]))
    restored = ImportanceTimestepSampler(T, history=3)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.losses, sampler.losses) and torch.equal(restored.counts, sampler.counts)
    generator_a, generator_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(restored.sample(64, generator_a)[0], sampler.sample(64, generator_b)[0])
    with pytest.raises(ValueError, match="--importance_history 4: give that run's values"):
        ImportanceTimestepSampler(T, history=4).load_state_dict(sampler.state_dict())


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError, match="at least 1 value"):
        ImportanceTimestepSampler(T, history=0)
    with pytest.raises(ValueError, match="positive probability"):
        ImportanceTimestepSampler(T, uniform_prob=0.0)
    with pytest.raises(ValueError, match="--importance_uniform_prob must be in"):
        TrainingConfig(timestep_sampling="importance", importance_uniform_prob=1.5)
    with pytest.raises(ValueError, match="--timestep_sampling 'often' is not one of"):
        TrainingConfig(timestep_sampling="often")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_and_recording_do_not_synchronize_with_the_host():
    sampler = ImportanceTimestepSampler(1000, history=2, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    losses = torch.rand(256, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(12):  # through the warm-up and past it
            timesteps, weights = sampler.sample(256, generator)
            sampler.update(timesteps, losses * weights)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(sampler.warm)


# -- the losses -------------------------------------------------------------------------------


def test_the_loss_is_the_weighted_mean_of_the_per_sample_losses():
    s = scheduler("fixed_small")
    images = quantized_images()
    timesteps = torch.tensor([0, 3, 9, 19])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    output = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    per_sample = diffusion_loss_terms(FixedOutput(output), s, images, "vlb", timesteps=timesteps, noise=noise).loss
    expected = s.loss_weight(timesteps, "vlb") * (output - noise).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    weights = torch.tensor([0.5, 2.0, 1.0, 4.0])
    loss = diffusion_loss(FixedOutput(output), s, images, "vlb", timesteps=timesteps, noise=noise, sample_weights=weights)
    torch.testing.assert_close(loss, (weights * expected).mean())


def test_l_vlb_with_a_learned_variance_is_t_times_the_bound_term_and_trains_the_mean_too():
    s = scheduler()
    images = quantized_images()
    timesteps = torch.tensor([0, 1, 9, 19])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    output = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(4))
    output[:, 1] = output[:, 1].tanh()
    model = FixedOutput(output)
    per_sample = diffusion_loss_terms(model, s, images, "vlb", timesteps=timesteps, noise=noise).loss
    noisy = s.add_noise(images, noise, timesteps)
    torch.testing.assert_close(per_sample, T * timestep_bpd(output, s, images, noisy, timesteps).float())
    per_sample.mean().backward()
    gradient = model.output.grad.flatten(2).abs().sum(-1)  # [image, channel]
    assert torch.all(gradient > 0)  # the mean channel as well as the variance channel, t = 0 included
    # vlb_weight belongs to the hybrid objective and leaves L_vlb alone
    other = diffusion_loss_terms(FixedOutput(output), s, images, "vlb", timesteps=timesteps, noise=noise,
                                 vlb_weight=0.5).loss  # fmt: skip
    torch.testing.assert_close(other, per_sample.detach())


# -- training ---------------------------------------------------------------------------------


def test_a_run_with_importance_sampling_warms_up_and_keeps_its_history_in_checkpoints(tmp_path, caplog):
    out, steps = tmp_path / "lvlb", 8
    with caplog.at_level("INFO"):
        result = run_training(out, "--resolution", "16", "--max_train_steps", steps, "--train_batch_size", "8",
                              "--num_train_timesteps", "10", "--variance_type", "learned_range", "--loss_weighting", "vlb",
                              "--timestep_sampling", "importance", "--importance_history", "1", "--checkpointing_steps", "4",
                              "--save_images_steps", "none")  # fmt: skip
    assert result.global_step == steps
    assert "timesteps are now drawn by importance" in caplog.text
    state = torch.load(out / "checkpoint-8" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
    assert state["counts"].sum() == steps * 8
    assert torch.all(state["losses"] > 0)  # every bound term is a positive number of bits
    earlier = torch.load(out / "checkpoint-4" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
    assert earlier["counts"].sum() == 4 * 8
    # warm by the end, and then far from uniform: the decoder term and the first KLs dominate
    sampler = ImportanceTimestepSampler(10, history=1)
    sampler.load_state_dict(state)
    p = sampler.probabilities()
    assert sampler.warm and p.max() > 3 * p.min()
    config = TrainingConfig.load(out / "training_config.json")
    assert (config.timestep_sampling, config.loss_weighting, config.importance_history) == ("importance", "vlb", 1)


def test_resuming_a_uniform_run_with_importance_sampling_starts_a_new_history(tmp_path, caplog):
    out = tmp_path / "switch"
    common = ["--resolution", "16", "--train_batch_size", "4", "--num_train_timesteps", str(T),
              "--checkpointing_steps", "2", "--save_images_steps", "none"]  # fmt: skip
    run_training(out, *common, "--max_train_steps", "2")
    reset_accelerate()
    with caplog.at_level("WARNING"):
        run_training(out, *common, "--max_train_steps", "4", "--timestep_sampling", "importance",
                     "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "holds no timestep loss history" in caplog.text
    state = torch.load(out / "checkpoint-4" / TIMESTEP_SAMPLER_STATE_NAME, weights_only=True)
    assert state["counts"].sum() == 2 * 4  # the two resumed steps only


def test_the_estimator_spread_benchmark_matches_a_direct_simulation(tmp_path):
    DDPMTargetPipeline(unet=learned_unet(), scheduler=scheduler()).save_pretrained(tmp_path / "pipe")
    benchmark = load_benchmark("timestep_sampling_profile")
    summary = benchmark.main(["--model", str(tmp_path / "pipe"), "--output", str(tmp_path / "p.png"), "--json",
                              str(tmp_path / "p.json"), "--num_images", "3", "--batch_size", "1"])  # fmt: skip
    assert (tmp_path / "p.png").is_file() and json.loads((tmp_path / "p.json").read_text()) == summary
    assert summary["loss_weighting"] == "vlb" and summary["timesteps"] == list(range(T))
    # redo it by drawing (t, image) pairs from the same table of losses
    _, losses = benchmark.per_timestep_losses(str(tmp_path / "pipe"), "vlb", 3, 1, 0)
    assert losses.mean().item() == pytest.approx(summary["objective"], rel=1e-9)
    p = torch.tensor(summary["p"], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 3, (200_000,), generator=generator)
    uniform = losses[torch.randint(0, T, (200_000,), generator=generator), images]
    drawn = torch.multinomial(p, 200_000, replacement=True, generator=generator)
    weighted = losses[drawn, images] / (T * p[drawn])
    assert uniform.std().item() == pytest.approx(summary["uniform_std"], rel=0.02)
    assert weighted.std().item() == pytest.approx(summary["importance_std"], rel=0.02)
    assert summary["std_ratio"] > 1  # the bound's terms differ widely over t even for an untrained network
