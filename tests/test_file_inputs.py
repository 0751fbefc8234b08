"""Files and folders a user hands the command line that must be read as meant, and never lost: `lcm world export`'s
--out inside the world it copies and an OUT.partial folder that is not an unfinished export of ours, comment lines in a
prompt file (`lcm generate --prompt-file`, `lcm evaluate --prompts FILE.txt`), and an `lcm evaluate sweep --out` that
holds an earlier sweep's results. Each mistake is one line on stderr and exit code 2 with nothing overwritten."""

import json
import shutil
from pathlib import Path

import pytest

from latent_consistency.world.artifact import default_world_path


def assert_one_line(code, err, message):
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def snapshot(folder):
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_world(tmp_path):
    """The shipped world (7 MB) as a build that `lcm world build` finished: what `lcm world export` copies."""
    from latent_consistency.world.build import PHASES, STATE_FILE

    world = shutil.copytree(default_world_path(), tmp_path / "world")
    (world / STATE_FILE).write_text(json.dumps({"done": list(PHASES), "seconds": {}, "device": "cpu"}))
    return world


# --- lcm world export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["the world folder", "inside the world folder"])
def test_world_export_into_its_own_world_is_refused(where, finished_world, run_error):
    out = finished_world if where == "the world folder" else finished_world / "fp16"
    before = snapshot(finished_world)
    code, err = run_error(["world", "export", "--from", str(finished_world), "--out", str(out)])
    assert_one_line(code, err, f"is {where} --from")
    assert snapshot(finished_world) == before and not out.with_name(out.name + ".partial").exists()


