"""What `lcm distill` and `lcm finetune` tell their user: a stop's one line says what is kept and how to go on, a resume says
where it goes on from, the model card's command runs as written, the demo's runs name the demo's flags, config errors
name flags, and a run that encodes images at every step points at `lcm cache`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from latent_consistency.cli import Terminated, main
from latent_consistency.training import run_folder
from latent_consistency.training.config import DistillConfig, FinetuneConfig, resolve_config
from latent_consistency.training.loop import encoding_note, warmup_note
from tiny_models import write_captioned_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def distill_args(tiny_sd, data, out, *extra):
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), *extra]


def stop_after(monkeypatch, step: int, stop: type[KeyboardInterrupt] = KeyboardInterrupt) -> None:
    """Stop the run (Ctrl-C, or SIGTERM's `Terminated`) once step `step` is logged, validated and checkpointed."""
    after_step = run_folder.RunFolder.after_step

    def stopping(self, progress, *args):
        after_step(self, progress, *args)
        if progress.step == step:
            raise stop

    monkeypatch.setattr(run_folder.RunFolder, "after_step", stopping)


def test_a_stop_says_what_it_kept_and_a_resume_where_it_goes_on(tiny_sd, image_folder, tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 3 of the tiny preset (a checkpoint every 2 steps): one line with the kept checkpoint, the step lost and
    the command to go on; the resumed run says where it starts; SIGTERM keeps its exit code 143."""
    out = tmp_path / "run"
    stop_after(monkeypatch, 3)
    assert main(distill_args(tiny_sd, image_folder, out)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lcm distill: interrupted at step 3 of 4: the checkpoint of step 2 is kept, 1 step since then is lost; to continue, run the "
        "same command with --resume")
    monkeypatch.undo()
    stop_after(monkeypatch, 4, Terminated)
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 143
    captured = capsys.readouterr()
    assert f"resuming {out} at step 2 of 4" in captured.out.splitlines()
    assert captured.err.strip().splitlines()[-1] == ("lcm distill: terminated at step 4 of 4: the checkpoint of step 4 is kept, no step "
                                                     "is lost; to continue, run the same command with --resume")


def test_resuming_a_run_without_a_checkpoint_says_it_starts_over(tiny_sd, image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stop_after(monkeypatch, 1)
    assert main(distill_args(tiny_sd, image_folder, out)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lcm distill: interrupted at step 1 of 4, before its first checkpoint: 1 step is lost, and there is nothing to continue from; "
        "to start it again, run the same command with --resume")
    monkeypatch.undo()
    assert main(distill_args(tiny_sd, image_folder, out)) == 2  # as the line says: without --resume the folder is not empty
    assert "is not empty; pass --resume" in capsys.readouterr().err
    assert main(distill_args(tiny_sd, image_folder, out, "--resume")) == 0
    captured = capsys.readouterr()
    assert f"lcm distill: note: {out} has no checkpoint to resume from: starting the run from step 0 of 4" in captured.err.splitlines()
    assert not [line for line in captured.out.splitlines() if line.startswith("resuming")]


def test_the_model_cards_command_runs_as_written_from_another_folder(tiny_sd, image_folder, tmp_path, monkeypatch):
    """The card's `lcm generate` line, split as a shell splits it, runs from any folder: its --out is there, its model absolute."""
    out = tmp_path / "my lcd"  # a blank in the path: the line quotes it
    monkeypatch.chdir(tmp_path)
    assert main(distill_args(tiny_sd, image_folder, "my lcd", "--steps", "1")) == 0
    card = ModelCard.load(out / "lcm" / "README.md")
    argv = shlex.split(card.text.split("```sh\n", 1)[1].split("```", 1)[0])
    assert argv[:2] == ["lcm", "generate"] and argv[argv.index("--model") + 1] == str(out / "lcm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(argv[1:]) == 0
    assert [p.suffix for p in (elsewhere / argv[argv.index("--out") + 1]).iterdir()] == [".png"]


def test_a_lora_cards_command_names_its_base_model_and_adapters_by_absolute_paths(tmp_path, monkeypatch):
    from latent_consistency.training.model_card import model_card

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    config = DistillConfig(teacher="teacher", data="world:shapes", out="o", adapter="lora")
    line = model_card(Path("o") / "lora", config, None).split("```sh\n", 1)[1]
    argv = shlex.split(line.split("```", 1)[0])
    assert argv[argv.index("--model") + 1] == str(tmp_path / "teacher")
    assert argv[argv.index("--lora") + 1] == str(tmp_path / "o" / "lora") and "--out" in argv


@pytest.mark.parametrize("cls, flag", [(DistillConfig, "--distill-steps"), (FinetuneConfig, "--finetune-steps")])
def test_the_demos_runs_name_the_demos_flags(cls, flag, tiny_sd, tmp_path):
    """`lcm demo --distill-steps 60` under the world preset's 100 warm-up steps: the note names --distill-steps, and no flag of
    `lcm distill` the demo does not have."""
    from latent_consistency.world.demo import demo_config

    model = {"teacher" if cls is DistillConfig else "model": str(tiny_sd)}
    config = demo_config(cls, dict(model, data="world:shapes", out=str(tmp_path / "run"), steps=30), flag)
    note = warmup_note(config)
    assert f"is more than {flag} 30" in note and not re.search(r"--(?!distill-steps|finetune-steps)\w", note), note
    assert "--lr-warmup-steps" in warmup_note(resolve_config(cls, "world", overrides=dict(model, data="d", out="o", steps=30)))


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch-size", "0"), ("--lr", "0"), ("--adam-beta1", "1"),
                                         ("--seed", "-1")])
def test_a_config_error_names_the_flag_as_typed(flag, value, tiny_sd, image_folder, tmp_path, run_error):
    code, err = run_error(distill_args(tiny_sd, image_folder, tmp_path / "run", flag, value, "--dry-run"))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"lcm distill: error: {flag} must be"), err


