"""The learning-rate schedule follows diffusers' named schedules over the run's real length."""

import json
import logging
import math

import pytest
import torch
from diffusers.optimization import get_scheduler

import ddpm_pipeline.training as training_module
from ddpm_pipeline.lr_schedule import DECAYING_SCHEDULES, RunLengthLR, warmup_advice
from ddpm_pipeline.training import main
from ddpm_pipeline.training_config import LR_SCHEDULERS

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PEAK = 2e-3


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.zeros(3, requires_grad=True)], lr=PEAK)


def learning_rates(scheduler, steps: int, clock=None, observe_every: int = 1) -> list[float]:
    """The learning rate used at optimizer steps 1..steps (read before each step, as training
    logs it); ``clock(n)`` gives the training seconds after n steps."""
    rates = []
    for step in range(1, steps + 1):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()  # a no-op (no gradients), in the order torch expects
        scheduler.step()
        if clock is not None and step % observe_every == 0:
            scheduler.observe(step, clock(step))
    return rates


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_without_a_budget_it_is_diffusers_schedule_exactly(name):
    ours = learning_rates(RunLengthLR(optimizer(), name, warmup_steps=7, total_steps=50), 50)
    stock = learning_rates(get_scheduler(name, optimizer(), num_warmup_steps=7, num_training_steps=50), 50)
    assert ours == stock


@pytest.mark.parametrize("name", DECAYING_SCHEDULES)
def test_a_budget_at_constant_speed_gives_the_schedule_of_the_steps_it_allows(name):
    """0.5 s per step and a 40 s budget allow 80 steps of a 10,000-step limit: once the speed has
    been measured (two clock readings), every learning rate is diffusers' schedule for 80 steps."""
    budgeted = RunLengthLR(optimizer(), name, warmup_steps=10, total_steps=10_000, budget_seconds=40.0)
    ours = learning_rates(budgeted, 80, clock=lambda n: 0.5 * n)
    stock = learning_rates(get_scheduler(name, optimizer(), num_warmup_steps=10, num_training_steps=80), 80)
    assert budgeted.expected_total_steps() == 80
    assert ours[:2] == stock[:2] and ours[2:] == pytest.approx(stock[2:], rel=1e-9, abs=1e-15)


def test_the_decay_ends_with_the_budget_when_the_speed_changes():
    """The first 100 steps take 1 s each, the rest 0.25 s (say, another job left the machine):
    progress is training time, so the cosine is at its middle after 75 s and has decayed to nearly
    0 when the 150-s budget is spent, 300 steps in."""

    def clock(n: int) -> float:
        return float(n) if n <= 100 else 100 + 0.25 * (n - 100)

    scheduler = RunLengthLR(optimizer(), "cosine", warmup_steps=0, total_steps=10_000, budget_seconds=150.0)
    rates = learning_rates(scheduler, 300, clock=clock)  # the budget is spent after step 300
    assert scheduler.expected_total_steps() == 300
    assert rates[-1] < 1e-3 * PEAK and rates[0] == PEAK
    assert rates[75] == pytest.approx(0.5 * PEAK, rel=0.05)  # step 76 starts 75 s in: half the budget


def test_the_step_limit_wins_when_it_comes_first():
    scheduler = RunLengthLR(optimizer(), "linear", warmup_steps=5, total_steps=40, budget_seconds=3600.0)
    ours = learning_rates(scheduler, 40, clock=lambda n: 0.1 * n, observe_every=4)
    assert ours == learning_rates(get_scheduler("linear", optimizer(), num_warmup_steps=5, num_training_steps=40), 40)


def test_state_round_trip_and_old_lambdalr_checkpoints(tmp_path):
    """The state is saved without the schedule function (torch.save works) and restores the
    position and the last clock reading; a checkpoint of diffusers' LambdaLR loads too."""
    first = RunLengthLR(optimizer(), "cosine", warmup_steps=2, total_steps=1000, budget_seconds=30.0)
    learning_rates(first, 20, clock=lambda n: 0.5 * n)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = RunLengthLR(optimizer(), "cosine", warmup_steps=2, total_steps=1000, budget_seconds=30.0)
    second.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert second.expected_total_steps() == first.expected_total_steps() == 60
    assert learning_rates(second, 30) == learning_rates(first, 30)
    assert second.restored_definition == first.definition() == {"name": "cosine", "warmup_steps": 2, "step_limit": 1000,
                                                                "budget_seconds": 30.0}  # fmt: skip
    constant = RunLengthLR(optimizer(), "constant", warmup_steps=2, total_steps=1000, budget_seconds=30.0)
    assert constant.definition()["step_limit"] is None  # its rates do not depend on the run's length

    old = get_scheduler("cosine", optimizer(), num_warmup_steps=2, num_training_steps=100)
    learning_rates(old, 10)
    resumed = RunLengthLR(optimizer(), "cosine", warmup_steps=2, total_steps=100)
    resumed.load_state_dict(old.state_dict())
    assert learning_rates(resumed, 20) == learning_rates(old, 20)
    assert resumed.restored_definition is None  # not recorded then: nothing to compare


