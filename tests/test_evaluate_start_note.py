"""`lcm evaluate`'s teacher rows say, as `lcm generate --sampler` does, when a step count starts where the teacher reads the
starting noise as a nearly clean latent (SD's "leading" spacing: one DDIM step at timestep 1 or 0): that row scores the
noise itself, and the report says so under the table (before: the world's DDIM row of FID 424 at 1 step, without a word)."""

import torch

from latent_consistency.cli import main


def stand_in(path):
    """A TorchScript network with the FID Inception file's interface: a cheap metric for the table."""

    class StandIn(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1)

    torch.jit.script(StandIn()).save(str(path))
    return path


def test_a_teacher_row_that_scores_its_starting_noise_is_noted_in_the_report(tiny_lcm, tiny_sd, tmp_path, capsys):
    from tiny_models import write_captioned_images

    images, metric = write_captioned_images(tmp_path / "images", 4), stand_in(tmp_path / "stand-in.pt")
    argv = ["evaluate", "--lcm", str(tiny_lcm), "--teacher", str(tiny_sd), "--prompts", str(images), "--samples", "2",
            "--inception", str(metric), "--device", "cpu"]
    assert main([*argv, "--steps", "1,2", "--out", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    note = "The teacher's rows: 1 ddim step(s) under this model's scheduler config"
    assert f"lcm evaluate: note: {note}" in err and "give --steps 2 or more" in err, err
    assert note in (tmp_path / "one" / "report.md").read_text()
    assert main([*argv, "--steps", "2", "--out", str(tmp_path / "two")]) == 0
    assert "The teacher's rows" not in capsys.readouterr().err + (tmp_path / "two" / "report.md").read_text()
