"""`lcm demo` stopped and rerun, or run twice at once, from a review that killed it in every phase: a second demo into the
same --out is refused while the first writes it; its latent cache resumes from its last whole shard; the report's wall time
is the phases' sum over the runs that made the folder; a stop outside training says how to go on; an --out that names no
new folder is refused; a demo folder copied with `cp -a` is reused; and the report's note on the teacher's 1-step row names
no flag the demo lacks. The one real demo run here is on the shipped world at a few images and steps."""

import functools
import json
import shutil

import pytest

from latent_consistency.data import latent_cache
from latent_consistency.errors import UserError
from latent_consistency.folder_lock import hold
from latent_consistency.world import demo
from latent_consistency.world.artifact import default_world_path, load_world
from test_cache_resume import snapshot, stop_at_save


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


@pytest.fixture
def no_demo(monkeypatch):
    """The demo's work (past its up-front checks) stops the test at once."""
    def stop(*args, **kwargs):
        raise AssertionError("the demo started its work")

    monkeypatch.setattr(demo, "resolve_device", stop)


def test_a_second_demo_into_an_out_in_use_is_refused(run_error, tmp_path, no_demo):
    """Was: no lock, so a second demo cleared the first's unfinished latent cache and trained the same runs beside it."""
    out = tmp_path / "demo"
    with hold(out):  # as the first demo holds it
        refused(run_error, ["demo", "--out", str(out), "--device", "cpu"], f"--out {out} is in use by another lcm command")
    with pytest.raises(AssertionError, match="the demo started its work"):  # the lock is free again
        demo.run_demo(out, None, None, 8, "cpu")


@pytest.mark.parametrize("out", ["/", "..", "a/../.."])
def test_an_out_that_names_no_new_folder_is_refused(run_error, tmp_path, monkeypatch, no_demo, out):
    """Was: `--out /` wrote /latents, /distill, ... into the root of the file system."""
    monkeypatch.chdir(tmp_path)
    refused(run_error, ["demo", "--out", out, "--device", "cpu"], f"--out {out!r} names no new folder")


def test_the_current_folder_is_an_out(tmp_path, monkeypatch, no_demo):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="the demo started its work"):
        demo.run_demo(demo.Path("."), None, None, 8, "cpu")


def demo_runs(out, world):
    """A demo folder's finished runs, as the demo leaves them: distill/ of `world`'s teacher, and finetune/ of its LCM with the
    identity of that LCM recorded in sources.json (`training.sources`)."""
    from latent_consistency.training.sources import model_digest

    for run, values in ((out / "distill", {"objective": "lcd", "teacher": str(world)}),
                        (out / "finetune", {"objective": "lcf", "model": str(out / "distill" / "lcm")})):
        (run / "lcm").mkdir(parents=True)
        (run / "lcm" / "model_index.json").write_text("{}")
        (run / "lcm" / "unet.safetensors").write_bytes(b"weights of " + run.name.encode())
        (run / "config.json").write_text(json.dumps({"data": "d", "out": str(run), "steps": 3} | values))
    (out / "finetune" / "sources.json").write_text(json.dumps({"model": model_digest(str(out / "distill" / "lcm"))}))


def test_a_copied_demo_folder_is_reused_where_its_lcm_is_the_original_one(run_error, tmp_path, no_demo):
    """Was: a `cp -a` of a finished demo was refused ("holds a run from ref/distill/lcm, not from this demo's"), and its
    only way on a whole new demo. Its fine-tuning was made from an LCM of the same weights as the copy's: reused. A copy
    whose LCM differs is refused as the copy it is."""
    ref, copy = tmp_path / "ref", tmp_path / "copy"
    demo_runs(ref, default_world_path())
    shutil.copytree(ref, copy, symlinks=True)
    with pytest.raises(AssertionError, match="the demo started its work"):
        demo.run_demo(copy, None, None, 8, "cpu")
    (copy / "distill" / "lcm" / "unet.safetensors").write_bytes(b"other weights")
    refused(run_error, ["demo", "--out", str(copy)],
            f"{copy} is a copy of the demo folder {ref}, and {copy / 'finetune'} holds a run from {ref / 'distill' / 'lcm'}")


def test_the_teacher_note_names_a_steps_flag_only_where_the_caller_has_one(tiny_sd):
    """The demo's report told its reader to "give --steps 2 or more", a flag `lcm demo` has not."""
    from latent_consistency.evaluation.table import teacher_start_notes
    from latent_consistency.models import load_diffusion_model

    model = load_diffusion_model(str(tiny_sd))
    assert any("give --steps 2 or more" in note for note in teacher_start_notes(model, [1, 2]))
    plain = teacher_start_notes(model, [1, 2], steps_flag=None)
    assert plain and not any("give" in note for note in plain) and plain[0].endswith("as in diffusers' pipelines")


@pytest.fixture(scope="module")
def world():
    return load_world(default_world_path(), "cpu")


