"""A one-process command under `accelerate launch` or torchrun (WORLD_SIZE > 1) is refused in one line by its first
process, before any work; the others end silently with the same exit code (`cli.refuse_launch`)."""

from __future__ import annotations

import pytest

import latent_consistency.cli as cli
from command_helpers import run


@pytest.fixture
def launched(monkeypatch):
    """This process as one of two launched ones; the model loaders fail the test if reached."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli, "REFUSAL_WAIT_S", 0.0, raising=False)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("latent_consistency.models.load_diffusion_model", no_loading)
    monkeypatch.setattr("latent_consistency.pipelines.load_lcm", no_loading)
    return monkeypatch


@pytest.mark.parametrize("argv", [
    ["generate", "a red star", "--model", "some/lcm", "--out", "OUT"],
    ["evaluate", "--lcm", "some/lcm", "--out", "OUT"],
    ["serve", "--model", "some/lcm"],
    ["world", "export", "--from", "W", "--out", "OUT"],
    ["demo", "--out", "OUT"],
])
def test_a_one_process_command_under_a_launcher_is_one_line_before_any_work(argv, launched, tmp_path, capsys):
    """Was: `lcm generate` ran whole in every process, each writing the same files into one --out (both printed "wrote 2
    image(s)"); `lcm cache` alone refused."""
    launched.chdir(tmp_path)
    launched.setattr("latent_consistency.folder_lock.first_process", lambda: True)
    code, out, err = run(argv, capsys)
    command = " ".join(argv[:2]) if argv[0] == "world" else argv[0]
    assert code == 2 and err == (f"lcm {command}: error: lcm {command} runs in one process: run it without accelerate launch or "
                                 "torchrun (only lcm distill and lcm finetune run over several processes)"), err
    assert list(tmp_path.iterdir()) == []


def test_the_other_processes_end_silently_with_the_same_code(launched, tmp_path, capsys):
    launched.chdir(tmp_path)
    launched.setattr("latent_consistency.folder_lock.first_process", lambda: False)
    code, out, err = run(["generate", "a red star", "--model", "some/lcm", "--out", "OUT"], capsys)
    assert (code, out, err) == (2, "", "")
    assert list(tmp_path.iterdir()) == []


def test_a_launched_process_s_sigterm_is_said_to_be_the_launcher_s(monkeypatch):
    """Was: after a kill -9 of one process the other, stopped by the launcher, said "lcm distill: terminated at step 12 of
    40: ...", as if the user had stopped it."""
    stop = cli.Terminated("at step 12 of 40: the checkpoint of step 10 is kept")
    assert cli.stopped(stop) == ("terminated at step 12 of 40: the checkpoint of step 10 is kept", 143)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.stopped(stop) == ("terminated by the launcher (another process of this run ended, or the launcher was stopped) at "
                                 "step 12 of 40: the checkpoint of step 10 is kept", 143)
    assert cli.stopped(KeyboardInterrupt()) == ("interrupted", 130)