def test_restarting_at_the_restored_step_takes_the_new_schedule_s_rate(tmp_path):
    """A 10-step cosine schedule's position restored into a 20-step one: the next step's rate is the
    20-step schedule's at step 10, as in a run that was always 20 steps long."""
    short = RunLengthLR(optimizer(), "cosine", warmup_steps=0, total_steps=10)
    learning_rates(short, 10)
    long = RunLengthLR(optimizer(), "cosine", warmup_steps=0, total_steps=20)
    long.load_state_dict(short.state_dict())
    assert long.get_last_lr() == short.get_last_lr() == [0.0]  # the decay's end, restored
    long.restart_here()
    straight = RunLengthLR(optimizer(), "cosine", warmup_steps=0, total_steps=20)
    learning_rates(straight, 10)
    assert long.get_last_lr() == straight.get_last_lr() and long.optimizer.param_groups[0]["lr"] == straight.get_last_lr()[0]
    assert learning_rates(long, 5) == learning_rates(straight, 5)


def test_a_time_budgeted_run_anneals_its_learning_rate(tmp_path, monkeypatch, caplog):
    """train_ddpm.py with --max_train_minutes and the cosine schedule: on a clock that ticks one
    second per reading the budget allows far fewer steps than --max_train_steps, and the logged
    learning rate falls from its peak to nearly 0 at the last step (a cosine planned over the
    10,000-step limit alone would end near its peak)."""
    ticks = {"now": 0.0}
    monkeypatch.setattr(training_module.time, "perf_counter", lambda: ticks.__setitem__("now", ticks["now"] + 1.0) or ticks["now"])
    out = tmp_path / "run"
    options = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
               "--report_to", "none", "--train_batch_size", "4", "--save_images_steps", "none", "--checkpointing_steps",
               "none", "--lr_scheduler", "cosine", "--lr_warmup_steps", "3", "--learning_rate", str(PEAK),
               "--max_train_steps", "10000", "--output_dir", str(out)]  # fmt: skip
    result = main([*options, "--max_train_minutes", "1"])
    monkeypatch.undo()
    assert result.finished and 10 < result.global_step < 10000
    rows = (out / "loss_history.csv").read_text().splitlines()[1:]
    rates = [float(row.split(",")[2]) for row in rows]
    assert len(rates) == result.global_step and max(rates) == pytest.approx(PEAK, rel=0.05)
    after_warmup = rates[3:]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(after_warmup[2:], after_warmup[3:], strict=False))  # decays
    assert rates[-1] < 0.05 * PEAK
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["max_train_minutes"] == 1 and saved["lr_scheduler"] == "cosine"
    assert math.isfinite(result.final_loss)
    # a larger budget trains it further, its decay stretched over the new budget from the next step on
    monkeypatch.setattr(training_module.time, "perf_counter", lambda: ticks.__setitem__("now", ticks["now"] + 1.0) or ticks["now"])
    with caplog.at_level(logging.INFO, logger="ddpm_pipeline.training"):
        further = main([*options, "--max_train_minutes", "2", "--resume_from_checkpoint", "latest"])
    monkeypatch.undo()
    assert further.finished and further.global_step > result.global_step
    assert f"--max_train_minutes 1 → 2; the learning rate from step {result.global_step + 1} on follows" in caplog.text
    rates = [float(row.split(",")[2]) for row in (out / "loss_history.csv").read_text().splitlines()[1:]]
    assert rates[result.global_step] > 0.2 * PEAK and rates[-1] < 0.05 * PEAK  # back up, then decayed again


@pytest.mark.parametrize(("name", "warmup", "steps"), [("cosine", 100, 100), ("linear", 500, 100), ("constant_with_warmup", 40, 8)])
def test_a_warmup_that_fills_the_run_is_warned_of_with_the_rate_it_reaches(name, warmup, steps):
    """With --lr_warmup_steps ≥ the run's steps the rate only climbs: the warning gives the share of
    --learning_rate it reaches at the last step (read off the schedule itself) and a shorter warmup."""
    advice = warmup_advice(name, warmup, steps)
    last = learning_rates(RunLengthLR(optimizer(), name, warmup_steps=warmup, total_steps=steps), steps)[-1]
    assert f"the learning rate climbs for the whole run, to {last / PEAK:.0%} of --learning_rate at its last step" in advice
    assert ("decay never starts" in advice) == (name in DECAYING_SCHEDULES)
    assert f"--lr_warmup_steps {steps // 10} (a tenth of the run)" in advice
    assert warmup_advice(name, steps - 1, steps) is None  # a warmup shorter than the run is the user's choice
    assert warmup_advice("constant", warmup, steps) is None  # constant has no warmup (diffusers ignores it)


def test_a_short_run_with_the_default_warmup_is_warned(tmp_path, caplog):
    """The default --lr_warmup_steps 100 in a 3-step run: the log says the run is all warmup."""
    options = ["--model", "ddpm-tiny-16", "--resolution", "16", "--grid_inference_steps", "2", "--num_grid_images", "4",
               "--report_to", "none", "--train_batch_size", "4", "--save_images_steps", "none", "--checkpointing_steps",
               "none", "--max_train_steps", "3", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ddpm_pipeline.training"):
        main(options)
    assert "--lr_warmup_steps 100 is not shorter than this run's 3 steps" in caplog.text
