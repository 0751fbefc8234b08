"""The README's main job end to end, on the tiny plumbing world (quality is not the point here)."""

import json
import math

import pytest
import torch
from PIL import Image

from latent_consistency.cli import main as lcm
from latent_consistency.evaluation.compare import SamplerSpec, sample
from latent_consistency.guidance_record import read_record
from latent_consistency.models import load_lcm
from latent_consistency.world.artifact import load_world
from latent_consistency.world.datasets import REFERENCE_SPLITS, get_dataset
from latent_consistency.world.judge import judge_scores


@pytest.mark.slow
def test_demo_end_to_end_on_the_tiny_world(tmp_path, monkeypatch):
    """`--world-preset tiny` builds that world even though the default one is shipped."""
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--world-preset", "tiny", "--distill-steps", "3", "--finetune-steps", "2", "--eval-samples", "8",
            "--device", "cpu"]
    from latent_consistency.world import demo as demo_module

    on_cpu, train = [], demo_module.train
    monkeypatch.setattr(demo_module, "train", lambda config, **kw: on_cpu.append(kw["cpu"]) or train(config, **kw))
    assert lcm(demo) == 0
    assert on_cpu == [True, True]  # --device cpu trains on the CPU too, where a GPU is (`train(cpu=...)`)
    assert (out / "world-tiny" / "world.json").is_file()
    assert (out / "distill" / "lcm" / "model_index.json").is_file()
    # Figure 2: real images, the LCM and the teacher's DDIM at 1/2/4/8 steps, DPM-Solver++ 25, under 8 captioned prompts
    assert Image.open(out / "grid.png").size[0] - 8 * 3 * 32 >= 170 and Image.open(out / "grid.png").size[1] > 10 * 3 * 32  # + labels
    report = json.loads((out / "report.json").read_text())
    results = report["table"]  # Table 1: the LCM and the teacher's three solvers at 1/2/4/8 steps, DPM-Solver++ at 25
    assert len(results) == 4 + 3 * 4 + 1 and {r["method"] for r in results.values()} == {"LCM", "DDIM (CFG)", "DPM-Solver (CFG)",
                                                                                          "DPM-Solver++ (CFG)"}
    assert all(math.isfinite(r["judge_fid"]) and r["judge_fid"] > 0 and 0 <= r["judge_alignment"] <= 1 for r in results.values())
    assert len({round(r["judge_fid"], 6) for r in results.values()}) == len(results), "every sampler row scored its own images"
    assert results["lcm|2|2"]["network_evaluations"] == 2 and results["ddim|2|2"]["network_evaluations"] == 4
    text = (out / "report.md").read_text()
    assert "| LCM | " in text and "| DPM-Solver (CFG) | " in text and "Reference: DPM-Solver++ (CFG) 25 steps" in text
    # The LCM's ω response, as its guidance record holds it
    record = read_record(out / "distill" / "lcm")
    assert record.omega_response and f"t = 999: {round(record.omega_response[999], 2) + 0.0:.2f}" in text
    # The report's numbers are what the library measures for the exported LCM: resample one row and score it again
    world = load_world(out / "world-tiny")
    reference = get_dataset(world.dataset, REFERENCE_SPLITS[world.dataset], world.resolution, seed=world.preset.seed)
    items = [reference[i] for i in range(8)]
    spec = SamplerSpec("lcm", 2, 2.0)
    images = sample(spec, load_lcm(str(out / "distill" / "lcm")), world.model, [it["caption"] for it in items])
    again = judge_scores(world.judge, images, [it["attributes"] for it in items], torch.stack([it["image"] for it in items]))
    assert again["fid"] == pytest.approx(results["lcm|2|2"]["judge_fid"], rel=1e-5)
    assert again["alignment"]["mean"] == pytest.approx(results["lcm|2|2"]["judge_alignment"])
    # `lcm evaluate` on the world's prompts scores the same row the same way, through the world's judge
    evaluated = out / "evaluate"
    assert lcm(["evaluate", "--lcm", str(out / "distill" / "lcm"), "--teacher", str(out / "world-tiny"), "--prompts", "world:shapes:reference",
                "--world", str(out / "world-tiny"), "--steps", "1,2", "--guidance-scale", "2", "--samples", "8", "--out", str(evaluated),
                "--device", "cpu"]) == 0
    rows = json.loads((evaluated / "results.json").read_text())["rows"]
    assert rows["lcm|2|2"]["judge_fid"] == pytest.approx(results["lcm|2|2"]["judge_fid"], rel=1e-5) and "judge_alignment_shape" in rows["lcm|2|2"]
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
    sweep = ["evaluate", "sweep", "--world", str(out / "world-tiny"), "--samples", "4", "--device", "cpu", "--out", str(out / "sweep")]
    assert lcm(sweep + ["--runs", str(out / "distill")]) == 0
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
    assert lcm(sweep + ["--runs", str(lora), str(out / "distill")]) == 0
    assert (out / "sweep" / "sweep.png").is_file() and set(json.loads((out / "sweep" / "sweep.json").read_text())) == {"lora", "distill"}
    table = (out / "sweep" / "sweep.md").read_text()  # what was measured, and each run's g (the LoRA's validation scale, the LCM's record's)
    assert "first 4 reference prompts" in table and "| lora | 8 |" in table and "| distill | 2 |" in table, table
    rows = json.loads((lora / "over_training.json").read_text())
    assert [r["step"] for r in rows] == [2, 4] and all(r[f"fid_{n}"] >= 0 for r in rows for n in (1, 2, 4))
    assert all(v == 0 for r in rows for k, v in r.items() if k.startswith("omega_response_"))
    # Figure 3's measurement alone: 4-step FID and alignment, without the teacher ODE references
    assert lcm(sweep + ["--runs", str(lora), "--steps", "4", "--no-ode-error"]) == 0
    rows = json.loads((lora / "over_training.json").read_text())
    assert [sorted(r) for r in rows] == [["alignment_4", "fid_4", "step"]] * 2
    assert (lora / "over_training.png").is_file() and "4-step FID final / best" in (out / "sweep" / "sweep.md").read_text()
    # ... which the full sweep had scored already: rows come from the run's cache, and only other settings score anew
    from latent_consistency.world import over_training

    calls, make_student = [], over_training.make_student

    def counted(*args, **kwargs):
        calls.append(args)
        return make_student(*args, **kwargs)

    monkeypatch.setattr(over_training, "make_student", counted)
    assert lcm(sweep + ["--runs", str(lora), "--steps", "4", "--no-ode-error"]) == 0 and calls == []
    assert json.loads((lora / "over_training.json").read_text()) == rows
    assert lcm(sweep + ["--runs", str(lora), "--steps", "4", "--no-ode-error", "--samples", "3"]) == 0 and len(calls) == 1


def test_the_demo_table_has_attribute_columns_only_where_there_are_several():
    from latent_consistency.world.demo import _table

    digits = _table([("LCM", {"fid": 1.0, "alignment": {"digit": 0.5, "mean": 0.5}})])
    # was: a "digit" column, equal to the alignment column
    assert digits.splitlines() == ["| sampler | FID (judge) | alignment |", "|---|---|---|", "| LCM | 1.00 | 0.500 |"]
    shapes = _table([("LCM", {"fid": 1.0, "alignment": {"shape": 0.5, "colour": 1.0, "mean": 0.75}})])
    assert shapes.splitlines() == ["| sampler | FID (judge) | alignment | shape | colour |", "|---|---|---|---|---|",
                                   "| LCM | 1.00 | 0.750 | 0.50 | 1.00 |"]
