"""The README's main job end to end, on the tiny plumbing world (quality is not the point here)."""

import json
import math

import pytest
import torch
from PIL import Image

from latent_consistency.cli import main as lcm
from latent_consistency.evaluation.compare import SamplerSpec, sample
from latent_consistency.models import load_lcm
from latent_consistency.world.artifact import load_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores


@pytest.mark.slow
def test_demo_end_to_end_on_the_tiny_world(tmp_path):
    """`--world-preset tiny` builds that world even though the default one is shipped."""
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--world-preset", "tiny", "--distill-steps", "3", "--finetune-steps", "2", "--eval-samples", "8",
            "--device", "cpu"]
    assert lcm(demo) == 0
    assert (out / "world-tiny" / "world.json").is_file()
    assert (out / "distill" / "lcm" / "model_index.json").is_file()
    assert Image.open(out / "grid.png").size == (190 + 8 * 3 * 32, 5 * 3 * 32)  # real, teacher, LCM 1/2/4 rows of 8 prompts
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    assert len(results) == 7 and all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in results.values())
    assert len({round(r["fid"], 6) for r in results.values()}) == 7, "every sampler row scored its own images"
    # The report's numbers are what the library measures for the exported LCM: resample one row and score it again
    world = load_world(out / "world-tiny")
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(8)]
    spec = SamplerSpec("lcm", 2, 2.0)
    images = sample(spec, load_lcm(str(out / "distill" / "lcm")), world.model, [it["caption"] for it in items])
    again = judge_scores(world.judge, images, [it["attributes"] for it in items], torch.stack([it["image"] for it in items]))
    assert again["fid"] == pytest.approx(results[spec.label]["fid"], rel=1e-5)
    assert again["alignment"] == pytest.approx(results[spec.label]["alignment"])
    # ... and fine-tuned with LCF on digits, scored on the held-out digits before and after
    tuned = report["finetune"]["results"]
    assert list(tuned) == [f"LCM {when} LCF {n}-step g=2" for when in ("before", "after") for n in (1, 2, 4)], list(tuned)
    assert all(math.isfinite(r["fid"]) and 0 <= r["alignment"]["digit"] <= 1 for r in tuned.values())
    assert json.loads((out / "finetune" / "config.json").read_text())["model"] == str(out / "distill" / "lcm")
    assert (out / "finetune" / "lcm" / "model_index.json").is_file() and (out / "digits_grid.png").is_file()
    assert "## Fine-tuning on digits" in (out / "report.md").read_text()
    # A rerun reuses every finished part.
    assert lcm(demo) == 0

    # Quality over training of that run: every checkpoint scored at the run's validation guidance scale
    over_training = ["world", "over-training", "--world", str(out / "world-tiny"), "--samples", "4", "--device", "cpu"]
    assert lcm(over_training + ["--run", str(out / "distill")]) == 0
    rows = json.loads((out / "distill" / "over_training.json").read_text())
    assert [r["step"] for r in rows] == [3]
    assert all(r[f"fid_{n}"] >= 0 and 0 <= r[f"alignment_{n}"] <= 1 for r in rows for n in (1, 2, 4))
    errors = {k: v for k, v in rows[0].items() if k.startswith("ode_error_")}
    assert len(errors) >= 4 and all(0 <= v < float("inf") for v in errors.values()), errors
    # the guidance response between the ends of the trained range (g ∈ [1, 2] in the world preset), at the same timesteps
    responses = {k.removeprefix("omega_response_"): v for k, v in rows[0].items() if k.startswith("omega_response_")}
    assert responses.keys() == {k.removeprefix("ode_error_") for k in errors} and all(abs(v) < float("inf") for v in responses.values())
    assert "ω response t=999" in (out / "distill" / "over_training.md").read_text()
    assert (out / "distill" / "over_training.png").is_file()

    # ... and of an LCM-LoRA run on the same world (no ω input: its response is 0 at every t)
    lora = out / "lora"
    assert lcm(["distill", "--preset", "tiny", "--adapter", "lora", "--lora-rank", "4", "--teacher", str(out / "world-tiny"),
                "--data", str(out / "latents"), "--out", str(lora), "--guidance-scale-min", "1", "--guidance-scale-max", "3"]) == 0
    assert lcm(over_training + ["--run", str(lora)]) == 0
    rows = json.loads((lora / "over_training.json").read_text())
    assert [r["step"] for r in rows] == [2, 4] and all(r[f"fid_{n}"] >= 0 for r in rows for n in (1, 2, 4))
    assert all(v == 0 for r in rows for k, v in r.items() if k.startswith("omega_response_"))
