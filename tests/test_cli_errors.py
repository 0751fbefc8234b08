"""Every command's user mistakes: paths of the wrong kind, non-finite or out-of-range numbers, a model of the wrong
kind for the mode. Each is one line on stderr and exit code 2, with nothing written."""

import json

import pytest
import torch

from latent_consistency.cli import main


def run(argv, capsys) -> tuple[int, str]:
    """Exit code and stderr of `lcm ARGV`; argparse's own errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "typed.json").write_text(json.dumps({"lr": "fast"}))
    (tmp_path / "nan.json").write_text('{"lr": NaN}')
    return dict(file=str(a_file), folder=str(folder), list=str(tmp_path / "list.json"), typed=str(tmp_path / "typed.json"),
                nan=str(tmp_path / "nan.json"), out=str(tmp_path / "out"))


GENERATE = {
    "nan guidance": (["--guidance-scale", "nan"], "not a finite number"),
    "infinite guidance": (["--guidance-scale", "inf"], "not a finite number"),
    "guidance not a number": (["--guidance-scale", "high"], "is not a number"),
    "negative seed": (["--seed", "-1"], "must be 0 or more"),
    "zero batch": (["--batch-size", "0"], "must be at least 1"),
    "steps not an int": (["--steps", "two"], "invalid int value"),
    "timesteps not ints": (["--timesteps", "999,middle"], "comma-separated integers"),
    "huge image": (["--height", "100000"], "more than 8x the model's"),
    "unknown device": (["--device", "tpu"], "device"),
    "bad dtype": (["--dtype", "float8"], "invalid choice"),
}


@pytest.mark.parametrize("case", sorted(GENERATE))
def test_generate_rejects(case, tiny_lcm, paths, capsys):
    extra, message = GENERATE[case]
    code, err = run(["generate", "a red star", "--model", str(tiny_lcm), "--out", paths["out"], *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (paths["out"] and __import__("os").path.exists(paths["out"]) and any(__import__("os").scandir(paths["out"])))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_generate_on_a_missing_gpu(tiny_lcm, paths, capsys):
    code, err = run(["generate", "a", "--model", str(tiny_lcm), "--out", paths["out"], "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA GPU is available" in err and len(err.splitlines()) == 1


def distill_cases(tiny_sd, tiny_lcm, paths):
    return {
        "out is a file": (["--out", paths["file"]], "is a file"),
        "nan lr": (["--lr", "nan"], "lr must be a finite number"),
        "infinite guidance range": (["--guidance-scale-max", "inf"], "--guidance-scale-max must be a finite number"),
        "zero steps": (["--steps", "0"], "steps must be at least 1"),
        "ema decay 1.5": (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
        "negative seed": (["--seed", "-3"], "seed must be 0 or more"),
        "negative warm-up": (["--lr-warmup-steps", "-1"], "--lr-warmup-steps must be 0 or more"),
        "config is a folder": (["--config", paths["folder"]], "is not a file"),
        "config is a list": (["--config", paths["list"]], "must hold a JSON object"),
        "config field of the wrong type": (["--config", paths["typed"]], "config field lr must be float"),
        "nan in a config file": (["--config", paths["nan"]], "lr must be a finite number"),
        "teacher is an LCM": (["--teacher", str(tiny_lcm)], "is already an LCM"),
        "teacher is a file": (["--teacher", paths["file"]], "not a diffusers pipeline folder"),
        "data is a file": (["--data", paths["file"]], "cannot read data spec"),
        "unknown world dataset": (["--data", "world:faces"], "unknown dataset 'faces'"),
    }


@pytest.mark.parametrize("case", ["out is a file", "nan lr", "infinite guidance range", "zero steps", "ema decay 1.5", "negative seed",
                                  "negative warm-up", "config is a folder", "config is a list", "config field of the wrong type",
                                  "nan in a config file", "teacher is an LCM", "teacher is a file", "data is a file",
                                  "unknown world dataset"])
def test_distill_rejects(case, tiny_sd, tiny_lcm, paths, capsys):
    extra, message = distill_cases(tiny_sd, tiny_lcm, paths)[case]
    args = {"--teacher": str(tiny_sd), "--data": "world:shapes", "--out": paths["out"]}
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    code, err = run(["distill", "--preset", "tiny", *[x for kv in args.items() for x in kv]], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("argv", [["distill", "--preset", "tiny", "--ema", "0.9"], ["generate", "a", "--model", "m", "--out", "x", "--guid", "2"],
                                  ["finetune", "--preset", "tiny", "--mod", "x"]])
def test_options_are_not_matched_by_prefix(argv, capsys):
    """--ema is not --ema-decay: a prefix is an unknown option, never silently another one."""
    code, err = run(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "unrecognized arguments" in err, err


def test_world_commands_reject_paths_of_the_wrong_kind(paths, capsys):
    from latent_consistency.world.artifact import default_world_path

    cases = [
        (["world", "build", "--preset", "tiny", "--out", paths["file"]], "is a file"),
        (["world", "export", "--from", paths["folder"], "--out", paths["out"]], "is not a finished world"),
        (["world", "check", "--world", paths["folder"], "--out", paths["out"]], "is not a world folder"),
        (["world", "check", "--world", str(default_world_path()), "--out", paths["file"], "--device", "cpu"], "is a file"),
        (["evaluate", "sweep", "--runs", paths["file"], "--device", "cpu", "--out", paths["out"]], "not a training run folder"),
        (["evaluate", "sweep", "--runs", paths["folder"], "--samples", "0", "--out", paths["out"]], "must be at least 1"),
        (["world", "build", "--preset", "tiny", "--out", paths["out"], "--resolution", "48"], "not 48"),
        (["demo", "--out", paths["file"], "--device", "cpu"], "is a file"),
        (["demo", "--out", paths["out"], "--world", paths["folder"], "--device", "cpu"], "is not a world folder"),
        (["demo", "--out", paths["out"], "--eval-samples", "-5"], "must be at least 1"),
    ]
    for argv, message in cases:
        code, err = run(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (argv, err)
        command = " ".join(argv[:2]) if argv[0] in ("world", "evaluate") else argv[0]  # the subcommand's name, as argparse's errors
        assert err.startswith(f"lcm {command}: error: "), (argv, err)


def test_the_parser_imports_no_model_or_metric_library():
    """A mistake in the arguments is reported before diffusers, transformers or torchmetrics load (seconds of imports):
    building the parser and parsing imports none of them."""
    import subprocess
    import sys

    code = ("import sys; from latent_consistency.cli import build_parser; build_parser().parse_args(['generate', 'x', '--model', 'm', '--out', 'o']); "
            "print(sorted(m for m in ('diffusers', 'transformers', 'torchmetrics') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_hub_id_offline_is_one_line_with_no_library_warning(tmp_path):
    """Offline, a hub id fails in one line on stderr: huggingface_hub's deprecation warning about an argument diffusers
    passes is not printed above it (checked in a child process: pytest would capture the warning in this one)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "latent_consistency.cli", "generate", "a red star", "--model", "someone/lcm",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()
