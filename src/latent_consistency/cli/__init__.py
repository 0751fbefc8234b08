"""The `lcm` command line: each command module builds its arguments into calls of the library; no math
lives here.

Each command module exposes `register(subparsers)`, which adds its parser and sets `run`, a function of
the parsed arguments. A `UserError` anywhere becomes one line on stderr and exit code 2, and so does an OSError
about a path (a name too long, no permission, a full or read-only disk) and a data worker process killed (out of
memory). A process of a multi-process run that stops because another one did says so in one line, exit code 1. Under a
launcher, a stop (Ctrl-C, SIGTERM), which reaches every process, and a refusal every process raises alike
(`training.loop.on_every_process`) are said once, by the first process. Only `lcm distill` and `lcm finetune` run as
several processes; every other command under a launcher is refused in one line (`refuse_launch`).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
import time
import warnings

from latent_consistency import __version__
from latent_consistency.cli.arguments import OneLineParser
from latent_consistency.errors import UserError


def build_parser() -> OneLineParser:
    from latent_consistency.cli import cache, demo, distill, evaluate, finetune, generate, serve, world

    parser = OneLineParser(
        prog="lcm",
        description="Latent Consistency Models (Luo et al. 2023): distil, fine-tune, sample, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (generate, distill, finetune, cache, evaluate, serve, world, demo):
        command.register(subparsers)
    return parser


def quiet_libraries() -> None:
    """The CLI speaks for itself: no loading bars or deprecation chatter from transformers/diffusers (nor huggingface_hub's
    warning that diffusers still passes `local_dir_use_symlinks`, printed above the one-line error of a hub id offline)."""
    import diffusers
    import transformers

    for lib in (transformers, diffusers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)


# OSErrors that a path from the command line or the machine causes. Not ENOENT: a user's missing path is checked where it is
# read, and a missing file of ours is a defect whose traceback must show. EFBIG: a file larger than its file system takes
# (a checkpoint of over 4 GB on FAT32).
USER_PATH_ERRORS = {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
                    errno.EDQUOT, errno.EFBIG}
# Of those, the ones of a write that did not fit: about the file written, even where a library names no file
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where Ctrl-C's KeyboardInterrupt is: the same clean-up, and one line."""


def _terminated(signum, frame) -> None:
    raise Terminated


def stopped(stop: KeyboardInterrupt) -> tuple[str, int]:
    """The words and exit code of a stop: 130 for Ctrl-C, 143 for SIGTERM (128 + the signal, as a shell reports them). The
    word, then the stop's message where it has one: a training run's says which steps it kept and how to go on
    (`training.run_folder.saying_what_a_stop_keeps`). In a launched run (WORLD_SIZE > 1) a SIGTERM is the launcher's, sent
    when another process ended (a kill -9, an error) as when the launcher itself was stopped: said so, not as the user's stop."""
    word, code = ("terminated", 128 + signal.SIGTERM) if isinstance(stop, Terminated) else ("interrupted", 130)
    if isinstance(stop, Terminated) and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        word = "terminated by the launcher (another process of this run ended, or the launcher was stopped)"
    return (f"{word} {stop}" if stop.args else word), code


def speaks_for_its_run() -> bool:
    """Whether this process says what befalls every process of its run alike: the process of a command run alone, or the first
    of a launched group (WORLD_SIZE > 1, as `end_process` reads it; then `folder_lock.first_process`). A stop reaches every
    process of a launched run (the launcher forwards Ctrl-C to each), and printed by each its line came once per process.
    A command run alone imports nothing here: its stop's line comes at once."""
    if int(os.environ.get("WORLD_SIZE") or 1) == 1:
        return True
    from latent_consistency.folder_lock import first_process

    return first_process()


def say_stop(prefix: str, stop: KeyboardInterrupt) -> int:
    """Print a stop's one line after `prefix` (`stopped`), where this process speaks for its run (`speaks_for_its_run`);
    its exit code."""
    word, code = stopped(stop)
    if speaks_for_its_run():
        print(f"{prefix}: {word}", file=sys.stderr)
    return code


def say_refusal(prefix: str, err: UserError) -> None:
    """Print a UserError's one line after `prefix`; one that every process of a launched run raised alike (`every_process`,
    set by `training.loop.on_every_process`) only on its first process, and every process then waits for the others: one
    that ended first had the launcher stop the first, maybe before it had printed the line."""
    if not getattr(err, "every_process", False):
        print(f"{prefix}: error: {err}", file=sys.stderr)
        return
    if speaks_for_its_run():
        print(f"{prefix}: error: {err}", file=sys.stderr, flush=True)
    from accelerate import PartialState

    PartialState().wait_for_everyone()


