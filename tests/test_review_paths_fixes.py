"""What a run says at its end, once: the data summary covers the held-out data (--eval-data) as well, naming each folder;
`lcm generate --style-lora` beside an LCM-LoRA prints no peft warning; a launched run whose loss stays non-finite says so once.
"""

import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.training.config import DistillConfig
from latent_consistency.training.run_folder import skipped_summary_lines
from test_multiprocess_refusals import distill, error_lines, launch_lcm
from two_processes import ENV


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def held_out_folder(folder):
    """Four sidecar-captioned images, the caption of the last one Latin-1 (not UTF-8): the scan skips it as "bad_caption"."""
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a blue circle {i}")
    (folder / "3.txt").write_bytes("a blue café".encode("latin-1"))
    return folder


def data_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("data")]


@pytest.mark.slow
def test_the_data_summary_counts_what_the_held_out_data_skipped_naming_each_folder(tiny_sd, images, tmp_path, capsys):
    """Was "data: nothing skipped or converted": the held-out folder's skipped caption was logged once when first seen, and
    then missing from the end-of-run summary, which counted the training data alone."""
    held_out = held_out_folder(tmp_path / "held-out")
    assert main([*distill(tiny_sd, images, tmp_path / "run", "--steps", "1"), "--eval-data", str(held_out)]) == 0
    assert data_lines(capsys.readouterr().out) == [f"data (--data {images}): nothing skipped or converted",
                                                   f"data (--eval-data {held_out}): skipped: bad_caption=1"]


def test_the_data_summary_is_one_line_as_before_when_the_held_out_data_skipped_nothing():
    config = DistillConfig(data="train", eval_data="held-out")
    clean = ({}, [])
    assert skipped_summary_lines(config, [({"corrupt": 1}, [("corrupt", "a.png")])], clean) == ["data: skipped: corrupt=1"]
    assert skipped_summary_lines(config, [None], clean) == []  # data that counts nothing (a world dataset) says nothing


def test_a_held_out_part_of_data_is_counted_in_its_one_line_each_sample_once():
    """--eval-fraction: the held-out part's scan is the whole folder's, as the training part's is: a sample counted by both
    counts once, and one only the held-out reads met (a corrupt image) counts too."""
    config = DistillConfig(data="train", eval_fraction=0.25)
    scanned = ("bad_caption", "c.txt is not UTF-8")
    training = [({"bad_caption": 1}, [scanned])]
    held_out = ({"bad_caption": 1, "corrupt": 1}, [scanned, ("corrupt", "d.png")])
    assert skipped_summary_lines(config, training, held_out) == ["data: skipped: bad_caption=1, corrupt=1"]


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """An LCM-LoRA and a style LoRA of the tiny SD (`save_tiny_lora`)."""
    from tiny_models import save_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    return save_tiny_lora(root / "lcm-lora", tiny_sd, seed=1), save_tiny_lora(root / "style", tiny_sd, seed=2)


@pytest.mark.slow
def test_a_style_lora_beside_an_lcm_lora_prints_no_peft_warning(tiny_sd, loras, tmp_path):
    """Was peft's "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters ..." on
    stderr below the run's one line: the second adapter on the UNet is what --style-lora asks for."""
    lcm_lora, style = loras
    out = tmp_path / "images"
    done = subprocess.run([sys.executable, "-m", "latent_consistency.cli", "generate", "a red star", "--model", str(tiny_sd), "--lora",
                           str(lcm_lora), "--style-lora", f"{style}:0.6", "--steps", "2", "--out", str(out)],
                          env=ENV | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peft_config" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert (out / "0000-a-red-star.png").is_file()


def test_only_that_peft_warning_is_silenced():
    """The filter is narrow: another warning raised while a style LoRA loads still shows."""
    import warnings

    from latent_consistency.models import _beside_other_adapters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _beside_other_adapters():
            warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple adapters", stacklevel=1)
            warnings.warn("another library warning", stacklevel=1)
    assert [str(w.message) for w in caught] == ["another library warning"]


# Runs `lcm` with a loss that is NaN at every step (the way tests/test_distill.py forces one), in each launched process
NAN_LOSS = textwrap.dedent("""
    import sys

    import torch

    from latent_consistency.training import loop


    def nan_loss(config, base, scheduler_config, ode_targets=None):
        def loss(student, target, latents, cond, uncond, generator):
            return student(latents, torch.full((len(latents),), 999), cond, 3.0).mean(dim=(1, 2, 3)) * float("nan")
        return loss


    loop.build_loss = nan_loss
    from latent_consistency.cli import end_process, main
    sys.exit(end_process(main(sys.argv[1:])))
""")


@pytest.mark.slow
def test_a_launched_runs_non_finite_loss_is_said_once_and_ends_every_process(tiny_sd, images, tmp_path):
    """The loss judged is reduced over the processes: every process stops at the same step, after the same save. Was: the
    line once per process."""
    script, out = tmp_path / "nan_loss.py", tmp_path / "run"
    script.write_text(NAN_LOSS)
    done = launch_lcm(distill(tiny_sd, images, out, "--steps", "10", "--max-nonfinite-steps", "2"), script, timeout=120)
    errors = [line for line in error_lines(done.stderr) if line.startswith("lcm distill: error: ")]
    assert len(errors) == 1 and "loss was not finite for 2 steps in a row at step 0" in errors[0], done.stderr[-3000:]
    assert f"checkpoint saved in {out / 'checkpoints'}" in errors[0], errors
    assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr[-3000:]
