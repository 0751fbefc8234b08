"""`lcm evaluate`: Table 1 / Figure 2 of a tiny LCM against its teacher, end to end; the CLIP score against a hand
computation; Inception FID through a stand-in with the real network's interface; resume of a killed evaluation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.evaluation.fid import fid_score


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tiny_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_clip_score_is_the_hand_computed_cosine(tiny_clip):
    """100 · max(cos(image embedding, text embedding), 0), the image resized and normalised as CLIP's processor does."""
    from transformers import CLIPModel, CLIPTokenizer

    from latent_consistency.evaluation.clip import CLIP_MEAN, CLIP_STD, ClipModel

    clip = ClipModel.load(str(tiny_clip))
    images = torch.rand(3, 3, 48, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red star", "a blue ring", "a ring"]
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip)
    x = torch.nn.functional.interpolate((images + 1) / 2, size=(32, 43), mode="bicubic", align_corners=False, antialias=True)
    x = (x[..., :, 5:37].clamp(0, 1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=x).pooler_output
        text = model.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image, text)
    assert clip.score(images, prompts) == pytest.approx(float((100 * cosine.clamp(min=0)).mean()), rel=1e-5)
    assert clip.features(images).shape == (3, 16)


def test_inception_fid_through_a_stand_in_with_the_real_interface(tmp_path):
    """The TorchScript FID network takes [0, 255] images and returns its features with return_features=True; a stand-in
    saved the same way gives FID ≈ 0 for a set against itself and a large one against noise."""
    from latent_consistency.errors import UserError
    from latent_consistency.evaluation.inception import InceptionFeatures

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.project = torch.nn.Linear(3 * 8 * 8, 12)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(x / 255.0, size=(8, 8), mode="bilinear", align_corners=False)
            return self.project(x.flatten(1))

    torch.manual_seed(0)
    torch.jit.script(StandIn()).save(str(tmp_path / "inception.pt"))
    network = InceptionFeatures.load(tmp_path / "inception.pt")
    assert network.feature_dim == 12
    grid = torch.linspace(-1, 1, 32)
    real = torch.stack([torch.stack([grid.roll(i) for _ in range(32)]).expand(3, -1, -1) * (0.5 + i / 80) for i in range(40)])
    noise = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert abs(fid_score(network, real, real)) < 1e-3 * fid_score(network, real, noise)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="inception-2015-12-05.pt"):
        InceptionFeatures.load(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="does not exist"):
        InceptionFeatures.load(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 12, size=(24, 20))  # not 16 px: resized


@pytest.mark.slow
def test_evaluate_a_tiny_lcm_against_its_teacher_and_resume(tiny_lcm, tiny_sd, tiny_clip, image_folder, tmp_path, monkeypatch):
    from latent_consistency.evaluation import table

    out = tmp_path / "eval"
    args = ["evaluate", "--lcm", str(tiny_lcm), "--teacher", str(tiny_sd), "--prompts", str(image_folder), "--out", str(out),
            "--steps", "1,2", "--guidance-scales", "1.5,3", "--samples", "6", "--images-per-prompt", "2", "--clip", str(tiny_clip),
            "--device", "cpu", "--grid-columns", "3", "--exact"]
    # Killed after three rows: the next run scores only the rest and ends with the same results
    real_generate, calls = table.generate, []

    def dies_after_three(*a, **k):
        calls.append(a[0])
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(table, "generate", dies_after_three)
    assert main(args) == 130
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3
    monkeypatch.setattr(table, "generate", lambda *a, **k: calls.append(a[0]) or real_generate(*a, **k))
    calls.clear()
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())["rows"]
    expected = {"lcm", "exact", "ddim", "dpm", "dpm++"}
    assert {r["sampler"] for r in results.values()} == expected and len(results) == 2 * (5 * 2 + 2)  # + DPM-Solver++ 25 and 50
    assert len([c for c in calls if c.key in results]) >= len(results) - 3  # the first three rows were not scored again
    assert all(np.isfinite(r["clip_fid"]) and np.isfinite(r["clip_kid"]) and 0 <= r["clip_clip_score"] <= 100 for r in results.values())
    lcm_row, ddim_row = results["lcm|2|3"], results["ddim|2|3"]
    assert lcm_row["network_evaluations"] == 2 and ddim_row["network_evaluations"] == 4 and lcm_row["images"] == 12
    fresh = tmp_path / "fresh"
    assert main([a if a != str(out) else str(fresh) for a in args]) == 0
    again = json.loads((fresh / "results.json").read_text())["rows"]
    assert {k: {m: v for m, v in r.items() if m not in ("ms_per_image", "peak_memory_mb")} for k, r in again.items()} == \
           {k: {m: v for m, v in r.items() if m not in ("ms_per_image", "peak_memory_mb")} for k, r in results.items()}
    report = (out / "report.md").read_text()
    assert "| exact LCM (teacher ODE) |" in report
    assert "## g = 3 (ω = 2)" in report and "| LCM |" in report and "Reference: DPM-Solver++ (CFG) 50 steps" in report
    for png in ("steps.png", "guidance.png", "grid.png", "guidance_grid.png"):
        Image.open(out / png).verify()


@pytest.mark.parametrize("case", ["not an lcm", "zero steps", "nan scale", "no metric", "no reference images", "empty prompts",
                                  "exact without teacher"])
