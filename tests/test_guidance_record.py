"""An LCM's guidance record (`guidance_record`, `guidance.json` beside its export): the range, default g and ω response a
run writes, and what `lcm generate`, `lcm serve` and `lcm evaluate` make of it. The export's record itself is tested
in test_distill.py (written by a run, and by a run resumed after its response)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.errors import UserError
from latent_consistency.guidance_record import RECORD, GuidanceRecord, read_record, write_record

IGNORED = {999: 0.01, 759: -0.02, 499: 0.005}
LEARNED = {999: 0.42, 759: 0.71, 499: 0.81}


@pytest.mark.parametrize("validation, expected", [(2.0, 2.0), (8.0, 4.0), (0.5, 1.0)])
def test_a_runs_default_is_its_validation_g_moved_into_the_range(validation, expected):
    assert GuidanceRecord.of_run(1.0, 4.0, validation, None).guidance_scale == expected


def test_notes_say_when_g_is_outside_the_range_and_when_a_given_g_is_ignored():
    learned, ignored = GuidanceRecord(1.0, 2.0, 2.0, LEARNED), GuidanceRecord(1.0, 2.0, 2.0, IGNORED)
    assert learned.notes(1.5, given=True) == [] and learned.notes(1.0, given=True) == [] and learned.notes(2.0, given=True) == []
    (note,) = learned.notes(8.0, given=True)
    assert "guidance scale 8 is outside [1, 2]" in note
    (note,) = ignored.notes(2.0, given=True)
    assert "ignores its guidance scale" in note and "0.01" in note
    assert ignored.notes(2.0, given=False) == []  # the default g: nothing the user chose
    assert len(ignored.notes(0.5, given=True)) == 2
    assert GuidanceRecord(1.0, 2.0, 2.0, None).notes(2.0, given=True) == []  # not measured: no claim


def test_a_record_reads_back_as_written(tmp_path):
    record = GuidanceRecord(1.0, 4.0, 2.0, LEARNED)
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record and read_record(str(tmp_path)) == record
    assert read_record(tmp_path / "elsewhere") is None and read_record("org/a-hub-model") is None


@pytest.mark.parametrize("text", [
    "{", "[]", "\udcff", json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2}),
    json.dumps({"guidance_scale_min": "1", "guidance_scale_max": 2, "guidance_scale": 2}),
    json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": True}),
    '{"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": NaN}',
    json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": 8}),
    json.dumps({"guidance_scale_min": 0.5, "guidance_scale_max": 2, "guidance_scale": 0.5}),
    json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": 2, "omega_response": [0.1]}),
    json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": 2, "omega_response": {"late": 0.1}}),
    json.dumps({"guidance_scale_min": 1, "guidance_scale_max": 2, "guidance_scale": 2, "omega_response": {"999": None}}),
])
def test_a_damaged_record_is_one_line_naming_the_file(tmp_path, text):
    (tmp_path / RECORD).write_text(text, errors="surrogateescape")
    with pytest.raises(UserError) as err:
        read_record(tmp_path)
    assert str(tmp_path / RECORD) in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def recorded_lcm(tiny_lcm, tmp_path):
    """A copy of the tiny LCM with a record: distilled on [1, 2], default g = 2, and the given ω response."""
    def make(response=LEARNED, name="lcm"):
        folder = shutil.copytree(tiny_lcm, tmp_path / name)
        write_record(folder, GuidanceRecord(1.0, 2.0, 2.0, response))
        return folder
    return make


def generate(model, out, *extra):
    from latent_consistency.cli import main

    return main(["generate", "a red star", "--model", str(model), "--steps", "2", "--out", str(out), "--height", "16", "--width", "16",
                 *extra])


def pixels(folder):
    (path,) = sorted(folder.iterdir())
    return np.asarray(Image.open(path))


def test_generate_defaults_to_the_recorded_g(recorded_lcm, tmp_path, capsys):
    model = recorded_lcm()
    assert generate(model, tmp_path / "default") == 0
    assert generate(model, tmp_path / "g2", "--guidance-scale", "2") == 0
    assert generate(model, tmp_path / "g8", "--guidance-scale", "8") == 0
    assert np.array_equal(pixels(tmp_path / "default"), pixels(tmp_path / "g2"))
    assert not np.array_equal(pixels(tmp_path / "default"), pixels(tmp_path / "g8"))
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "guidance scale 8 is outside [1, 2], the range this model's ω input was distilled on" in err


def test_generate_notes_a_given_g_that_the_lcm_ignores(recorded_lcm, tmp_path, capsys):
    model = recorded_lcm(IGNORED)
    assert generate(model, tmp_path / "default") == 0
    assert "note" not in capsys.readouterr().err
    assert generate(model, tmp_path / "given", "--guidance-scale", "1.5") == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "this LCM ignores its guidance scale" in err


def test_an_lcm_with_a_lora_keeps_its_record(recorded_lcm, tmp_path, capsys):
    """A LoRA fine-tuned on an LCM (`lcm finetune --adapter lora`) leaves its ω input the LCM's: the LCM's record holds."""
    from tiny_models import save_tiny_lora

    model = recorded_lcm()
    lora = save_tiny_lora(tmp_path / "lora", model)
    assert generate(model, tmp_path / "default", "--lora", str(lora)) == 0
    assert generate(model, tmp_path / "g2", "--lora", str(lora), "--guidance-scale", "2") == 0
    assert "note" not in capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "default"), pixels(tmp_path / "g2"))
    assert generate(model, tmp_path / "g8", "--lora", str(lora), "--guidance-scale", "8") == 0
    assert "guidance scale 8 is outside [1, 2]" in capsys.readouterr().err


def test_an_lcm_without_a_record_samples_as_before(tiny_lcm, tmp_path, capsys):
    assert generate(tiny_lcm, tmp_path / "default") == 0
    assert generate(tiny_lcm, tmp_path / "g8", "--guidance-scale", "8") == 0
    assert np.array_equal(pixels(tmp_path / "default"), pixels(tmp_path / "g8"))  # the kind's default, 8
    assert "note" not in capsys.readouterr().err


def test_generate_with_a_damaged_record_writes_nothing(recorded_lcm, tmp_path, run_error):
    model = recorded_lcm()
    (model / RECORD).write_text("{")
    code, err = run_error(["generate", "a red star", "--model", str(model), "--steps", "2", "--out", str(tmp_path / "out")])
    assert code == 2 and len(err.splitlines()) == 1 and str(model / RECORD) in err
    assert not (tmp_path / "out").exists()


def test_serve_takes_its_default_g_and_range_from_the_record_and_notes_a_g_outside_it(recorded_lcm):
    from fastapi.testclient import TestClient

    from latent_consistency.pipelines import LCMGenerator
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    generator = LCMGenerator.load(str(recorded_lcm()), torch.device("cpu"), torch.float32)
    with TestClient(create_app(generator, Limits(max_side=64), model_name="tiny")) as client:
        config = client.get("/v1/config").json()
        assert config["default_guidance_scale"] == 2.0 and config["guidance_scale_range"] == [1.0, 2.0]
        inside = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "guidance_scale": 1.5})
        outside = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "guidance_scale": 8})
    assert inside.status_code == outside.status_code == 200
    assert "X-Guidance-Note" not in inside.headers
    assert "outside [1, 2], the range this model's omega input was distilled on" in outside.headers["X-Guidance-Note"]
    # An LCM that ignores ω, given a g: the note (which names its ω response) is a header, not a 500
    ignoring = LCMGenerator.load(str(recorded_lcm(IGNORED, name="ignoring")), torch.device("cpu"), torch.float32)
    with TestClient(create_app(ignoring, Limits(max_side=64), model_name="tiny")) as client:
        given = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "guidance_scale": 1.5})
    assert given.status_code == 200 and "this LCM ignores its guidance scale (its omega response was at most" in given.headers["X-Guidance-Note"]


def test_evaluate_defaults_to_the_recorded_g_and_notes_a_scale_outside_the_range(recorded_lcm, tmp_path, capsys):
    from latent_consistency.cli import main
    from tiny_models import save_tiny_clip, write_captioned_images

    prompts, clip = write_captioned_images(tmp_path / "images", 4, size=(16, 16)), save_tiny_clip(tmp_path / "clip")
    args = ["evaluate", "--lcm", str(recorded_lcm()), "--prompts", str(prompts), "--steps", "1", "--samples", "4", "--clip", str(clip),
            "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "default")]) == 0
    assert list(json.loads((tmp_path / "default" / "results.json").read_text())["rows"]) == ["lcm|1|2"]
    assert "guidance scale" not in capsys.readouterr().err  # (the tiny tokenizer's 16 tokens get a note of their own)
    assert main(args + ["--out", str(tmp_path / "several"), "--guidance-scales", "2,4,8"]) == 0
    err = capsys.readouterr().err
    assert err.count("is outside [1, 2]") == 2 and "guidance scale 4 is outside [1, 2]" in err and "guidance scale 8 is outside" in err


def test_a_fine_tuned_lcm_records_its_own_range_and_no_response(tiny_lcm, tmp_path):
    """LCF has no teacher to measure an ω response against: its record has the run's range and no response."""
    from latent_consistency.cli import main
    from tiny_models import write_captioned_images

    data, out = write_captioned_images(tmp_path / "images", 8, size=(16, 16)), tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", str(data), "--out", str(out),
                 "--guidance-scale-min", "1", "--guidance-scale-max", "3"]) == 0
    assert read_record(out / "lcm") == GuidanceRecord(1.0, 3.0, 3.0, None)


