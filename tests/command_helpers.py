"""The `lcm` command line run in the test's process, as several test files call it."""

from __future__ import annotations

import json

from latent_consistency.cli import main


def run(argv, capsys):
    """`lcm` in this process: (exit code, standard output, standard error)."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


def dry_run(capsys, argv) -> dict:
    """The resolved config a `--dry-run` of `argv` prints."""
    assert main([*argv, "--dry-run"]) in (0, None)
    return json.loads(capsys.readouterr().out)


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)
