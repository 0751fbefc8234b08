"""A Ctrl-C (or SIGTERM's SystemExit) that lands inside a checkpoint's `torch.save` is raised as itself: torch's zip
writer, closing after the interrupt, raised "unexpected pos 46 vs 0" in its place, and a stopped `accelerate launch` run
printed that traceback where it says one line (seen in CI, `test_ctrl_c_of_the_launcher_is_one_line_from_the_first_process`)."""

import builtins

import pytest
import torch

from latent_consistency import outputs


class StoppedFile:
    """A file whose third write is interrupted, as a signal handler's exception lands inside torch's writer."""

    def __init__(self, f, stop: type[BaseException]):
        self.f, self.writes, self.stop = f, 0, stop

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise self.stop
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_torch_save_is_raised_as_itself(stop, tmp_path, monkeypatch):
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: StoppedFile(real_open(path, mode, *a, **k), stop))
    with pytest.raises(stop):
        outputs.save_torch({"weights": torch.zeros(100_000)}, tmp_path / "state.pt")


def test_a_failed_write_stays_torchs_error_with_the_oserror_behind_it(tmp_path, monkeypatch):
    """A write that fails (a full disk) is torch's RuntimeError still, its OSError behind it for `outputs.written`."""
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: StoppedFile(real_open(path, mode, *a, **k), OSError))
    with pytest.raises(RuntimeError) as raised:
        outputs.save_torch({"weights": torch.zeros(100_000)}, tmp_path / "state.pt")
    assert isinstance(raised.value.__context__, OSError)