@pytest.mark.parametrize("response", [IGNORED, LEARNED], ids=["ignored", "learned"])
def test_a_run_whose_student_ignores_guidance_says_what_teaches_it(response, tiny_sd, tmp_path, capsys, monkeypatch):
    from latent_consistency.cli import main
    from latent_consistency.training import omega_response
    from tiny_models import write_captioned_images

    monkeypatch.setattr(omega_response, "omega_response", lambda *a, **k: dict(response))
    data = write_captioned_images(tmp_path / "images", 8, size=(16, 16))
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "ω response of the student" in out
    said = "The student ignores its guidance scale after 4 step(s). On the built-in world a loss on the ω-difference taught it"
    assert (said in out and "at Stable Diffusion scale that is not measured" in out) == (response is IGNORED), out
    assert read_record(tmp_path / "run" / "lcm").omega_response == response


def test_a_pair_loss_run_whose_student_ignores_guidance_is_not_told_to_add_the_pair_loss(tiny_sd, tmp_path, capsys, monkeypatch):
    from latent_consistency.cli import main
    from latent_consistency.training import omega_response
    from tiny_models import write_captioned_images

    monkeypatch.setattr(omega_response, "omega_response", lambda *a, **k: dict(IGNORED))
    data = write_captioned_images(tmp_path / "images", 8, size=(16, 16))
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--guidance-scale-min", "1", "--guidance-scale-max", "4", "--guidance-pair-weight", "1"]) == 0
    out = capsys.readouterr().out
    assert "a loss on the ω-difference taught it" not in out and "after 4 step(s), though its loss teaches it (--guidance-pair-weight 1)" in out, out


