"""`lcm finetune` (LCF, Algorithm 4) on a user's own data: what a fine-tuned LCM's guidance record says, and the notes a
run prints about its inputs."""

import json
import shutil
from types import SimpleNamespace

from latent_consistency.cli import main
from latent_consistency.guidance_record import RECORD, GuidanceRecord, read_record
from latent_consistency.training.batches import TrainingBatches


def test_a_fine_tuned_lcm_keeps_the_guidance_range_it_was_distilled_on(tiny_lcm, tmp_path, capsys):
    """LCF teaches no guidance: a run told to draw g outside the range the LCM's record says its ω input was distilled on
    (here [3, 15] on an LCM of [1, 2]) says so, and the export keeps [1, 2] (and a default g inside it), rather than
    recording [3, 15] with a default of 8 at which `lcm generate` would then sample an extrapolating LCM without a note.
    (Without the flags the run draws from the record's range: `test_record_chains.py`.)"""
    from tiny_models import write_captioned_images

    model = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    (model / RECORD).write_text(json.dumps({"guidance_scale_min": 1.0, "guidance_scale_max": 2.0, "guidance_scale": 2.0,
                                            "omega_response": {"999": 0.5}}))
    data, out = write_captioned_images(tmp_path / "images", 4), tmp_path / "run"
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--guidance-scale-min", "3", "--guidance-scale-max", "15"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "distilled on" in line]
    assert len(notes) == 1 and "[3, 15] reaches outside [1, 2]" in notes[0] and "keeps the record [1, 2]" in notes[0], notes
    assert read_record(out / "lcm") == GuidanceRecord(1.0, 2.0, 2.0, {999: 0.5}, inherited=True)  # the LCM's, as LCF measures none


def test_the_validation_grid_samples_a_fine_tuned_lcm_at_its_records_g(tiny_lcm, tmp_path, monkeypatch):
    """The grid shows the LCM at the g it will be sampled at by default (its record's, 2 on an LCM distilled on [1, 2]),
    not at the preset's 8, where its ω input extrapolates."""
    from latent_consistency.training import run_folder
    from tiny_models import write_captioned_images

    model = shutil.copytree(tiny_lcm, tmp_path / "lcm")
    (model / RECORD).write_text(json.dumps({"guidance_scale_min": 1.0, "guidance_scale_max": 2.0, "guidance_scale": 2.0}))
    omegas, sample_lcm = [], run_folder.sample_lcm
    monkeypatch.setattr(run_folder, "sample_lcm", lambda f, z, ts, c, omega, *a: omegas.append(omega) or sample_lcm(f, z, ts, c, omega, *a))
    data = write_captioned_images(tmp_path / "images", 4)
    assert main(["finetune", "--preset", "tiny", "--steps", "1", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "run")]) == 0
    assert omegas and set(omegas) == {1.0}, omegas


def test_fine_tuning_inside_the_distilled_range_gets_no_note_and_an_lcm_without_a_record_its_runs_range():
    record = GuidanceRecord(1.0, 4.0, 2.0, None)
    assert record.fine_tuning_note(1.0, 4.0) is None and record.fine_tuning_note(2.0, 3.0) is None
    assert "[0.5, 4] reaches outside [1, 4]" in record.fine_tuning_note(0.5, 4.0)
    assert GuidanceRecord.of_fine_tuning(record, 3.0, 15.0, 8.0) == GuidanceRecord(1.0, 4.0, 4.0, None)
    assert GuidanceRecord.of_fine_tuning(None, 3.0, 15.0, 8.0) == GuidanceRecord(3.0, 15.0, 8.0, None)


def test_the_small_data_note_says_how_often_a_sample_repeats_when_that_is_not_a_whole_number():
    """3 images and a batch of 4: each is drawn about 1.3 times a batch, not "about 1 times"."""
    note = TrainingBatches.small_data_note(SimpleNamespace(dataset=[0, 1, 2]), 4)
    assert "about 1.3 times" in note
    assert "about 4 times" in TrainingBatches.small_data_note(SimpleNamespace(dataset=[0]), 4)
