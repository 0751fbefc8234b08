"""User mistakes in `lcm world export | check | build --parts-from | preview-decoder`: a world with a damaged part, an
empty --world. Each is one line on stderr, exit code 2, and nothing written (or only what a rerun replaces)."""

import shutil

import pytest

from latent_consistency.world.build import build_world

pytestmark = pytest.mark.slow  # builds on a tiny world trained in the module's fixture


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world("tiny", tmp_path_factory.mktemp("world") / "tiny", device="cpu", progress=False)


def _copy(world, tmp_path, damaged: str | None = None):
    copy = tmp_path / "copy"
    shutil.copytree(world, copy)
    if damaged is not None:
        (copy / damaged).write_text("garbage")
    return copy


def assert_refused(code, err, message, *not_written):
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    for path in not_written:
        assert not path.exists(), f"a refused run wrote {path}"


@pytest.mark.parametrize("damaged", ["judge/config.json", "judge/model.safetensors", "judges/digits/model.safetensors"])
def test_world_check_of_a_world_with_a_damaged_judge_is_refused(world, tmp_path, run_error, damaged):
    copy = _copy(world, tmp_path, damaged)
    code, err = run_error(["world", "check", "--world", str(copy), "--out", str(tmp_path / "check"), "--device", "cpu", "--no-progress"])
    assert_refused(code, err, f"cannot load the judge in {copy / damaged.rsplit('/', 1)[0]}", tmp_path / "check")


def test_world_export_of_a_world_with_damaged_weights_is_refused_and_a_rerun_finishes_it(world, tmp_path, run_error):
    copy = _copy(world, tmp_path, "unet/diffusion_pytorch_model.safetensors")
    out = tmp_path / "fp16"
    code, err = run_error(["world", "export", "--from", str(copy), "--out", str(out)])
    assert_refused(code, err, "unet/diffusion_pytorch_model.safetensors, copied from another world, is damaged", out)
    shutil.copy2(world / "unet" / "diffusion_pytorch_model.safetensors", copy / "unet")  # repaired: the rerun replaces fp16.partial
    assert run_error(["world", "export", "--from", str(copy), "--out", str(out)])[0] == 0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not (tmp_path / "fp16.partial").exists()


def test_world_build_parts_from_a_world_with_damaged_weights_is_refused(world, tmp_path, run_error):
    copy = _copy(world, tmp_path, "vae/diffusion_pytorch_model.safetensors")
    code, err = run_error(["world", "build", "--preset", "tiny", "--v-prediction", "--parts-from", str(copy), "--out",
                           str(tmp_path / "new"), "--device", "cpu", "--no-progress"])
    assert_refused(code, err, "vae/diffusion_pytorch_model.safetensors, copied from another world, is damaged")


@pytest.mark.parametrize("command", ["check", "preview-decoder"])
def test_an_empty_world_name_is_refused_not_the_current_or_shipped_world(tmp_path, run_error, monkeypatch, command):
    """`--world ""` was the shipped world for preview-decoder (which then distilled it) and the current folder for check
    (which then called --out "inside the world folder")."""
    monkeypatch.chdir(tmp_path)
    argv = ["world", command, "--world", "", "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    code, err = run_error(argv + (["--steps", "1", "--images", "4"] if command == "preview-decoder" else []))
    assert_refused(code, err, "--world '' names no folder", tmp_path / "out", tmp_path / "out.partial")
