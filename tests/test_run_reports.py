"""What a training run shows its user while it trains: its validation grids and the numbers it logs mean what they say."""

from pathlib import Path

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.training import run_folder

PROMPTS = ["a red star", "a blue ring"]
SEED = 5


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def grid_rows(monkeypatch) -> list[list[torch.Tensor]]:
    """The rows of every validation grid a run draws, as `image_grid` is given them (images in [-1, 1])."""
    grids, draw = [], run_folder.image_grid
    monkeypatch.setattr(run_folder, "image_grid", lambda rows, *args, **kwargs: grids.append(rows) or draw(rows, *args, **kwargs))
    return grids


def distill(tiny_sd, data, out: Path, *extra) -> None:
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), "--seed", str(SEED),
                 "--validation-prompts", *PROMPTS, *extra]) == 0


def sweep_guidance_scale(out: Path) -> float:
    """The g `lcm evaluate sweep` scores a run's checkpoints at by default (a LoRA's: its teacher ODE reference)."""
    from latent_consistency.training.run_folder import saved_config
    from latent_consistency.world.over_training import run_guidance_scale

    return run_guidance_scale(saved_config(out / "config.json"))


def generated(generator, g: float) -> list[torch.Tensor]:
    """`lcm generate PROMPTS --seed SEED --steps n -g G` of the exported model, for the grid's step counts."""
    size = generator.default_size()
    return [generator(PROMPTS, generator.timesteps(n), g, [SEED + i for i in range(len(PROMPTS))], size, size)
            for n in run_folder.VALIDATION_STEPS]


def test_an_lcm_lora_runs_grid_is_what_lcm_generate_makes_of_it_by_default(tiny_sd, image_folder, tmp_path, monkeypatch):
    """An LCM-LoRA has its guidance distilled in and no ω input: `lcm generate --lora` samples it without classifier-free
    guidance by default (g = 1), as diffusers validates one. The grid drew all its images from one generator, so none could
    be made again with `lcm generate`: now each is `lcm generate`'s at --seed SEED and its steps. --validation-guidance-scale
    is not applied on top of the distilled guidance; it stays the teacher's g that `lcm evaluate sweep` compares with."""
    from latent_consistency.pipelines import LCMGenerator

    grids, out = grid_rows(monkeypatch), tmp_path / "run"
    distill(tiny_sd, image_folder, out, "--adapter", "lora", "--lora-rank", "4", "--validation-guidance-scale", "3")
    generator = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(out / "lora"))
    assert generator.default_guidance_scale() == 1
    for row, image in zip(grids[-1][1:], generated(generator, 1.0), strict=True):  # the start row, then the target's 1, 2, 4 steps
        torch.testing.assert_close(row, image, atol=1e-4, rtol=0)
    assert sweep_guidance_scale(out) == 3.0


def test_a_full_lcm_runs_grid_is_what_lcm_generate_makes_of_it_at_its_default_guidance_scale(tiny_sd, image_folder, tmp_path,
                                                                                              monkeypatch):
    """A full LCM takes g through its ω input, at its record's default g when none is given (here the preset's 8): each
    image of the grid is `lcm generate`'s of the exported LCM at --seed SEED, its steps and that g."""
    from latent_consistency.pipelines import LCMGenerator

    grids, out = grid_rows(monkeypatch), tmp_path / "run"
    distill(tiny_sd, image_folder, out)
    generator = LCMGenerator.load(str(out / "lcm"), torch.device("cpu"), torch.float32)
    for row, image in zip(grids[-1][1:], generated(generator, generator.default_guidance_scale()), strict=True):
        torch.testing.assert_close(row, image, atol=1e-4, rtol=0)
    assert sweep_guidance_scale(out) == generator.default_guidance_scale()  # and `lcm evaluate sweep` scores it there


def test_an_lcm_lora_fine_tuned_with_lcf_is_shown_as_lcm_generate_samples_it_before_and_after(tiny_sd, image_folder, tmp_path,
                                                                                               monkeypatch):
    """LCF of an LCM-LoRA: the grid's starting row is `lcm generate --lora` of the LoRA it started from (4 steps), its
    other rows that of the fine-tuned LoRA, both at `lcm generate`'s default g for an LCM-LoRA."""
    from latent_consistency.pipelines import LCMGenerator
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lcm-lora", tiny_sd)
    grids, out = grid_rows(monkeypatch), tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--model", str(tiny_sd), "--lora", str(lora), "--adapter", "lora", "--data",
                 str(image_folder), "--out", str(out), "--seed", str(SEED), "--validation-prompts", *PROMPTS]) == 0
    before = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(lora))
    after = LCMGenerator.load(str(tiny_sd), torch.device("cpu"), torch.float32, lora=str(out / "lora"))
    torch.testing.assert_close(grids[-1][0], generated(before, 1.0)[-1], atol=1e-4, rtol=0)  # VALIDATION_STEPS end at the start row's 4
    for row, image in zip(grids[-1][1:], generated(after, 1.0), strict=True):
        torch.testing.assert_close(row, image, atol=1e-4, rtol=0)