def small_caches(monkeypatch, images: int, notes: list[str]):
    """The demo's caches of `images` training images, written in batches of 4 and shards of 8, their notes in `notes`."""
    monkeypatch.setattr(demo, "DISTILL_IMAGES", images)
    monkeypatch.setattr(demo, "write_latent_cache", functools.partial(latent_cache.write_latent_cache, batch_size=4, shard_size=8,
                                                                     progress=False, say=notes.append))


def test_a_demo_cache_stopped_after_its_first_shard_resumes(world, tmp_path, monkeypatch, encoded):
    """Was: "started again: only the reading of an image folder, of webdataset shards or of a registered dataset resumes",
    and all 20,000 images encoded again. Now the rerun goes on at its second shard and writes the uninterrupted cache, byte
    for byte; a cache of another number of images (another DISTILL_IMAGES) is started again, not finished."""
    notes = []
    small_caches(monkeypatch, 20, notes)
    demo.ensure_latent_cache(world, tmp_path / "whole", "cpu")
    with monkeypatch.context() as patch:
        stop_at_save(patch, 2, written=False)
        with pytest.raises(KeyboardInterrupt):
            demo.ensure_latent_cache(world, tmp_path / "latents", "cpu")
    partial = tmp_path / "latents.partial"
    encoded[0], notes[:] = 0, []
    demo.ensure_latent_cache(world, tmp_path / "latents", "cpu")
    assert notes == [f"resuming {partial} at sample 8 of 20 (1 shards written)"] and encoded[0] == 12
    assert snapshot(tmp_path / "latents") == snapshot(tmp_path / "whole")

    with monkeypatch.context() as patch:  # a partial of 20 images is no start for 24
        stop_at_save(patch, 2, written=False)
        with pytest.raises(KeyboardInterrupt):
            demo.ensure_latent_cache(world, tmp_path / "other", "cpu")
    small_caches(monkeypatch, 24, notes)
    encoded[0], notes[:] = 0, []
    demo.ensure_latent_cache(world, tmp_path / "other", "cpu")
    assert len(notes) == 1 and "is started again: it was written with another source" in notes[0] and encoded[0] == 24


@pytest.mark.slow
def test_a_demo_stopped_in_its_table_says_how_to_go_on_and_its_rerun_reports_the_whole_time(run_error, tmp_path, monkeypatch):
    """One small real demo (64 images per split, 2 steps each), stopped by Ctrl-C in its table, then rerun.
    - Under the demo's lock, each run folder's own lock is held too (`lcm distill --resume` of it is refused), and neither
      blocks the demo's own writers.
    - The stop outside training said only "interrupted"; now it says to run the same command again.
    - The rerun's report timed only itself ("Wall time: 0.3 min" after a 6.4-minute demo); now it states the sum of the
      phases' times over both runs, and what this run reused.
    - Its note on the teacher's 1-step DDIM row names no --steps, which `lcm demo` has not, and ends its sentence."""
    out = tmp_path / "demo"
    get_dataset = demo.get_dataset
    monkeypatch.setattr(demo, "get_dataset", lambda name, split, resolution, seed=0, size=None: get_dataset(
        name, split, resolution, seed=seed, size=min(size or 64, 64)))
    small_caches(monkeypatch, 64, [])
    held, train = [], demo.train

    def train_under_locks(config, **kwargs):
        for folder in (out, config.out):
            with pytest.raises(UserError, match="is in use by another lcm command"), hold(folder):
                pass
            held.append(folder)
        return train(config, **kwargs)

    monkeypatch.setattr(demo, "train", train_under_locks)
    run_table = demo.run_table
    monkeypatch.setattr(demo, "run_table", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["demo", "--out", str(out), "--distill-steps", "2", "--finetune-steps", "2", "--eval-samples", "8", "--device", "cpu"]
    code, err = run_error(argv)
    assert code == 130 and err.splitlines()[-1] == f"lcm demo: interrupted {demo.UNFINISHED}; {demo.RERUN}", err
    assert held == [out, str(out / "distill")]
    first = json.loads((out / demo.TIMES).read_text())
    assert set(first) == {"the world", "the latent cache", "the distillation", "the table"}

    monkeypatch.setattr(demo, "run_table", run_table)
    assert run_error(argv)[0] == 0
    times, report = json.loads((out / demo.TIMES).read_text()), json.loads((out / "report.json").read_text())
    assert times["the distillation"] == first["the distillation"] and times["the table"] > first["the table"]
    assert report["minutes"] == pytest.approx(sum(times.values())) and report["reused"] == ["the latent cache", "the distillation"]
    text = (out / "report.md").read_text()
    assert (f"Wall time: {report['minutes']:.1f} min, each phase's time over the runs that made this folder (this run: "
            f"{report['minutes_this_run']:.1f} min; reused: the latent cache, the distillation).") in text
    assert "give --steps" not in text and "The teacher's rows: 1 ddim step(s)" in text and "as in diffusers' pipelines." in text
