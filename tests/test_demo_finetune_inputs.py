"""User mistakes in `lcm demo` and `lcm finetune` (and its --config FILE, shared with `lcm distill`): a config file whose
objective is not a name or whose number is beyond any float, --world beside --world-preset, and a demo rerun into an
--out whose runs are of another world or the user's own. Each is one line on stderr and exit code 2, before any work."""

import json
import types

import pytest

from latent_consistency.world.artifact import default_world_path
from latent_consistency.world.demo import run_demo


@pytest.fixture
def finetune(tiny_lcm, tmp_path):
    """`lcm finetune --preset tiny --dry-run` of the tiny LCM into tmp_path/run, with extra flags."""
    return lambda *extra: ["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", "world:digits",
                           "--out", str(tmp_path / "run"), "--dry-run", *extra]


def refused(run_error, argv, message):
    """Assert that `argv` exits 2 with one line holding `message`."""
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, (code, err)


@pytest.mark.parametrize("objective", [["lcf"], {"a": 1}])
def test_a_config_file_objective_that_is_not_a_name_is_refused(finetune, run_error, tmp_path, objective):
    (tmp_path / "c.json").write_text(json.dumps({"objective": objective}))
    refused(run_error, finetune("--config", str(tmp_path / "c.json")), f"this config is for {objective!r}, not lcm finetune")


def test_a_config_file_integer_beyond_any_float_is_refused(finetune, run_error, tmp_path):
    (tmp_path / "c.json").write_text('{"lr": 1' + "0" * 400 + "}")
    refused(run_error, finetune("--config", str(tmp_path / "c.json")), "config field lr must be a finite number, got an integer of 401 digits")


@pytest.mark.parametrize("field", ["lr", "steps"])
def test_a_config_file_number_of_thousands_of_digits_is_refused(finetune, run_error, tmp_path, field):
    (tmp_path / "c.json").write_text(f'{{"{field}": 1' + "0" * 5000 + "}")
    refused(run_error, finetune("--config", str(tmp_path / "c.json")), "holds a number of thousands of digits")


@pytest.fixture
def no_demo(monkeypatch):
    """The demo's work (past its up-front checks) stops the test at once."""
    def stop(*args, **kwargs):
        raise AssertionError("the demo started its work")

    monkeypatch.setattr("latent_consistency.world.demo.resolve_device", stop)


def test_demo_refuses_a_world_folder_beside_a_world_preset(run_error, tmp_path, no_demo):
    refused(run_error, ["demo", "--out", str(tmp_path / "d"), "--world", str(tmp_path / "w"), "--world-preset", "tiny"],
            "--world-preset tiny one to build: give one of them")
    assert not (tmp_path / "d").exists()


def demo_run(run, finished=True, **values):
    """A run folder as the demo leaves it: config.json of `values` (and, `finished`, an exported LCM)."""
    run.mkdir(parents=True)
    if finished:
        (run / "lcm").mkdir()
        (run / "lcm" / "model_index.json").write_text("{}")
    (run / "config.json").write_text(json.dumps({"data": "d", "out": str(run)} | values))


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize("rerun", ["another --world", "another --world-preset"])
def test_demo_refuses_to_reuse_the_distillation_of_another_world(run_error, tmp_path, no_demo, finished, rerun):
    """`lcm demo --world-preset tiny` after `lcm demo` into the same --out would evaluate (or continue) the shipped
    world's LCM against the tiny world's teacher and judge."""
    out = tmp_path / "d"
    demo_run(out / "distill", finished, objective="lcd", teacher=str(default_world_path()), steps=3)
    world = ["--world", str(tmp_path / "w")] if rerun == "another --world" else ["--world-preset", "tiny"]
    refused(run_error, ["demo", "--out", str(out), *world], f"holds a run from {default_world_path()}, not from this demo's")
    assert sorted(p.name for p in out.iterdir()) == ["distill"]
    with pytest.raises(AssertionError, match="the demo started its work"):  # with its own world, the rerun goes on
        run_demo(out, None, None, 8, "cpu")


@pytest.mark.parametrize("run", ["distill", "finetune"])
def test_demo_refuses_to_reuse_the_users_own_run(run_error, tiny_lcm, tiny_sd, tmp_path, no_demo, run):
    """An --out whose distill/ or finetune/ holds a run of the user's (another teacher, another model to fine-tune) is
    not the demo's: its LCM would be reported as the demo's."""
    out = tmp_path / "d"
    if run == "distill":
        demo_run(out / "distill", objective="lcd", teacher=str(tiny_sd), steps=3)
    else:
        demo_run(out / "finetune", objective="lcf", model=str(tiny_lcm), steps=3)
    refused(run_error, ["demo", "--out", str(out), "--world", str(tmp_path / "w")], f"{out / run} holds a run from")


def test_demo_refuses_one_eval_sample_before_the_distillation(run_error, tmp_path, no_demo):
    """FID fits a covariance to each set: with 1 reference image the demo failed after its distillation."""
    refused(run_error, ["demo", "--out", str(tmp_path / "d"), "--eval-samples", "1"], "--eval-samples 1: FID needs at least 2 images")
    assert not (tmp_path / "d").exists()


def test_finetune_out_under_a_file_is_refused_before_the_model_loads(tiny_lcm, run_error, tmp_path, monkeypatch):
    monkeypatch.setattr("latent_consistency.training.objectives.FineTuning.load", lambda *a: pytest.fail("loaded the model"))
    (tmp_path / "a-file").write_text("x")
    refused(run_error, ["finetune", "--preset", "tiny", "--model", str(tiny_lcm), "--data", "world:digits", "--out",
                        str(tmp_path / "a-file" / "run")], "a-file is not a folder")


@pytest.mark.parametrize("name", ["report.md", "grid.png"])
def test_demo_refuses_an_out_whose_report_files_are_not_a_demos(run_error, tmp_path, no_demo, name):
    """An `lcm evaluate` folder (report.md, grid.png, results.json) as --out: the demo would overwrite its report at the end."""
    out = tmp_path / "evaluation"
    out.mkdir()
    (out / name).write_text("the user's")
    (out / "results.json").write_text("{}")
    refused(run_error, ["demo", "--out", str(out)], f"already holds {name} but no demo run (distill/) to continue")
    assert (out / name).read_text() == "the user's"


@pytest.mark.parametrize("cpu", [False, True])
def test_training_goes_to_the_cpu_when_asked_where_a_gpu_is(cpu, monkeypatch):
    """`lcm demo --device cpu` on a GPU machine evaluated on the CPU and trained on the GPU: `train(cpu=True)` now keeps
    the run on the CPU (accelerate's cpu=True); without it a GPU is used where there is one."""
    import accelerate

    from latent_consistency.training import loop

    made = []

    class Stop(Exception):
        pass

    def accelerator(**kwargs):
        made.append(kwargs["cpu"])
        raise Stop

    monkeypatch.setattr(loop, "has_gpu", lambda: True)
    monkeypatch.setattr(loop, "check_here", lambda config: config)
    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    with pytest.raises(Stop):
        loop.train(types.SimpleNamespace(mixed_precision="no"), cpu=cpu)
    assert made == [cpu]
