"""Latent consistency fine-tuning (Algorithm 4): known answers for its loss, a toy LCM moved to new data, and
`lcm finetune` end to end on tiny models (full, new LoRA adapters on an LCM, and an LCM-LoRA)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.losses import LCFLoss
from latent_consistency.schedule import NoiseSchedule, consistency_pairs
from latent_consistency.testing.analytic import GaussianMixtureEps, gaussian_flow

MEAN, STD = torch.tensor([[0.5, -0.5]]), 0.4


def expected_lcf_loss(schedule: NoiseSchedule, skip: int, offset: float = 0.0) -> float:
    """E d(f*(z_{t_{n+k}}) + offset, f*(z_{t_n})) under l2 for x0 ~ N(μ, s²I) and the exact f* = Φ(·; t -> 0).

    With z_t = α_t x0 + σ_t ε and f*(z_t) = α_0 μ + q_t (z_t − α_t μ), q_t = √(v_0/v_t), v_t = α_t² s² + σ_t², the
    difference of the two sides is Δ(qα)(x0 − μ) + Δ(qσ) ε (+ offset): its mean square per element is
    Δ(qα)² s² + Δ(qσ)² (+ offset²), averaged over the grid pairs n drawn uniformly.
    """
    grid = torch.arange(skip - 1, schedule.num_train_timesteps, skip)
    t_next, t_n = consistency_pairs(grid, torch.arange(len(grid)), skip)
    a0, s0 = schedule.alpha_sigma(torch.tensor([0]))
    v0 = a0**2 * STD**2 + s0**2

    def q_alpha_sigma(t):
        a, s = schedule.alpha_sigma(t)
        q = (v0 / (a**2 * STD**2 + s**2)).sqrt()
        return q * a, q * s

    (qa1, qs1), (qa0, qs0) = q_alpha_sigma(t_next), q_alpha_sigma(t_n)
    return float(((qa1 - qa0) ** 2 * STD**2 + (qs1 - qs0) ** 2).mean()) + offset**2


def test_lcf_loss_of_the_exact_consistency_function_is_the_one_step_estimators_variance():
    """LCF's target is one noisy step along the data's forward path, not the ODE: for the exact f* its loss is the
    known variance of that estimator (small, not zero), and an offset of 0.1 adds exactly 0.01."""
    schedule = NoiseSchedule.from_config({})
    net = GaussianMixtureEps(MEAN, STD, schedule)
    x0 = net.sample(40_000, torch.ones(1, dtype=torch.float64), torch.Generator().manual_seed(0))
    cond = torch.ones(len(x0), 1, dtype=torch.float64)

    def exact_f(z, t, c, omega):
        return gaussian_flow(z, t, torch.zeros_like(t), MEAN[0], STD, schedule)

    def biased_f(z, t, c, omega):
        return exact_f(z, t, c, omega) + 0.1

    loss = LCFLoss(schedule, skip=20, distance="l2")
    exact = loss(exact_f, exact_f, x0, cond, generator=torch.Generator().manual_seed(1)).mean().item()
    biased = loss(biased_f, exact_f, x0, cond, generator=torch.Generator().manual_seed(1)).mean().item()
    assert exact == pytest.approx(expected_lcf_loss(schedule, 20), rel=0.05)
    assert biased == pytest.approx(expected_lcf_loss(schedule, 20, offset=0.1), rel=0.05)
    assert exact < 0.05 * biased
    # the estimator's variance shrinks with the step: k = 5 is four times closer than k = 20
    fine = LCFLoss(schedule, skip=5, distance="l2")(exact_f, exact_f, x0, cond, generator=torch.Generator().manual_seed(1)).mean().item()
    assert fine == pytest.approx(expected_lcf_loss(schedule, 5), rel=0.05) and fine < exact / 3


def test_lcf_uses_one_noise_for_both_points_and_no_teacher():
    """z_{t_n} and z_{t_{n+k}} are α·x0 + σ·ε with the same x0 and ε; the loss has no teacher to call."""
    schedule = NoiseSchedule.from_config({})
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = {}

    def spy(name):
        def f(z, t, c, omega):
            seen[name] = (z, t)
            return z * 0
        return f

    loss = LCFLoss(schedule, skip=20, distance="l2")
    loss(spy("student"), spy("target"), x0, torch.ones(64, 1, dtype=torch.float64), generator=torch.Generator().manual_seed(3))
    noises = []
    for name in ("student", "target"):
        z, t = seen[name]
        alpha, sigma = schedule.alpha_sigma(t)
        noises.append((z - alpha[:, None] * x0) / sigma[:, None])
    assert (seen["student"][1] - seen["target"][1] == 20).sum() > 0.9 * 64  # t_{n+k} - t_n = k (but at the clamped first pair)
    torch.testing.assert_close(noises[0], noises[1])
    assert not hasattr(loss, "teacher")


@pytest.mark.slow
def test_lcf_moves_a_toy_lcm_to_new_data():
    """A toy LCM distilled from a two-class mixture, fine-tuned with LCF on the same classes moved by (0, 1.5): its
    1-step samples follow the data to the new means; without fine-tuning they stay at the old ones."""
    from latent_consistency.sampling import sample_lcm
    from latent_consistency.testing.toy2d import TOY_MEANS, class_weights, distill_toy2d, finetune_toy2d

    shifted = tuple((a, b + 1.5) for a, b in TOY_MEANS)
    lcm = distill_toy2d("dpm++", seed=0)
    tuned = finetune_toy2d(lcm, shifted, steps=800)
    n = 1000
    for label in (0, 1):
        cond = class_weights(torch.full((n,), label), 2)
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(label))
        before, after = (sample_lcm(f, noise, torch.tensor([999]), cond, 0.0, f.schedule).mean(0) for f in (lcm, tuned))
        old, new = torch.tensor(TOY_MEANS[label]), torch.tensor(shifted[label])
        assert (after - new).norm() < 0.2 * 1.5 < (after - old).norm(), (before, after)
        assert (before - old).norm() < 0.2 * 1.5, before


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 40, caption="a green ring number {i}")


def finetune_args(model, data, out, *extra):
    return ["finetune", "--preset", "tiny", "--model", str(model), "--data", str(data), "--out", str(out), *extra]


def test_finetune_an_lcm_with_a_held_out_split(tiny_lcm, image_folder, tmp_path, monkeypatch):
    """The exported LCM keeps the model's scheduler settings and runs in diffusers; held-out loss is logged and the
    validation grid shows held-out captions; no teacher is ever asked for a guided output."""
    from diffusers import LatentConsistencyModelPipeline

    from latent_consistency.denoisers import GuidedTeacher

    monkeypatch.setattr(GuidedTeacher, "guided_output", lambda *a, **k: pytest.fail("LCF called a teacher"))
    out = tmp_path / "run"
    assert main(finetune_args(tiny_lcm, image_folder, out, "--eval-fraction", "0.25", "--validate-every", "2")) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [2, 4] and all(np.isfinite(m.get("eval_loss", 0)) for m in metrics)
    saved = json.loads((out / "config.json").read_text())
    assert saved["objective"] == "lcf" and saved["model"] == str(tiny_lcm)
    exported = json.loads((out / "lcm" / "scheduler" / "scheduler_config.json").read_text())
    original = json.loads((tiny_lcm / "scheduler" / "scheduler_config.json").read_text())
    assert all(exported[k] == original[k] for k in ("original_inference_steps", "timestep_scaling", "prediction_type", "num_train_timesteps"))
    assert Image.open(out / "samples" / "step-0000004.png").size[1] > 4 * 16  # captions above four rows of images
    pipe = LatentConsistencyModelPipeline.from_pretrained(out / "lcm", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe("a green ring", num_inference_steps=2, height=16, width=16, output_type="np").images).all()


def test_finetune_new_lora_adapters_on_an_lcm_and_sample_them(tiny_lcm, image_folder, tmp_path):
    out = tmp_path / "lora-on-lcm"
    assert main(finetune_args(tiny_lcm, image_folder, out, "--adapter", "lora", "--lora-rank", "4", "--lr", "1e-2")) == 0
    assert main(["generate", "a green ring", "--model", str(tiny_lcm), "--lora", str(out / "lora"), "--steps", "2",
                 "--out", str(tmp_path / "images")]) == 0
    assert main(["generate", "a green ring", "--model", str(tiny_lcm), "--steps", "2", "--out", str(tmp_path / "plain")]) == 0
    tuned, plain = (np.asarray(Image.open(tmp_path / d / "0000-a-green-ring.png"), dtype=np.int16) for d in ("images", "plain"))
    assert np.abs(tuned - plain).max() > 0, "the fine-tuned LoRA changed nothing"


def test_finetune_an_lcm_lora_trains_that_lora(tiny_sd, image_folder, tmp_path):
    from safetensors.torch import load_file

    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lcm-lora", tiny_sd)
    out = tmp_path / "run"
    assert main(finetune_args(tiny_sd, image_folder, out, "--lora", str(lora), "--adapter", "lora", "--lr", "1e-2")) == 0
    before = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    after = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert main(["generate", "a ring", "--model", str(tiny_sd), "--lora", str(out / "lora"), "--steps", "2",
                 "--out", str(tmp_path / "images")]) == 0


@pytest.mark.parametrize("case", ["not an lcm", "teacher flag", "teacher field in a config", "empty eval split", "lora without adapter",
                                  "eval data and fraction", "eval fraction out of range"])
def test_finetune_bad_input(case, tiny_sd, tiny_lcm, image_folder, tmp_path, run_error):
    (tmp_path / "lcd.json").write_text(json.dumps({"solver": "dpm++"}))
    one = tmp_path / "one-image"
    one.mkdir()
    Image.new("RGB", (16, 16)).save(one / "a.png")
    (one / "a.txt").write_text("a caption")
    out = tmp_path / "out"
    cases = {
        "not an lcm": (finetune_args(tiny_sd, image_folder, out), "without the guidance input of an LCM"),
        "teacher flag": (finetune_args(tiny_lcm, image_folder, out, "--solver", "dpm++"), "--solver belongs to lcm distill"),
        "teacher field in a config": (finetune_args(tiny_lcm, image_folder, out, "--config", str(tmp_path / "lcd.json")),
                                      "solver belong(s) to lcm distill: fine-tuning has no teacher"),
        "empty eval split": (finetune_args(tiny_lcm, one, out, "--eval-fraction", "0.1"), "leaves the"),
        "lora without adapter": (finetune_args(tiny_sd, image_folder, out, "--lora", str(tmp_path)), "use --adapter lora"),
        "eval data and fraction": (finetune_args(tiny_lcm, image_folder, out, "--eval-fraction", "0.1", "--eval-data", str(image_folder)),
                                   "not both"),
        "eval fraction out of range": (finetune_args(tiny_lcm, image_folder, out, "--eval-fraction", "1.5"), "--eval-fraction must be in [0, 1)"),
    }
    argv, message = cases[case]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.iterdir())
