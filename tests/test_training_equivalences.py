"""Training settings that must not change what is learned, or must change it exactly as documented: gradient
accumulation, the learning-rate schedule (warm-up, decay, the ω group, weight decay, resume), gradient clipping, the
target's EMA, the seed, and how often a run logs, validates and checkpoints. Each is checked on the tiny teacher in a
step or a few, against a case with a known answer."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latent_consistency.training import loop
from latent_consistency.training.checkpoint import list_checkpoints
from latent_consistency.training.config import DistillConfig, resolve_config

LR = 1e-3


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


@pytest.fixture
def distil(tiny_sd, image_folder, tmp_path):
    """Train the tiny teacher's student with the tiny preset (2 steps, batch 4, no warm-up) and `overrides`; the run
    folder."""
    runs = iter(range(100))

    def run(resume: bool = False, out: Path | None = None, **overrides) -> Path:
        out = out or tmp_path / f"run-{next(runs)}"
        config = resolve_config(DistillConfig, "tiny", overrides=dict(teacher=str(tiny_sd), data=str(image_folder), out=str(out), steps=2,
                                                                       checkpoint_every=0, lr=LR) | overrides)
        loop.train(config, resume=resume, progress=False)
        return out

    return run


@pytest.fixture
def optimiser_steps(monkeypatch):
    """What each AdamW step is given: its parameter groups' rates and weight decays, and its (clipped) gradients."""
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        groups = self.param_groups
        seen.append(dict(lr=[g["lr"] for g in groups], weight_decay=[g["weight_decay"] for g in groups],
                         grad=torch.cat([p.grad.flatten() for g in groups for p in g["params"] if p.grad is not None]).clone()))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    return seen


def checkpoint_weights(out: Path, which: str = "student") -> list[dict[str, torch.Tensor]]:
    return [load_file(str(path / f"{which}.safetensors")) for path in list_checkpoints(out)]


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [{}, dict(guidance_pair_weight=5.0), dict(adapter="lora", lora_rank=4)], ids=["lcd", "pair", "lora"])
def test_grad_accumulation_gives_the_gradient_of_the_whole_batch(distil, optimiser_steps, extra):
    """--grad-accumulation 2 at batch 4: the same samples with the same n, ω, ε (and ω') draws per example as one batch of
    4, so the gradient the optimiser steps on is the same but for float rounding. Each micro-batch used to draw from its
    own generator: other draws, a gradient as far from the whole batch's as another seed's."""
    distil(steps=1, **extra)
    distil(steps=1, grad_accumulation=2, **extra)
    whole, accumulated = (seen["grad"] for seen in optimiser_steps)
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=1e-4 * whole.abs().max().item())


def test_the_learning_rate_warms_up_decays_and_a_resumed_run_goes_on_with_it(distil, optimiser_steps):
    """Warm-up W = 2 steps: (s+1)/W × lr at step s; then cosine decay from lr at step W to 0 at --steps (one past the last
    step, which still trains), for the ω projection at --omega-lr-scale times the others' rate; weight decay on both groups.
    Resumed from the step-3 checkpoint, steps 3-5 get the same rates; resumed with --steps 12, they follow the schedule
    over 12 steps from step 3 on, as the resume note and the metrics say. The first resumed step used to take the
    rate its checkpoint's schedule gave it (the optimiser state's)."""
    settings = dict(steps=6, lr_warmup_steps=2, lr_schedule="cosine", checkpoint_every=3, keep_checkpoints=10, omega_lr_scale=10.0,
                    weight_decay=0.01)
    out = distil(**settings)
    cosine = [0.5, 1.0, 1.0] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in (3, 4, 5)]
    assert [seen["lr"][0] for seen in optimiser_steps] == pytest.approx([LR * f for f in cosine])
    assert all(seen["lr"][1] == pytest.approx(10 * seen["lr"][0]) for seen in optimiser_steps)
    assert all(seen["weight_decay"] == [0.01, 0.01] for seen in optimiser_steps)

    def resume(**changed) -> list[float]:
        shutil.rmtree(out / "checkpoints" / "step-0000006", ignore_errors=True)
        shutil.rmtree(out / "lcm", ignore_errors=True)
        optimiser_steps.clear()
        distil(resume=True, out=out, **settings | changed)
        return [seen["lr"][0] for seen in optimiser_steps]

    assert resume() == pytest.approx([LR * f for f in cosine[3:]])
    longer = [0.5 * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(3, 12)]
    assert resume(steps=12) == pytest.approx([LR * f for f in longer])


def test_the_linear_schedule_decays_to_zero_one_step_past_the_last():
    config = DistillConfig(steps=6, lr_warmup_steps=2, lr_schedule="linear")
    assert [loop.lr_lambda(config)(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_gradients_are_clipped_to_max_grad_norm_over_the_whole_student(distil, optimiser_steps):
    """--max-grad-norm c: the optimiser steps on the gradient scaled so that its norm over every trainable parameter
    (both parameter groups) is c, and the metrics log its norm before clipping."""
    import json

    out = distil(steps=1, max_grad_norm=0.01, omega_lr_scale=10.0)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert logged > 0.01
    assert optimiser_steps[0]["grad"].norm().item() == pytest.approx(0.01, rel=1e-4)


def test_the_target_moves_by_the_ema_formula_once_per_optimiser_step(distil):
    """--ema-decay μ with --grad-accumulation 2: after each optimiser step θ⁻ ← μθ⁻ + (1−μ)θ, once (not per micro-batch)."""
    mu = 0.5
    out = distil(steps=3, ema_decay=mu, grad_accumulation=2, checkpoint_every=1, keep_checkpoints=10)
    students, targets = checkpoint_weights(out), checkpoint_weights(out, "target")
    for before, student, after in zip(targets, students[1:], targets[1:]):
        for name in after:
            torch.testing.assert_close(after[name], mu * before[name] + (1 - mu) * student[name], rtol=0, atol=1e-6)


def test_ema_decay_zero_exports_the_student_itself(distil):
    """μ = 0: no separate target; the exported model is the student, bitwise."""
    out = distil(ema_decay=0.0)
    (final,) = checkpoint_weights(out)
    assert not (list_checkpoints(out)[-1] / "target.safetensors").exists()
    assert equal(load_file(str(out / "lcm" / "unet" / "diffusion_pytorch_model.safetensors")), final)


def test_one_seed_one_student_whatever_is_logged_validated_or_checkpointed(distil):
    """Two runs with one seed are bitwise equal, also when one logs, validates and checkpoints at every step; another seed
    gives another student."""
    (first,) = checkpoint_weights(distil(log_every=5))
    busy = checkpoint_weights(distil(log_every=1, validate_every=1, checkpoint_every=1, keep_checkpoints=10))
    (other,) = checkpoint_weights(distil(seed=1, log_every=5))
    assert equal(busy[-1], first)
    assert not equal(other, first)
