"""A stop that comes while `lcm serve` waits for the batch in flight, after uvicorn began to stop (a third signal, or a
second one after a forced exit): said in one line and the process ended at once. It was raised inside the lifespan's
wait, which starlette logged as an "ERROR: Traceback", and the interpreter then aborted in its exit with the batcher's
thread still inside torch ("terminate called without an active exception", exit -6; seen under load in
`test_interruptions`, whose timing reproduces it only on a busy machine). Here the stop is delivered where it landed."""

import asyncio
from types import SimpleNamespace

import pytest

from latent_consistency import cli
from latent_consistency.cli.serve import stop_batcher
from latent_consistency.serve.batcher import Batcher


def stopped_while_waiting(batcher: Batcher) -> list[bool]:
    """`batcher`, whose first wait for the batch in flight is where a stop lands: its `stop()` raises KeyboardInterrupt
    once. Returns the `wait` of each call."""
    calls, stop = [], batcher.stop

    def stop_once(wait: bool = True) -> None:
        calls.append(wait)
        stop(wait=False)
        if wait and len(calls) == 1:
            raise KeyboardInterrupt

    batcher.stop = stop_once
    return calls


def idle_batcher() -> Batcher:
    return Batcher(lambda jobs: [], max_batch=1, max_queue=1, max_wait_s=0.0, metrics=SimpleNamespace(set_queue_depth=lambda n: None))


@pytest.fixture
def ending_at_once():
    """`cli.end_at_once`'s flag, cleared before and after: set, `end_process` would end the test's process."""
    cli._ENDING_AT_ONCE.clear()
    yield cli._ENDING_AT_ONCE
    cli._ENDING_AT_ONCE.clear()


def test_a_stop_in_the_lifespans_wait_is_kept_not_logged_then_raised_by_the_runner(tiny_lcm, ending_at_once, caplog):
    import torch

    from latent_consistency.pipelines import LCMGenerator
    from latent_consistency.serve.app import create_app
    from latent_consistency.serve.request import Limits

    app = create_app(LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32), Limits(max_side=64))
    calls = stopped_while_waiting(app.state.batcher)

    async def lifespan():  # as starlette runs it: enter at start-up, leave at shutdown
        async with app.router.lifespan_context(app):
            pass

    with caplog.at_level("ERROR"):
        asyncio.run(lifespan())
    assert isinstance(app.state.shutdown_stop, KeyboardInterrupt) and not caplog.records
    with pytest.raises(KeyboardInterrupt):
        stop_batcher(app)
    assert calls == [True, False] and ending_at_once.is_set()  # not waited for again; the process ends at once


def test_a_stop_in_the_runners_wait_is_raised_and_the_process_ends_at_once(ending_at_once):
    batcher = idle_batcher()
    calls = stopped_while_waiting(batcher)
    with pytest.raises(KeyboardInterrupt):
        stop_batcher(SimpleNamespace(state=SimpleNamespace(batcher=batcher, shutdown_stop=None)))
    assert calls == [True, False] and ending_at_once.is_set()


def test_an_unstopped_wait_ends_the_batcher_and_the_process_as_usual(ending_at_once):
    batcher = idle_batcher()
    batcher.start()
    stop_batcher(SimpleNamespace(state=SimpleNamespace(batcher=batcher, shutdown_stop=None)))
    assert not batcher.thread.is_alive() and not ending_at_once.is_set()
