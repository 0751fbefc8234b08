"""What a user hands `lcm evaluate sweep` and `lcm world` that was refused only after slow work, or lost a world's files:
a bad second run, step counts beyond a run's T/k, one sample, a guidance scale below 1 for an ω input (each reported
only once the world loaded, or after the first run was scored, and leaving an empty --out behind), a `world check --out`
inside the world, and an empty `world build --out`. Each is one line on stderr and exit code 2, before anything loads,
with nothing made or changed."""

import json
import shutil

import pytest

from latent_consistency.world.artifact import default_world_path
from test_file_inputs import assert_one_line, snapshot
from tiny_models import write_run


@pytest.fixture
def no_world(monkeypatch):
    """The sweep fails the test if it loads the world (or scores a run): its checks must come first."""
    from latent_consistency.world import artifact, over_training

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: pytest.fail("the world loaded before the sweep's inputs were checked"))
    monkeypatch.setattr(over_training, "evaluate_run", lambda *a, **k: pytest.fail("a run was scored before every run was checked"))


def sweep(runs, out, *extra) -> list[str]:
    return ["evaluate", "sweep", "--runs", *map(str, runs), "--out", str(out), "--samples", "2", "--device", "cpu", *extra]


# --- lcm evaluate sweep ---------------------------------------------------------------------------------------------------

def _no_config(run):
    run.mkdir()


def _damaged_config(run):
    write_run(run)
    (run / "config.json").write_text("{cut short")


@pytest.mark.parametrize("bad, message", [
    (_no_config, "is not a training run folder (no config.json)"),
    (_damaged_config, "config.json is not a run's config"),
    (lambda run: write_run(run, checkpoint=False), "holds no checkpoints yet"),
    (lambda run: write_run(run, "finetune"), "is an `lcm finetune` run"),
    (lambda run: write_run(run, method="guidance"), "is a `lcm distill --method guidance` run"),
], ids=["no-config", "damaged-config", "no-checkpoints", "finetune-run", "guided-distill-run"])
def test_sweep_checks_every_run_before_the_world_loads(bad, message, tmp_path, run_error, no_world):
    """Each run was checked only when its turn came: a bad second run was reported after the first had been scored
    (an `lcm finetune` run: an AttributeError traceback)."""
    good, second, out = write_run(tmp_path / "good"), tmp_path / "second", tmp_path / "sweep"
    bad(second)
    code, err = run_error(sweep([good, second], out))
    assert_one_line(code, err, message)
    assert str(second) in err and not out.exists()