def test_a_fine_tuned_lcm_that_ignored_guidance_still_says_so(tiny_lcm, tmp_path, capsys):
    """LCF teaches no guidance: an LCM whose distillation measured it ignoring g is fine-tuned into one that still ignores
    it. Its record keeps the measured response, marked as measured before fine-tuning; `lcm generate -g` notes it, the
    model card says it, and `lcm serve`'s /v1/config (through `ignores_guidance`) says so. It used to record no response,
    and every one of these fell silent."""
    from latent_consistency.cli import main
    from tiny_models import write_captioned_images

    model = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    write_record(model, GuidanceRecord(1.0, 2.0, 2.0, IGNORED))
    data, out = write_captioned_images(tmp_path / "images", 4, size=(16, 16)), tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    record = read_record(out / "lcm")
    assert record == GuidanceRecord(1.0, 2.0, 2.0, IGNORED, inherited=True) and record.ignores_guidance()
    assert json.loads((out / "lcm" / RECORD).read_text())["omega_response_before_fine_tuning"] is True
    card = (out / "lcm" / "README.md").read_text()
    assert "ω response of its LCM before LCF, at t = " in card and "It ignores its guidance scale" in card, card
    capsys.readouterr()
    assert main(["generate", "a red square", "--model", str(out / "lcm"), "--steps", "1", "--guidance-scale", "2",
                 "--out", str(tmp_path / "images-out")]) == 0
    assert "ignores its guidance scale (its ω response was at most 0.01 at every t before it was fine-tuned" in capsys.readouterr().err


def test_the_inherited_mark_round_trips_and_is_refused_when_not_a_boolean(tmp_path):
    write_record(tmp_path, GuidanceRecord(1.0, 2.0, 2.0, IGNORED, inherited=True))
    assert read_record(tmp_path) == GuidanceRecord(1.0, 2.0, 2.0, IGNORED, inherited=True)
    write_record(tmp_path, GuidanceRecord(1.0, 2.0, 2.0, IGNORED))
    assert "omega_response_before_fine_tuning" not in json.loads((tmp_path / RECORD).read_text())  # a distillation's, as before
    (tmp_path / RECORD).write_text(json.dumps(GuidanceRecord(1.0, 2.0, 2.0, IGNORED).to_json() | {"omega_response_before_fine_tuning": "yes"}))
    with pytest.raises(UserError, match="omega_response_before_fine_tuning is 'yes'"):
        read_record(tmp_path)