def test_world_export_keeps_a_user_folder_named_out_partial_and_replaces_only_its_own(finished_world, tmp_path, run_error, monkeypatch):
    from latent_consistency.world import build

    out = tmp_path / "fp16"
    mine = tmp_path / "fp16.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, err = run_error(["world", "export", "--from", str(finished_world), "--out", str(out)])
    assert_one_line(code, err, "is not an unfinished output of `lcm world export")
    assert snapshot(mine) == {"notes.txt": b"my notes"} and not out.exists()
    (tmp_path / "file.partial").write_text("a file")  # a file of that name is not replaced either
    code, err = run_error(["world", "export", "--from", str(finished_world), "--out", str(tmp_path / "file")])
    assert_one_line(code, err, "is not an unfinished output of `lcm world export")
    assert (tmp_path / "file.partial").read_text() == "a file"

    # An export killed half-way leaves an OUT.partial of its own, which the rerun replaces
    shutil.move(mine, tmp_path / "kept")
    with monkeypatch.context() as patch:
        patch.setattr(build, "_cast_weights", lambda folder, dtype: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            build.export_world(finished_world, out)
    assert mine.is_dir() and not out.exists()
    code, err = run_error(["world", "export", "--from", str(finished_world), "--out", str(out)])
    assert code == 0, err
    assert not mine.exists() and json.loads((out / "world.json").read_text())["weights_dtype"] == "float16"
    assert not (out / build.EXPORT_MARKER).exists()


def test_world_export_from_a_world_named_like_out_partial_keeps_it(finished_world, tmp_path, run_error):
    """--from W.partial --out W: the folder export writes first is the world itself, which must not be removed."""
    src = finished_world.rename(tmp_path / "w.partial")
    before = snapshot(src)
    code, err = run_error(["world", "export", "--from", str(src), "--out", str(tmp_path / "w")])
    assert_one_line(code, err, "is not an unfinished output of `lcm world export")
    assert snapshot(src) == before and not (tmp_path / "w").exists()


def test_a_latent_cache_keeps_a_user_folder_named_out_partial_and_replaces_only_its_own(tiny_sd, tmp_path, monkeypatch):
    from latent_consistency.data import latent_cache
    from latent_consistency.data.imagefolder import ImageFolderDataset
    from latent_consistency.errors import UserError
    from latent_consistency.models import load_diffusion_model
    from tiny_models import write_captioned_images

    model = load_diffusion_model(str(tiny_sd))
    images = ImageFolderDataset(write_captioned_images(tmp_path / "images", 2), 16)
    out, mine = tmp_path / "cache", tmp_path / "cache.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(UserError, match="is not an unfinished output of a latent cache"):
        latent_cache.write_latent_cache(images, out, model.codec, model.prompts, source={}, progress=False)
    assert snapshot(mine) == {"notes.txt": b"my notes"} and not out.exists()

    shutil.move(mine, tmp_path / "kept")  # a cache killed half-way leaves a .partial of its own, which the rerun replaces
    with monkeypatch.context() as patch:
        patch.setattr(latent_cache, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            latent_cache.write_latent_cache(images, out, model.codec, model.prompts, source={}, progress=False)
    assert mine.is_dir()
    latent_cache.write_latent_cache(images, out, model.codec, model.prompts, source={}, progress=False)
    assert not mine.exists() and not (out / latent_cache.PARTIAL_MARK).exists() and len(latent_cache.LatentCache(out)) == 2


def test_preview_decoder_keeps_a_user_folder_named_out_partial(finished_world, tmp_path, run_error):
    mine = tmp_path / "tiny.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    code, err = run_error(["world", "preview-decoder", "--world", str(finished_world), "--out", str(tmp_path / "tiny")])
    assert_one_line(code, err, "is not an unfinished output of `lcm world preview-decoder`")
    assert snapshot(mine) == {"notes.txt": b"my notes"} and not (tmp_path / "tiny").exists()


# --- prompt files --------------------------------------------------------------------------------------------------------

PROMPTS = "# prompts for the figure\n\na red star\n   # a blue ring, left out for now\n\ta blue ring  \n#\n"


def generate(tiny_lcm, out, *extra) -> list[str]:
    return ["generate", *extra, "--model", str(tiny_lcm), "--steps", "1", "--out", str(out), "--device", "cpu"]


def test_generate_skips_comment_lines_of_a_prompt_file(tiny_lcm, tmp_path, run_error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", "--prompt-file", str(prompts)))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000-a-red-star.png", "0001-a-blue-ring.png"]


def test_generate_refuses_a_prompt_file_of_comments_only(tiny_lcm, tmp_path, run_error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one\n\n  # two\n")
    code, err = run_error(generate(tiny_lcm, tmp_path / "out", "--prompt-file", str(prompts)))
    assert_one_line(code, err, "holds no prompts")
    assert not (tmp_path / "out").exists()


def test_generate_prompt_file_help_says_comment_lines_are_skipped(capsys):
    from latent_consistency.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "lines starting with # are skipped" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """An LCM, real images and a CLIP model for `lcm evaluate`."""
    from tiny_models import save_tiny_clip, save_tiny_lcm, write_captioned_images

    folder = tmp_path_factory.mktemp("evaluation")
    return dict(lcm=save_tiny_lcm(folder / "lcm"), clip=save_tiny_clip(folder / "clip"), images=write_captioned_images(folder / "images", 4))


def evaluate(evaluation, prompts, out) -> list[str]:
    return ["evaluate", "--lcm", str(evaluation["lcm"]), "--prompts", str(prompts), "--reference", str(evaluation["images"]),
            "--clip", str(evaluation["clip"]), "--steps", "1", "--out", str(out), "--device", "cpu"]


def test_evaluate_skips_comment_lines_of_a_prompts_file(evaluation, tmp_path, run_error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    code, err = run_error(evaluate(evaluation, prompts, tmp_path / "out"))
    assert code == 0, err
    assert "2 prompts of" in (tmp_path / "out" / "report.md").read_text()


def test_evaluate_refuses_a_prompts_file_of_comments_only(evaluation, tmp_path, run_error):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a red star\n# a blue ring\n")
    code, err = run_error(evaluate(evaluation, prompts, tmp_path / "out"))
    assert_one_line(code, err, "holds no prompts")
    assert not (tmp_path / "out").exists()


# --- lcm evaluate sweep --------------------------------------------------------------------------------------------------

def sweep(tmp_path, out) -> list[str]:
    from tiny_models import write_run

    run = tmp_path / "run"
    if not run.exists():
        write_run(run)  # a run the sweep's checks pass (scoring it is monkeypatched)
    return ["evaluate", "sweep", "--runs", str(run), "--out", str(out), "--samples", "2", "--device", "cpu"]


@pytest.mark.parametrize("name, text", [("sweep.json", "an earlier sweep"), ("sweep.json", '["not", "ours"]'),
                                        ("sweep.md", "a user's notes"), ("sweep.png", "a user's plot")])
def test_sweep_refuses_an_out_whose_sweep_files_are_not_a_sweeps(name, text, tmp_path, run_error, monkeypatch):
    from latent_consistency.world import artifact

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: pytest.fail("the world loaded before --out was checked"))
    out = tmp_path / "sweep"
    out.mkdir()
    (out / name).write_text(text)
    code, err = run_error(sweep(tmp_path, out))
    assert_one_line(code, err, f"holds a {name} that is not an earlier sweep's")
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_text() == text


def test_sweep_writes_sweep_json_atomically(tmp_path, run_error, monkeypatch):
    from latent_consistency import outputs
    from latent_consistency.world import artifact, over_training

    rows = [{"step": 2, "fid_1": 3.0, "alignment_1": 0.5}]
    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: object())
    monkeypatch.setattr(over_training, "evaluate_run", lambda *a, **k: rows)
    monkeypatch.setattr(over_training, "write_report", lambda *a, **k: None)
    monkeypatch.setattr(over_training, "write_sweep", lambda curves, out, steps, *a: "table")
    written, write_json_atomic = [], outputs.write_json_atomic

    def recorded(path, data, indent=1):
        written.append(path.name)
        write_json_atomic(path, data, indent)

    monkeypatch.setattr(outputs, "write_json_atomic", recorded)
    out = tmp_path / "sweep"
    code, err = run_error(sweep(tmp_path, out) + ["--steps", "1"])
    assert code == 0, err
    assert written == ["sweep.json"] and json.loads((out / "sweep.json").read_text()) == {"run": rows}
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_sweep_again_replaces_an_earlier_sweeps_results(tmp_path, run_error, monkeypatch):
    """Sweeping again into the same --out as checkpoints appear is how a sweep resumes (docs/paper.md, Figure 3)."""
    from latent_consistency.world import artifact, over_training

    rows = [{"step": 2, "fid_1": 3.0}]
    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: object())
    monkeypatch.setattr(over_training, "evaluate_run", lambda *a, **k: rows)
    monkeypatch.setattr(over_training, "write_report", lambda *a, **k: None)
    monkeypatch.setattr(over_training, "write_sweep", lambda curves, out, steps, *a: "table")
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"run": [{"step": 1, "fid_1": 9.0}]}))
    (out / "sweep.png").write_bytes(b"an earlier plot")
    code, err = run_error(sweep(tmp_path, out) + ["--steps", "1"])
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text()) == {"run": rows}


