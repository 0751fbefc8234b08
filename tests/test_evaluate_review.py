"""Fixes of a review of `lcm evaluate` with a user's own models: the report's FID is Inception's when it is computed, an
LCM-LoRA's passes do not depend on the teacher beside it, a prompt file of any name, the grid's columns are the images the
rows scored, and a rerun of fewer settings says what its report leaves out and keeps no figure of the others."""

from types import SimpleNamespace

import pytest

from latent_consistency.cli import main
from latent_consistency.evaluation import compare
from latent_consistency.evaluation.table import GUIDED_DISTILL, Row, metric_names


def test_the_report_shows_inception_fid_where_it_is_computed_beside_clip():
    # was: CLIP-feature FID in report.md and the plots with --clip and --inception; Inception's (Table 1's) only in results.json
    assert metric_names({"lcm|1|8": {"clip_fid": 0.6, "inception_fid": 12.0, "clip_clip_score": 30.0}}) == ("inception_fid", "clip_clip_score")
    assert metric_names({"lcm|1|8": {"clip_fid": 0.6, "clip_clip_score": 30.0}}) == ("clip_fid", "clip_clip_score")
    assert metric_names({"lcm|1|2": {"judge_fid": 5.0, "inception_fid": 9.0, "judge_alignment": 0.9}})[0] == "judge_fid"


@pytest.mark.parametrize("omega_teacher", [False, True])
def test_an_lcm_lora_guided_at_g_above_1_takes_two_passes_a_step_whatever_the_teacher(omega_teacher):
    # was: 1 a step beside a guidance-distilled teacher (its ω input's one pass), 2 beside a CFG teacher or none
    lora = SimpleNamespace(time_cond_proj_dim=None, is_lcm=True)
    teacher = SimpleNamespace(time_cond_proj_dim=32 if omega_teacher else None, is_lcm=False)
    assert Row("lcm", 2, 4.0).network_evaluations(lora, teacher) == 4
    assert Row("lcm", 2, 1.0).network_evaluations(lora, teacher) == 2
    assert Row("ddim", 2, 4.0).network_evaluations(lora, teacher) == (2 if omega_teacher else 4)
    assert Row("lcm", 2, 4.0).network_evaluations(SimpleNamespace(time_cond_proj_dim=32), teacher) == 2
    assert Row(GUIDED_DISTILL, 2, 4.0).network_evaluations(lora, teacher) == 2


@pytest.mark.slow
def test_a_prompt_file_of_any_name_grid_seeds_and_a_rerun_of_fewer_scales(tiny_lcm, tmp_path, monkeypatch, capsys):
    from tiny_models import save_tiny_clip, write_captioned_images

    prompts = tmp_path / "myprompts"  # was refused: only a .txt name was read as a prompt file
    prompts.write_text("a red star\na blue ring\na green square\n")
    real_noise, seeds = compare._noise, []
    monkeypatch.setattr(compare, "_noise", lambda model, drawn, device: seeds.append(list(drawn)) or real_noise(model, drawn, device))
    out = tmp_path / "out"
    args = ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(prompts), "--reference", str(write_captioned_images(tmp_path / "real", 6)),
            "--clip", str(save_tiny_clip(tmp_path / "clip")), "--steps", "1", "--samples", "3", "--images-per-prompt", "2",
            "--grid-columns", "3", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--guidance-scales", "1.5,3"]) == 0
    # each row scores prompt j's images from seeds 2j and 2j + 1; the grids' column j is the first of them (was: seed j)
    assert seeds[:2] == [list(range(6))] * 2 and seeds[2:] == [[0], [2], [4]] * 3  # grid.png's row, guidance_grid.png's two
    assert (out / "guidance.png").is_file() and (out / "guidance_grid.png").is_file()
    capsys.readouterr()
    # a rerun of one of the scales: its report is that row's, no figure of the other scale is left beside it, and it says so
    assert main([*args, "--guidance-scale", "3"]) == 0
    assert not (out / "guidance.png").exists() and not (out / "guidance_grid.png").exists()
    err = capsys.readouterr().err
    assert "report.md and the figures show the 1 rows this command asked for" in err and "also keeps 1 row(s) of earlier runs" in err