def test_a_guidance_pair_error_names_its_flags(tiny_sd, image_folder, tmp_path, run_error):
    code, err = run_error(distill_args(tiny_sd, image_folder, tmp_path / "run", "--guidance-pair-steps", "2", "--dry-run"))
    assert code == 2 and "--guidance-pair-steps sets how long the pair term applies: it needs --guidance-pair-weight > 0" in err, err


def test_distilling_from_images_names_the_cache_command_once_and_a_cache_run_does_not(tiny_sd, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(distill_args(tiny_sd, image_folder, out, "--steps", "1")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "lcm cache" in line]
    assert len(notes) == 1, notes
    command = shlex.split(notes[0].split("`")[1])
    assert command[:2] == ["lcm", "cache"] and command[command.index("--model") + 1] == str(tiny_sd)
    assert command[command.index("--data") + 1] == str(image_folder)
    assert main(command[1:]) == 0  # the named command writes the cache, and a run on it encodes nothing per step
    cache = command[command.index("--out") + 1]
    capsys.readouterr()
    assert main(distill_args(tiny_sd, cache, tmp_path / "cached", "--steps", "1")) == 0
    assert "lcm cache" not in capsys.readouterr().err


def test_the_cache_note_at_another_resolution_names_it():
    """Was: no note at another size than the native one, which `lcm cache` did not encode at; `lcm cache --resolution`
    now does, and a run at that size trains on the cache."""
    from types import SimpleNamespace

    config = DistillConfig(teacher="t", data="imgs", out="o", resolution=32)
    images = SimpleNamespace(encodes_images=True)
    assert "lcm cache --model t --data imgs --out o-latents --resolution 32`" in encoding_note(config, SimpleNamespace(native_size=16), images)
    assert "lcm cache --model t --data imgs --out o-latents" in encoding_note(config, SimpleNamespace(native_size=32), images)
    assert encoding_note(config, SimpleNamespace(native_size=32), SimpleNamespace(encodes_images=False)) is None