@pytest.mark.parametrize("writer", ["sweep", "over_training"])
def test_plots_and_tables_replace_the_earlier_files_whole(writer, tmp_path, monkeypatch):
    """A sweep or over-training report killed while writing left a half-written plot or table where the earlier run's
    was; now each file is written beside and moved into place, so the earlier one stays until the new one is whole."""
    from matplotlib.figure import Figure

    from latent_consistency.world import over_training

    rows = [{"step": s, "fid_1": 9.0 / s, "alignment_1": 0.5} for s in (1, 2)]
    names = ["sweep.png", "sweep.md"] if writer == "sweep" else ["over_training.png", "over_training.md", "over_training.json"]

    def write():
        if writer == "sweep":
            return over_training.write_sweep({"run": rows}, tmp_path, steps=(1,))
        return over_training.write_report(tmp_path, rows, steps=(1,))

    for name in names:
        (tmp_path / name).write_text("earlier")
    savefig = Figure.savefig

    def killed(fig, path, **kwargs):
        Path(path).write_bytes(b"half a plot")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert (tmp_path / names[0]).read_text() == "earlier" and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(Figure, "savefig", savefig)
    write()
    assert (tmp_path / names[0]).read_bytes().startswith(b"\x89PNG") and "earlier" not in (tmp_path / names[1]).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