def test_evaluate_bad_input(case, tiny_lcm, tiny_sd, image_folder, tmp_path, run_error):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "prompts.txt").write_text("a red star\n")
    base = ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--out", str(tmp_path / "out"), "--device", "cpu"]
    cases = {
        "not an lcm": (["evaluate", "--lcm", str(tiny_sd), "--prompts", str(image_folder), "--out", str(tmp_path / "out"),
                        "--inception", "x"], "without the guidance input of an LCM"),
        "zero steps": (base + ["--steps", "0,2"], "must be at least 1, got 0"),
        "nan scale": (base + ["--guidance-scales", "2,nan"], "not a finite number"),
        "no metric": (base, "no metric to compute"),
        "no reference images": (base + ["--prompts", str(tmp_path / "prompts.txt"), "--clip", "x"], "FID needs real images"),
        "empty prompts": (base + ["--prompts", str(tmp_path / "empty.txt"), "--clip", "x"], "holds no prompts"),
        "exact without teacher": (base + ["--exact", "--clip", "x"], "--exact needs --teacher"),
    }
    argv, message = cases[case]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_network_evaluations_per_image_count_cfg_passes():
    """One pass per step for an LCM (ω input) and Guided-Distill; two (cond and uncond) for the teacher's CFG and for
    an LCM-LoRA guided at g > 1, which has no ω input."""
    from types import SimpleNamespace

    from latent_consistency.evaluation.table import EXACT, GUIDED_DISTILL, Row

    lcm, lora = SimpleNamespace(time_cond_proj_dim=64), SimpleNamespace(time_cond_proj_dim=None)
    assert Row("lcm", 4, 8.0).network_evaluations(lcm) == 4
    assert Row("lcm", 4, 8.0).network_evaluations(lora) == 8 and Row("lcm", 4, 1.0).network_evaluations(lora) == 4
    assert Row(GUIDED_DISTILL, 2, 8.0).network_evaluations() == 2 and Row("dpm++", 25, 8.0).network_evaluations() == 50
    # the exact LCM: cond and uncond per DDIM jump of k = 1000 / 50 = 20 from each timestep down to 0
    exact_of = SimpleNamespace(skip=1000 // 50, timesteps=lambda n: torch.tensor([999, 499][:n]))
    assert Row(EXACT, 2, 8.0).network_evaluations(exact_of) == 2 * (50 + 25) and Row(EXACT, 1, 8.0).network_evaluations(exact_of) == 100
    # below g = 1 CFG runs the conditional pass alone (an LCM-LoRA's evaluation may go there): one pass, not two
    assert Row("ddim", 4, 0.5).network_evaluations() == 4 and Row(EXACT, 1, 0.5).network_evaluations(exact_of) == 50


def test_the_exact_row_below_g_1_solves_the_conditional_ode_as_the_teachers_rows_do():
    """At g < 1 the teacher's rows and an LCM-LoRA's run the conditional model alone; the exact LCM's ODE ran CFG at
    ω = g − 1 < 0 (towards the unconditional model), so it was not the ceiling of the row beside it."""
    from types import SimpleNamespace

    from latent_consistency.evaluation.table import teacher_guidance_scale

    cfg = SimpleNamespace(time_cond_proj_dim=None, is_lcm=False)
    omega_input = SimpleNamespace(time_cond_proj_dim=64, is_lcm=False)  # a guidance-distilled teacher
    assert teacher_guidance_scale(0.5, cfg) == 1.0 and teacher_guidance_scale(3.0, cfg) == 3.0
    assert teacher_guidance_scale(0.5, omega_input) == 0.5


def test_the_exact_row_samples_at_the_teachers_guidance_scale(monkeypatch):
    """`generate` runs the exact row's ODE at `teacher_guidance_scale`, not at the row's g."""
    from types import SimpleNamespace

    from latent_consistency.evaluation import table

    seen = []
    monkeypatch.setattr(table, "sample_consistency", lambda f, timesteps, model, prompts, g, seed, device, batch: seen.append(g))
    monkeypatch.setattr(table, "TeacherConsistencyFunction", lambda *args: None)
    teacher = SimpleNamespace(time_cond_proj_dim=None, is_lcm=False, guided_teacher=lambda: None,
                              prompts=SimpleNamespace(uncond=lambda device: None))
    lcm = SimpleNamespace(skip=20, timesteps=lambda n: torch.tensor([999]))
    eval_set = SimpleNamespace(all_prompts=["a red square"], seed=0)
    table.generate(table.Row(table.EXACT, 1, 0.5), lcm, teacher, eval_set, "cpu")
    table.generate(table.Row(table.EXACT, 1, 2.0), lcm, teacher, eval_set, "cpu")
    assert seen == [1.0, 2.0]


def test_sweep_lines_are_distinguishable():
    """Figure 3's 15 runs (more than matplotlib's ten colours): a solver-by-k grid reads as colour = k, line style =
    solver; names that are not a grid still get one (colour, line style) each."""
    from latent_consistency.world.over_training import _line_styles

    grid = [f"{s}-k{k}" for s in ("ddim", "dpm", "dpm++") for k in (1, 5, 10, 20, 50)]
    styles = _line_styles(grid)
    assert len({(v["color"], v["linestyle"]) for v in styles.values()}) == 15
    assert styles["ddim-k20"]["color"] == styles["dpm++-k20"]["color"] != styles["ddim-k50"]["color"]
    assert styles["dpm-k1"]["linestyle"] == styles["dpm-k50"]["linestyle"] != styles["ddim-k1"]["linestyle"]
    loose = [f"run{i}" for i in range(15)] + ["a-b"]
    assert len({(v["color"], v["linestyle"]) for v in _line_styles(loose).values()}) == 16
