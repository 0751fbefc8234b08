"""What a `kill -9` leaves at the edges of a training run's writes, taken up by the next run (found by randomised kills):
a half-written config.json or sources.json, and a checkpoint too many when the kill fell between the last save and its
pruning."""

import json
import shutil

import pytest

from latent_consistency.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


def distill(tiny_sd, images, out, *extra):
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--batch-size", "4", "--out", str(out),
            "--steps", "2", *extra]


@pytest.fixture(scope="module")
def finished(tiny_sd, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(distill(tiny_sd, images, out, "--checkpoint-every", "1")) == 0
    return out


@pytest.mark.parametrize("resume", [True, False])
def test_a_folder_holding_only_a_half_written_config_is_started(resume, tiny_sd, images, finished, tmp_path, capsys):
    # was: "nothing to resume in OUT: it holds no run's config.json, but other files" / "run folder OUT is not empty" (exit 2)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json.tmp").write_bytes((finished / "config.json").read_bytes()[:300])
    assert main(distill(tiny_sd, images, out, *(["--resume"] if resume else []))) == 0
    assert (out / "lcm").is_dir() and not (out / "config.json.tmp").exists() and json.loads((out / "config.json").read_text())["steps"] == 2


def test_a_run_killed_as_it_wrote_its_sources_is_started_over_without_resume(tiny_sd, images, finished, tmp_path, capsys):
    # was: "run folder OUT is not empty; pass --resume", where the guide says such a folder is cleared and started again
    out = tmp_path / "run"
    out.mkdir()
    config = json.loads((finished / "config.json").read_text()) | {"out": str(out)}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "sources.json.tmp").write_text('{"teacher": "')
    assert main(distill(tiny_sd, images, out, "--lr", "2e-4")) == 0  # other settings too: the folder is cleared first
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["lr"] == 2e-4 and not (out / "sources.json.tmp").exists()


def test_a_resume_prunes_a_checkpoint_left_over_by_a_kill_before_the_last_pruning(tiny_sd, images, finished, tmp_path):
    # was: kept keep + 1 checkpoints for good: pruning ran only after a save, and a resume at the last step saves none
    run = shutil.copytree(finished, tmp_path / "run", symlinks=True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"out": str(run)}, indent=1))
    checkpoints = run / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir())
    shutil.copytree(checkpoints / kept[0], checkpoints / "step-0000000")  # an older one, as the kill left it
    assert main(distill(tiny_sd, images, run, "--checkpoint-every", "1", "--resume")) == 0
    assert sorted(p.name for p in checkpoints.iterdir()) == kept


def test_lcm_cache_run_again_on_its_whole_cache_does_not_say_to_remove_it(tiny_sd, images, tmp_path, run_error):
    # was: "latent cache folder OUT already exists; remove it or pick another folder" of a cache that took hours to write
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text('{"format": "latent-cache/2"}')
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(images), "--out", str(cache)])
    assert code == 2 and len(err.splitlines()) == 1, err
    # its manifest records no job to compare this call's with (`test_cache_rerun`: the same job's rerun exits 0)
    assert "already exists and its manifest.json records no job that wrote it" in err and "remove" not in err
    assert [p.name for p in cache.iterdir()] == ["manifest.json"]
