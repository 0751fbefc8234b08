"""Records along chains of commands: a model one command exports, read by the next (`guidance.json` beside an LCM,
`lcm finetune` of it, LoRAs on it, `lcm generate` / `lcm serve` of the result). Each test is one chain a researcher runs."""

from __future__ import annotations

import pytest

from latent_consistency.cli import main
from latent_consistency.guidance_record import read_record


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8, size=(16, 16))


@pytest.fixture(scope="module")
def distilled(tiny_sd, images, tmp_path_factory):
    """`lcm distill` of the tiny teacher over g ∈ [1, 4], validated (and so sampled by default) at g = 2: RUN/lcm."""
    out = tmp_path_factory.mktemp("lcd") / "run"
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(out), "--steps", "2",
                 "--guidance-scale-min", "1", "--guidance-scale-max", "4", "--validation-guidance-scale", "2"]) == 0
    record = read_record(out / "lcm")
    assert (record.guidance_scale_min, record.guidance_scale_max, record.guidance_scale) == (1.0, 4.0, 2.0)
    return out / "lcm"


def grid_omegas(monkeypatch) -> list[float]:
    """The ω each validation grid row of a run is sampled at (from here on)."""
    from latent_consistency.training import run_folder

    omegas, sample_lcm = [], run_folder.sample_lcm
    monkeypatch.setattr(run_folder, "sample_lcm", lambda f, z, ts, c, omega, *a: omegas.append(omega) or sample_lcm(f, z, ts, c, omega, *a))
    return omegas


def test_lora_fine_tuned_on_an_lcm_is_validated_at_the_g_it_is_sampled_at(distilled, images, tmp_path, monkeypatch):
    """`lcm finetune --model RUN/lcm --adapter lora`: the LoRA keeps the LCM's ω input and record, so `lcm generate --model
    RUN/lcm --lora LCF/lora` samples at the LCM's recorded g = 2. Its validation grid must show that g, as a full fine-tuning's
    does, not the preset's 8 (ω = 7), where the LCM's ω input extrapolates."""
    omegas = grid_omegas(monkeypatch)
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--model", str(distilled), "--adapter", "lora", "--data", str(images),
                 "--out", str(tmp_path / "lcf"), "--guidance-scale-min", "1", "--guidance-scale-max", "4"]) == 0
    assert omegas and set(omegas) == {1.0}, omegas


def test_fine_tuning_an_lcm_keeps_its_recorded_range_and_default_g_unless_told_otherwise(distilled, images, tmp_path, capsys):
    """`lcm finetune --model RUN/lcm` of an LCM distilled on [1, 4] with default g = 2: the preset's range [3, 15] and g = 8
    would draw ω where the LCM extrapolates and move its default g to 4, though LCF teaches no guidance. The record's
    range and g are the defaults instead; a flag or a config file still chooses."""
    import json

    def resolved(*extra) -> dict:
        assert main(["finetune", "--preset", "tiny", "--model", str(distilled), "--data", str(images), "--out", str(tmp_path / "lcf"),
                     "--dry-run", *extra]) == 0
        config = json.loads(capsys.readouterr().out)
        return {k: config[k] for k in ("guidance_scale_min", "guidance_scale_max", "validation_guidance_scale")}

    assert resolved() == {"guidance_scale_min": 1.0, "guidance_scale_max": 4.0, "validation_guidance_scale": 2.0}
    assert resolved("--validation-guidance-scale", "3") == {"guidance_scale_min": 1.0, "guidance_scale_max": 4.0,
                                                             "validation_guidance_scale": 3.0}
    (tmp_path / "config.json").write_text(json.dumps({"guidance_scale_max": 3.0}))
    assert resolved("--config", str(tmp_path / "config.json"))["guidance_scale_max"] == 3.0
