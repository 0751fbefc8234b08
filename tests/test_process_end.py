"""`cli.end_process`: how a process of a multi-process run ends once its command has printed its line."""

from __future__ import annotations

import signal


def test_a_stop_during_a_multi_process_end_is_ignored(monkeypatch):
    # was: the launcher's SIGTERM, sent to a process ending after its one-line stop ("another process of this run
    # stopped"), raised `Terminated` in its clean-up, and "Exception ignored in ... raise Terminated" printed under the line
    import latent_consistency.cli as cli

    ended = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli.os, "_exit", ended.append)
    before = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, cli._terminated)
    try:
        cli.end_process(2)
        assert ended == [2]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)


def test_one_process_returns_its_code_and_keeps_its_handlers(monkeypatch):
    import latent_consistency.cli as cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    handler = signal.getsignal(signal.SIGINT)
    assert cli.end_process(3) == 3 and signal.getsignal(signal.SIGINT) is handler
