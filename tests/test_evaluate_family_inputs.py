"""`lcm evaluate` with models other than a plain LCM and its CFG teacher: a guidance-distilled teacher (`lcm distill
--method guidance`: an ω input in place of CFG), an LCM-LoRA, and a LoRA on a guidance-distilled model. Each row is
computed as its label says and counts the network passes it makes; what cannot be evaluated is one line on stderr and
exit code 2, with no --out made."""

import json

import pytest
import torch

from test_evaluate_inputs import Linear  # the FID Inception stand-in


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A teacher, its LCM, a guidance-distilled model (a UNet with an ω input under a DDIM scheduler), an LCM-LoRA of the
    teacher, prompts, real images and an Inception stand-in."""
    from diffusers import StableDiffusionPipeline

    from tiny_models import make_tiny_components, save_tiny_lcm, save_tiny_lora, save_tiny_sd, write_captioned_images

    folder = tmp_path_factory.mktemp("family")
    parts = make_tiny_components(folder / ".gd-build", time_cond_proj_dim=32)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(
        folder / "gd", safe_serialization=True)
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(folder / "inception.pt"))
    (folder / "prompts.txt").write_text("a red star\na blue ring\n")
    sd = save_tiny_sd(folder / "sd")
    return dict(sd=sd, lcm=save_tiny_lcm(folder / "lcm"), gd=folder / "gd", lora=save_tiny_lora(folder / "lora", sd),
                prompts=folder / "prompts.txt", images=write_captioned_images(folder / "images", 4), inception=folder / "inception.pt")


def evaluate(family, out, *extra) -> list[str]:
    return ["evaluate", "--prompts", str(family["prompts"]), "--reference", str(family["images"]), "--inception", str(family["inception"]),
            "--steps", "1", "--samples", "2", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("models", ["lcm, guidance-distilled teacher", "lcm-lora, teacher", "lcm, cfg teacher at g = 1"])
def test_each_row_counts_the_network_passes_it_makes(models, family, tmp_path, monkeypatch):
    """A guidance-distilled teacher's solvers run its ω input, one pass per step (and per jump of the exact LCM), not
    CFG's two: its rows say so in their label and count. An LCM-LoRA at g > 1 is CFG-guided, two passes per step."""
    from diffusers import UNet2DConditionModel

    from latent_consistency.cli import main
    from latent_consistency.evaluation import table

    passes, per_row = [0], {}
    real_forward, real_generate = UNet2DConditionModel.forward, table.generate

    def counted_forward(self, sample, *a, **k):
        passes[0] += len(sample)
        return real_forward(self, sample, *a, **k)

    def counted_generate(row, *a, **k):
        before = passes[0]
        images = real_generate(row, *a, **k)
        per_row.setdefault(row.key, (passes[0] - before) / len(images))  # the table's images, not the grid's
        return images

    monkeypatch.setattr(UNet2DConditionModel, "forward", counted_forward)
    monkeypatch.setattr(table, "generate", counted_generate)
    g = "1" if models == "lcm, cfg teacher at g = 1" else "3"
    if models == "lcm, guidance-distilled teacher":
        argv = ["--lcm", str(family["lcm"]), "--teacher", str(family["gd"]), "--exact"]
    elif models == "lcm-lora, teacher":
        argv = ["--lcm", str(family["sd"]), "--lora", str(family["lora"]), "--teacher", str(family["sd"])]
    else:  # ω = 0: no unconditional pass to run, as diffusers runs none at g <= 1
        argv = ["--lcm", str(family["lcm"]), "--teacher", str(family["sd"]), "--exact"]
    out = tmp_path / "out"
    assert main(evaluate(family, out, *argv, "--guidance-scale", g)) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {key: row["network_evaluations"] for key, row in rows.items()} == per_row
    omega = models == "lcm, guidance-distilled teacher"
    assert rows[f"ddim|1|{g}"]["method"] == ("DDIM (ω input)" if omega else "DDIM (CFG)")
    assert ("(CFG)" in (out / "report.md").read_text()) != omega
    if g == "1":
        assert rows["ddim|1|1"]["network_evaluations"] == 1


def test_a_lora_on_a_guidance_distilled_model_is_not_evaluated_as_an_lcm(family, tmp_path, run_error):
    """A LoRA without an LCMScheduler config on a model with an ω input leaves a diffusion model with a DDIM scheduler:
    its "LCM" rows would be Algorithm 3 on a model that is no consistency function."""
    out = tmp_path / "out"
    code, err = run_error(evaluate(family, out, "--lcm", str(family["gd"]), "--lora", str(family["lora"])))
    assert code == 2 and len(err.splitlines()) == 1 and "not an LCM" in err, err
    assert not out.exists()


def test_a_guidance_scale_below_1_is_refused_for_a_guidance_distilled_teacher(family, tmp_path, run_error):
    """The teacher's ω input is trained on ω >= 0, as an LCM's is: g < 1 is refused whatever the LCM (an LCM-LoRA here)."""
    out = tmp_path / "out"
    code, err = run_error(evaluate(family, out, "--lcm", str(family["sd"]), "--lora", str(family["lora"]), "--teacher", str(family["gd"]),
                                   "--guidance-scale", "0.5"))
    assert code == 2 and len(err.splitlines()) == 1 and "below 1" in err, err
    assert not out.exists()


def test_an_lcm_lora_is_evaluated_at_generates_default_g(family, tmp_path, capsys):
    """Without --guidance-scale an LCM-LoRA (no ω input) is scored at g = 1, as `lcm generate` samples it (its guidance is
    distilled in; CFG at the paper's g = 8 burns its images), and a note says the teacher's rows are at that g too."""
    from latent_consistency.cli import main

    out = tmp_path / "out"
    assert main(evaluate(family, out, "--lcm", str(family["sd"]), "--lora", str(family["lora"]), "--teacher", str(family["sd"]))) == 0
    assert {row["guidance_scale"] for row in json.loads((out / "results.json").read_text())["rows"].values()} == {1.0}
    assert "applies to the teacher's rows too" in capsys.readouterr().err