# The commands that train as one process of several under `accelerate launch` or torchrun; every other runs as one
LAUNCHED_COMMANDS = ("distill", "finetune")
# Seconds a launched process that is not the first waits before it ends after `refuse_launch`: the launcher stops the
# others once one has ended, and a first process stopped before it had printed would leave the user with no line
REFUSAL_WAIT_S = 10.0


def refuse_launch(command: str) -> int:
    """Exit code 2 for a one-process command started under a launcher (WORLD_SIZE > 1), which every process would have run
    whole: each `lcm generate` wrote the same files into one --out (the check that refuses existing images racing between
    them), each `lcm cache` encoded the data into one OUT.partial. The first process says so in one line; the others wait
    `REFUSAL_WAIT_S`, deaf to the launcher's stop, so that it does, and end silently."""
    if speaks_for_its_run():
        print(f"lcm {command}: error: lcm {command} runs in one process: run it without accelerate launch or torchrun (only "
              f"{' and '.join(f'lcm {c}' for c in LAUNCHED_COMMANDS)} run over several processes)", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, signal.SIG_IGN)
    time.sleep(REFUSAL_WAIT_S)
    return 2


def path_error(err: Exception) -> str | None:
    """The one line of an error that a path or the disk caused: an OSError of `USER_PATH_ERRORS` that names its file, or
    one of `DISK_FULL` behind any error (`os_error_of`: libraries' own errors over one, which name no file), naming the
    file written (a copy's OSError names its source first). None for anything else: a defect whose traceback must show."""
    from latent_consistency.outputs import os_error_of

    cause = os_error_of(err)
    full = cause is not None and cause.errno in DISK_FULL
    if not full and (cause is not err or cause.errno not in USER_PATH_ERRORS or cause.filename is None):
        return None
    if cause.filename is None:
        return f"{cause.strerror} while writing the output; free some space, or write to another disk"
    name = str(cause.filename2 if full and cause.filename2 is not None else cause.filename)
    return f"{cause.strerror}: {name if len(name) <= 120 else name[:120] + '…'}"


# The words of gloo's errors (the collective transport of multi-process runs on CPUs): its source path heads each one
_TRANSPORT = "gloo/transport/"
_TIMED_OUT = re.compile(r"Timed out waiting (\d+)ms")


def other_process_stopped(err: Exception) -> str | None:
    """The one line of a process of a multi-process run whose collective failed because another process had ended (its
    error, a kill) or did not come to it within the process group's timeout (it hangs): that process's own message says
    why, and this one's traceback ("Connection closed by peer" inside the backward pass) tells nothing. None for any
    other error. (A launcher that sees the other process end first stops this one, which then ends as on SIGTERM.)"""
    message = str(err)
    if _TRANSPORT not in message:
        return None
    if waited := _TIMED_OUT.search(message):
        return (f"another process of this run did not reach the same point within {int(waited.group(1)) / 1000:g} s: it hangs "
                "or is much slower; its own output says where")
    return "another process of this run stopped; its message, or the launcher's report, says why"


# What lowers each command's memory, for its out-of-memory line (`out_of_memory`)
_TRAINING_MEMORY = ("a smaller --batch-size with --grad-accumulation (the same effective batch), --gradient-checkpointing, "
                    "--mixed-precision fp16 or bf16, or --adapter lora; then --resume goes on from the last checkpoint")
MEMORY_HINTS = {"distill": _TRAINING_MEMORY, "finetune": _TRAINING_MEMORY,
                "generate": "fewer images at once (--batch-size), a smaller --height and --width, or --dtype float16",
                "evaluate": "a smaller --batch-size (images sampled and scored at once); a rerun keeps the rows scored",
                "cache": "a smaller --batch-size"}
_ALLOCATION = re.compile(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)")


def out_of_memory(err: Exception, command: str) -> str | None:
    """The one line of a device or the machine out of memory (torch's OutOfMemoryError, on a GPU or an MPS device; the CPU
    allocator's "can't allocate memory"): what failed to allocate and, for `command`, what to lower (`MEMORY_HINTS`);
    None for any other error. The settings asked more than the device has: a user's error, not a traceback."""
    import torch

    message = str(err)
    cpu = "DefaultCPUAllocator" in message and "allocate" in message
    if not (isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and (cpu or "MPS backend out of memory" in message))):
        return None
    where = "the CPU's memory" if cpu else "the MPS device" if "MPS" in message else "the GPU"
    size = _ALLOCATION.search(message)
    amount = size.group(1) if size else "an allocation"
    if amount.endswith(" bytes"):
        amount = f"{int(amount.split()[0]) / 2**30:,.2f} GiB"
    hint = MEMORY_HINTS.get(command)
    return f"out of memory: {where} could not give {amount}" + (f"; give {hint}" if hint else "")