def test_sweep_refuses_a_run_of_another_teacher_before_the_world_loads(tmp_path, run_error, no_world):
    """A run distilled from another teacher was scored against the world's teacher, whose ODE its checkpoints never saw."""
    other = tmp_path / "other-teacher"
    (other / "unet").mkdir(parents=True)
    (other / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    good, foreign, out = write_run(tmp_path / "good"), write_run(tmp_path / "foreign", teacher=str(other)), tmp_path / "sweep"
    code, err = run_error(sweep([good, foreign], out))
    assert_one_line(code, err, f"was distilled from {other}, whose network is not the teacher of --world")
    assert not out.exists()


def test_a_run_of_a_copy_of_the_world_or_of_a_moved_teacher_is_the_worlds(tmp_path):
    """Compared by the network's weights, not the folder: an export or copy of the world is its teacher, and a recorded
    teacher that no longer exists is not refused (nothing to compare)."""
    from latent_consistency.world.over_training import check_run

    copy = tmp_path / "copy"
    shutil.copytree(default_world_path() / "unet", copy / "unet")
    for teacher in (copy, tmp_path / "moved-away", default_world_path()):
        run = write_run(tmp_path / f"run-{teacher.name}", teacher=str(teacher))
        assert check_run(run, world=default_world_path()).teacher == str(teacher)


def test_sweep_refuses_step_counts_beyond_a_runs_timesteps(tmp_path, run_error, no_world):
    """The `world` preset's k = 20 leaves T/k = 50 timesteps: 99 steps were refused only once the world and student loaded."""
    run, out = write_run(tmp_path / "run"), tmp_path / "sweep"
    code, err = run_error(sweep([run], out, "--steps", "1,99"))
    assert_one_line(code, err, "--steps 99: the LCM of")
    assert "at most 50" in err and not out.exists()


def test_sweep_refuses_one_sample(tmp_path, run_error, no_world):
    """FID needs 2 images: one sample failed only after the first checkpoint had been sampled."""
    run, out = write_run(tmp_path / "run"), tmp_path / "sweep"
    code, err = run_error(sweep([run], out, "--samples", "1"))
    assert_one_line(code, err, "--samples 1: FID needs at least 2 images")
    assert not out.exists()


def test_sweep_refuses_a_guidance_scale_below_1_for_an_omega_input(tmp_path, run_error, no_world):
    """As `lcm evaluate` does: a full student's ω input (ω = g - 1) is trained on ω >= 0."""
    run, out = write_run(tmp_path / "run"), tmp_path / "sweep"
    code, err = run_error(sweep([run], out, "--guidance-scale", "0.5"))
    assert_one_line(code, err, "--guidance-scale 0.5 is below 1, and the student of")
    assert not out.exists()


def test_sweep_takes_a_guidance_scale_below_1_for_a_lora_student(tmp_path, run_error, monkeypatch):
    """A LoRA student has no ω input, so any scale is the teacher's CFG scale; only the ω input is refused."""
    from latent_consistency.world import artifact, over_training

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: object())
    monkeypatch.setattr(over_training, "evaluate_run", lambda *a, **k: [{"step": 2, "fid_1": 3.0}])
    monkeypatch.setattr(over_training, "write_report", lambda *a, **k: None)
    monkeypatch.setattr(over_training, "write_sweep", lambda curves, out, steps, *a: "table")
    run, out = write_run(tmp_path / "lora", adapter="lora"), tmp_path / "sweep"
    code, err = run_error(sweep([run, write_run(tmp_path / "full")], out, "--guidance-scale", "0.5", "--steps", "1"))
    assert_one_line(code, err, f"the student of {tmp_path / 'full'} has an ω input")
    code, err = run_error(sweep([run], out, "--guidance-scale", "0.5", "--steps", "1"))
    assert code == 0, err
    assert json.loads((out / "sweep.json").read_text()) == {"lora": [{"step": 2, "fid_1": 3.0}]}


def test_the_sweep_says_a_lora_runs_g_sets_only_its_ode_reference(tmp_path, run_error, monkeypatch):
    """sweep.md's g column reads as the g each run was sampled at; a LoRA student has no ω input, so the settings line says
    that its g is the teacher's ODE reference only (its images carry the guidance distilled into them)."""
    from latent_consistency.world import artifact, over_training

    settings = []
    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: object())
    monkeypatch.setattr(over_training, "evaluate_run", lambda *a, **k: [{"step": 2, "fid_1": 3.0}])
    monkeypatch.setattr(over_training, "write_report", lambda *a, **k: None)
    monkeypatch.setattr(over_training, "write_sweep", lambda curves, out, steps, scales, text: settings.append(text) or "table")
    runs = [write_run(tmp_path / "lora", adapter="lora"), write_run(tmp_path / "full")]
    code, err = run_error(sweep(runs, tmp_path / "sweep", "--steps", "1"))
    assert code == 0, err
    assert "lora: LoRA student(s) without an ω input" in settings[0] and "full:" not in settings[0]


def test_a_refused_sweep_leaves_no_out_folder(tmp_path, run_error, monkeypatch):
    """--out (and the folders above it) was made before the runs were checked, and stayed when one was refused."""
    from latent_consistency.world import artifact

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: pytest.fail("the world loaded before the runs were checked"))
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_error(sweep([empty], tmp_path / "sweeps" / "fig3"))
    assert_one_line(code, err, "is not a training run folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --- lcm world ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["quality", ".", "sub"])
def test_world_check_refuses_an_out_inside_the_world(where, tmp_path, run_error, monkeypatch):
    """`--out W/quality` silently replaced the world's own build-time quality report."""
    from latent_consistency.world import artifact

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: pytest.fail("the world loaded before --out was checked"))
    world = shutil.copytree(default_world_path(), tmp_path / "world")
    before = snapshot(world)
    code, err = run_error(["world", "check", "--world", str(world), "--out", str(world / where), "--samples", "2", "--device", "cpu"])
    assert_one_line(code, err, {"quality": "is the quality report folder of", ".": "is the world folder"}.get(where, "inside the world"))
    assert snapshot(world) == before and not (world / "sub").exists()