def test_a_pixart_lcms_grid_is_what_lcm_generate_makes_of_it_by_default(tiny_pixart, image_folder, tmp_path, monkeypatch):
    """A PixArt LCM has its one guidance scale distilled in and no ω input: `lcm generate` samples it without classifier-free
    guidance by default (g = 1), as its model card says. The grid shows that, not the distillation's g applied a second
    time as classifier-free guidance."""
    from latent_consistency.pipelines import LCMGenerator

    grids, out = grid_rows(monkeypatch), tmp_path / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_pixart), "--data", str(image_folder), "--out", str(out),
                 "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5", "--seed", str(SEED), "--validation-prompts", *PROMPTS]) == 0
    generator = LCMGenerator.load(str(out / "lcm"), torch.device("cpu"), torch.float32)
    assert generator.default_guidance_scale() == 1
    for row, image in zip(grids[-1][1:], generated(generator, 1.0), strict=True):
        torch.testing.assert_close(row, image, atol=1e-4, rtol=0)


def test_num_workers_with_a_latent_cache_is_refused_in_one_line_before_the_run_writes(tiny_sd, image_folder, tmp_path, run_error):
    """A latent cache is indexed in the training process: --num-workers N with one was silently 0, while `--help` said so of shards only."""
    cache = tmp_path / "cache"
    assert run_error(["cache", "--model", str(tiny_sd), "--data", str(image_folder), "--out", str(cache)])[0] == 0
    out = tmp_path / "run"
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(cache), "--out", str(out),
                           "--num-workers", "2"])
    assert code == 2 and len(err.splitlines()) == 1 and "latent cache" in err and "--num-workers 0" in err, err
    assert not out.exists() or not any(out.iterdir())


def test_samples_per_s_is_the_training_throughput_without_setup_grids_or_checkpoints(tiny_sd, image_folder, tmp_path, monkeypatch):
    """The throughput's clock ran from the run folder's making: the first window held whatever came before the first step
    (an ODE bank solved, here 1,000 s on a fake clock), and every window after a validation its held-out loss, grids and
    checkpoint. Now a window holds training steps only, and the first step's line has no rate (null)."""
    import json
    from types import SimpleNamespace

    from latent_consistency.training import loop

    clock = {"t": 0.0}

    def now() -> float:  # one second between any two readings, besides the setup and validation below
        clock["t"] += 1
        return clock["t"]

    validate, ode_targets = run_folder.RunFolder.validate, loop.run_ode_targets

    def slow(advance, function):
        return lambda *args, **kwargs: clock.update(t=clock["t"] + advance) or function(*args, **kwargs)

    monkeypatch.setattr(run_folder, "time", SimpleNamespace(perf_counter=now))
    monkeypatch.setattr(run_folder.RunFolder, "validate", slow(1000, validate))
    monkeypatch.setattr(loop, "run_ode_targets", slow(1000, ode_targets))
    out = tmp_path / "run"
    distill(tiny_sd, image_folder, out, "--steps", "3", "--validate-every", "1", "--checkpoint-every", "0")
    rates = [json.loads(line).get("samples_per_s", "-") for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in rates if r != "-"]
    assert rates[0] is None and len(rates) == 3 and all(r > 4 / 10 for r in rates[1:]), rates


def test_eval_loss_is_the_same_number_with_any_grad_accumulation(tiny_sd, image_folder, tmp_path):
    """eval_loss was the mean over four micro-batches with draws seeded per micro-batch: with --grad-accumulation 2 it was
    half the held-out samples, with other n, ω and ε, so the same model logged another number. Now it is the loss of the
    first four batches' samples, each with the draws it has in a training batch, however a batch is split (and over
    processes, which share its micro-batches)."""
    import json

    from tiny_models import write_captioned_images

    held_out = write_captioned_images(tmp_path / "held-out", 6, caption="a blue ring number {i}")
    losses = []
    for accumulation in ("1", "2"):
        out = tmp_path / f"run-{accumulation}"
        distill(tiny_sd, image_folder, out, "--steps", "1", "--eval-data", str(held_out), "--grad-accumulation", accumulation)
        (line,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
        losses.append(line["eval_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
