"""Progress where stderr is a log (nohup, SLURM, CI, `| tee`): whole lines at an interval and at the end, never tqdm's
carriage-return redraws; a tqdm bar where it is a terminal or a Jupyter cell."""

import io
import json
import re
import sys
import types

import pytest
from tqdm.std import tqdm as std_tqdm

from latent_consistency import progress
from latent_consistency.cli import main
from latent_consistency.errors import UserError
from latent_consistency.progress import progress_bar


@pytest.fixture
def clock(monkeypatch):
    """The module's clock, set by hand: `clock.now = 40` is 40 s after the bar started."""
    fake = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(progress, "monotonic", lambda: fake.now)
    monkeypatch.delenv(progress.INTERVAL_VARIABLE, raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    return fake


def run_phase(clock, updates: list[tuple[float, int]]) -> None:
    """A training-loop-like phase of 4000 steps: `updates` are (time, steps done since the last)."""
    with progress_bar(total=4000, desc="distill lcd", unit="step") as bar:
        bar.set_postfix(loss="0.0123", samples_per_s="24.8")
        for clock.now, steps in updates:
            bar.update(steps)


def test_a_log_gets_a_whole_line_every_30_seconds_and_one_at_the_end(clock, capsys):
    # was: tqdm's redraws, "\r"-separated up to 10 times a second, one endless line in the log
    run_phase(clock, [(20, 600), (40, 600), (60, 1200), (100, 1600)])
    assert capsys.readouterr().err == (
        "distill lcd: 1200/4000 (30 %), 30 step/s, loss 0.0123, samples_per_s 24.8, ETA 1 min 33 s\n"  # the rate since the bar began
        "distill lcd: 4000/4000 (100 %), 40 step/s, loss 0.0123, samples_per_s 24.8, done in 1 min 40 s\n")  # at 100 s: the end line only


def test_a_line_gives_the_rate_since_the_last_line_and_slow_steps_in_seconds_each(clock, capsys):
    with progress_bar(total=10, desc="evaluate", unit="row") as bar:
        for clock.now in (50, 60, 200):
            bar.update(1)
    assert capsys.readouterr().err.splitlines() == [
        "evaluate: 1/10 (10 %), 50 s/row, ETA 7 min 30 s",
        "evaluate: 3/10 (30 %), 75 s/row, ETA 8 min 45 s",  # 2 rows in the 150 s since the last line
        "evaluate: 3/10 (30 %), 66.7 s/row, done in 3 min 20 s"]


@pytest.mark.parametrize(("setting", "lines"), [("70", 1), ("0", 4), ("inf", 1), (" ", 2)])
def test_lcm_progress_interval_sets_the_seconds_between_lines(setting, lines, clock, capsys, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, setting)
    run_phase(clock, [(20, 600), (40, 600), (60, 1200), (100, 1600)])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == lines and "done in 1 min 40 s" in err[-1], err


@pytest.mark.parametrize("setting", ["soon", "-5", "nan"])
def test_a_bad_lcm_progress_interval_is_one_line_saying_what_to_set(setting, clock, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, setting)
    with pytest.raises(UserError, match=f"LCM_PROGRESS_INTERVAL is '{setting}'; set it to the seconds between progress lines"):
        progress_bar(total=3, desc="generate")


def test_a_phase_that_stops_leaves_the_last_line_to_the_stop(clock, capsys):
    """The stop's one line (an error, Ctrl-C, SIGTERM) follows; no end line claims the phase was done."""
    with pytest.raises(KeyboardInterrupt), progress_bar(total=4000, desc="latent cache") as bar:
        clock.now = 45
        bar.update(100)
        raise KeyboardInterrupt
    batches = progress_bar(range(5), desc="render images")
    with pytest.raises(ValueError):
        for _ in batches:
            raise ValueError
    assert capsys.readouterr().err == "latent cache: 100/4000 (2 %), 2.22 it/s, ETA 29 min 15 s\n"


def test_a_phase_of_unknown_length_counts_without_a_total(clock, capsys):
    with progress_bar(desc="latent cache", unit="sample") as bar:
        clock.now = 3 * 3600 + 120
        bar.update(2_500_000)
    assert capsys.readouterr().err.splitlines() == ["latent cache: 2500000, 229 sample/s", "latent cache: 2500000, 229 sample/s, done in 3 h 02 min"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_still_gets_tqdms_bar(monkeypatch, clock):
    monkeypatch.setattr(sys, "stderr", Terminal())
    for _ in progress_bar(range(3), desc="generate", unit="batch"):
        pass
    assert "\rgenerate: 100%|" in sys.stderr.getvalue() and "3/3" in sys.stderr.getvalue(), sys.stderr.getvalue()


def test_a_jupyter_kernel_gets_tqdm_autos_bar(monkeypatch, clock):
    """Its cell redraws the bar live (tqdm.auto's widget where ipywidgets is installed): no lines 30 s apart there."""
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert isinstance(progress_bar(total=3, desc="evaluate"), std_tqdm)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))  # IPython's shell, no kernel
    assert isinstance(progress_bar(total=3, desc="evaluate"), progress.LogLines)


def generate(tiny_lcm, out) -> list[str]:
    return ["generate", "a red star", "a blue ring", "a green square", "--model", str(tiny_lcm), "--steps", "1", "--batch-size", "1",
            "--out", str(out)]


def test_lcm_generate_into_a_log_writes_whole_lines(tiny_lcm, tmp_path, capsys, monkeypatch, clock):
    # was: "\rgenerate:   0%|          | 0/3 [00:00<?, ?batch/s]\rgenerate:  33%|███▎ ..." in the log
    monkeypatch.setenv(progress.INTERVAL_VARIABLE, "0")
    assert main(generate(tiny_lcm, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n"), repr(err)
    assert err.splitlines() == ["generate: 1/3 (33 %)", "generate: 2/3 (67 %)", "generate: 3/3 (100 %), done in 0.0 s"], err  # no time passed


def test_tqdm_disable_silences_the_progress_of_a_command(tiny_lcm, tmp_path, capsys, monkeypatch, clock):
    # was: the CLI passed disable=False to tqdm, which overrides TQDM_DISABLE=1
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(generate(tiny_lcm, tmp_path / "out")) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert main(generate(tiny_lcm, tmp_path / "terminal")) == 0
    assert sys.stderr.getvalue() == ""


def test_lcm_distill_into_a_log_ends_with_the_last_steps_loss(tiny_sd, tmp_path, capsys, clock):
    """The loop sets loss and samples_per_s after its update of the bar: the end line, written as the loop is left, holds the
    last step's."""
    from tiny_models import write_captioned_images

    run = tmp_path / "run"
    data = write_captioned_images(tmp_path / "images", 4)
    assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(run), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("lcm distill: note: --data "), err  # its one note: the images are encoded at every step (`lcm cache`)
    err = err.split("\n", 1)[1]
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["step"] == 2 and "\r" not in err, err
    assert re.fullmatch(rf"lcd full: 2/2 \(100 %\), loss {last['loss']:.4g}, samples_per_s [\d.]+, done in 0.0 s\n", err), err