def test_world_build_refuses_an_empty_out(tmp_path, run_error, monkeypatch):
    """Path('') is the current folder: an empty --out built the world there when it was empty."""
    from latent_consistency.world import build

    monkeypatch.setattr(build, "resolve_device", lambda *a, **k: pytest.fail("the build started into the current folder"))
    monkeypatch.chdir(tmp_path)
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", "", "--device", "cpu", "--no-progress"])
    assert_one_line(code, err, "--out '' names no folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["one sample", "empty out", "out under a file"])
def test_world_check_refuses_what_it_would_fail_on_before_the_world_loads(case, tmp_path, run_error, monkeypatch):
    """`--samples 1` (FID needs two images) and an --out that cannot be made were refused only after the world loaded."""
    from latent_consistency.world import artifact

    monkeypatch.setattr(artifact, "load_world", lambda *a, **k: pytest.fail("the world loaded before the arguments were checked"))
    (tmp_path / "a-file").write_text("mine")
    out = {"one sample": str(tmp_path / "check"), "empty out": "", "out under a file": str(tmp_path / "a-file" / "check")}[case]
    samples = "1" if case == "one sample" else "2"
    code, err = run_error(["world", "check", "--world", str(default_world_path()), "--out", out, "--samples", samples, "--device", "cpu"])
    expected = {"one sample": "--samples 1: FID needs at least 2 images per guidance scale", "empty out": "is empty",
                "out under a file": "is not a folder"}
    assert_one_line(code, err, expected[case])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_sweep_scores_a_run_at_its_lcms_default_g_not_outside_its_range():
    """Without --guidance-scale a full LCM's checkpoints are scored at the g its export records (the validation scale 8
    moved into a run's [1, 4]), not at 8, where its ω input extrapolates; a LoRA student's at its validation scale."""
    from latent_consistency.training.config import DistillConfig
    from latent_consistency.world.over_training import run_guidance_scale

    assert run_guidance_scale(DistillConfig(guidance_scale_min=1.0, guidance_scale_max=4.0, validation_guidance_scale=8.0)) == 4.0
    assert run_guidance_scale(DistillConfig(guidance_scale_min=1.0, guidance_scale_max=4.0, validation_guidance_scale=2.0)) == 2.0
    assert run_guidance_scale(DistillConfig(adapter="lora", guidance_scale_max=4.0, validation_guidance_scale=8.0)) == 8.0


def test_the_sweep_plot_reads_plain_fid_ticks_and_names_runs_of_any_script(tmp_path, monkeypatch):
    """Figure 3's FID axes were labelled 9×10^0 and 4×10^1 (matplotlib's log formatter; the evaluation's plots already
    read 9 and 40), and a run named in another script got its legend in a font that has it (`fonts.for_texts`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latent_consistency import fonts
    from latent_consistency.world import over_training

    seen = {}

    def keep(fig, path, **kwargs):
        fig.canvas.draw()
        seen["ticks"] = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels(which="both")]
        seen["steps"] = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_text()]
        seen["family"] = list(plt.rcParams["font.family"])
        return path

    monkeypatch.setattr(over_training, "savefig_atomic", keep)
    rows = [{"step": s, "fid_1": 10 - s / 100, "fid_2": 30 + s / 10, "fid_4": 6.0} for s in (20, 40)]
    over_training.write_sweep({"кот-k20": rows, "猫-k20": rows}, tmp_path)
    assert any(seen["ticks"]) and not any("^" in t or "times" in t for t in seen["ticks"])
    assert seen["steps"] and all(t.lstrip("−-").isdigit() for t in seen["steps"])  # whole steps: no 22.5
    assert seen["family"] == fonts.families_for(["猫"])


def test_fid_ticks_that_close_read_apart():
    """A student that ignores ω draws Figures 4-5 with FID 1160.895 to 1160.897: eight ticks all read "1160.9" (six
    significant digits), and a flat line looked like a steep climb. The ticks get the digits that tell them apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from latent_consistency.evaluation.table import plain_ticks

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [1160.895, 1160.896, 1160.897])
    ax.set_yscale("log")
    plain_ticks(ax, "y")
    fig.canvas.draw()
    low, high = ax.get_ylim()
    shown = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_text() and low <= t.get_position()[1] <= high]
    plt.close(fig)
    assert len(shown) > 2 and len(set(shown)) == len(shown), shown