def failure_line(err: Exception, args) -> tuple[str, int] | None:
    """What a command prints after "lcm COMMAND: " for an error that is not a defect, and its exit code: a path's or the
    disk's error, a device out of memory (`out_of_memory`) and a killed data worker (`worker_death`) as a user's error,
    `other_process_stopped`; None for anything else, a defect whose traceback must show."""
    from latent_consistency.data.workers import worker_death

    message = (path_error(err) or out_of_memory(err, getattr(args, "command", ""))
               or worker_death(err, "--num-workers" if hasattr(args, "num_workers") else None))
    if message is not None:
        return f"error: {message}", 2
    message = other_process_stopped(err)
    return (f"stopped: {message}", 1) if message is not None else None


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)  # not over a handler someone else set (a test runner, a launcher)
    try:  # the imports take seconds: Ctrl-C during them is the same one line as later, not a traceback
        parser = build_parser()
        args = parser.parse_args(argv)
        quiet_libraries()
    except KeyboardInterrupt as stop:
        return say_stop("lcm", stop)
    command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))  # `lcm world export`
    if args.command not in LAUNCHED_COMMANDS and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        return refuse_launch(command)
    try:
        args.run(args)
    except UserError as err:
        say_refusal(f"lcm {command}", err)
        return 2
    except Exception as err:  # an OSError about a path, a library's error over one, a killed worker, another process's end
        failure = failure_line(err, args)
        if failure is None:
            raise
        print(f"lcm {command}: {failure[0]}", file=sys.stderr)
        return failure[1]
    except KeyboardInterrupt as stop:
        return say_stop(f"lcm {command}", stop)
    return 0


def entry() -> int:
    """The `lcm` program (console script and `python -m latent_consistency.cli`): `main`, then the default signal
    actions for the interpreter's exit. A stop that comes while Python runs its exit callbacks (a second Ctrl-C or
    SIGTERM after the one-line stop) ends the process at once instead of printing "Exception ignored in atexit
    callback" with a traceback; and one that lands while `main` handles the first (printing its one line, after the
    command's own clean-up) is the same one line, not a traceback out of `main`. Not in `main`: a caller that runs
    `main` in its own process keeps its handlers."""
    try:
        try:
            code = main()
        except KeyboardInterrupt as stop:  # a second stop inside `main`'s handler of the first
            code = say_stop("lcm", stop)
        return end_process(code)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Set where the process must end without the interpreter's finalization (`end_at_once`)
_ENDING_AT_ONCE = threading.Event()


def end_at_once() -> None:
    """Make `end_process` end this process at once, as it ends one of a multi-process run: a command whose thread is still
    inside torch (`lcm serve` forced to stop while a batch was made) aborted in the interpreter's finalization."""
    _ENDING_AT_ONCE.set()


def end_process(code: int) -> int:
    """`code`, or for a process of a multi-process run (`accelerate launch`, torchrun: WORLD_SIZE > 1), or one that must
    end at once (`end_at_once`), the end of the process with it at once: output flushed, without the interpreter's finalization and C++'s static destructors. A
    gloo process group torn down there has aborted ("terminate called without an active exception", exit -6, seen in
    CI) and, freed while gloo's worker thread still released its last collective, deadlocked; so a run keeps its group
    (`training.sharding.end_process_group`) and the process ends here, with nothing to tear down. A script of its own
    that trains under a launcher ends the same way: `sys.exit(end_process(code))`. Everything the command writes is
    written and closed before it returns. Its daemonic child processes (DataLoader workers) are ended first, as
    multiprocessing's exit callback ends them: left alone they linger until their watchdog sees the parent gone. A stop
    arriving now (the launcher's SIGTERM to the other processes once one has ended) is ignored: the command's one line
    is printed, and `Terminated` raised in the clean-up printed a traceback under it ("Exception ignored in ...")."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 or _ENDING_AT_ONCE.is_set():
        import multiprocessing

        if threading.current_thread() is threading.main_thread():
            for stop in (signal.SIGTERM, signal.SIGINT):
                signal.signal(stop, signal.SIG_IGN)

        workers = [child for child in multiprocessing.active_children() if child.daemon]
        for child in workers:
            child.terminate()
        for child in workers:
            child.join(timeout=5)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
