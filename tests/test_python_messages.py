"""Messages a Python call raises name the call's arguments (`dtype=`, `lora=`, `custom=`), not the `lcm` commands' flags,
which keep their own wording (`devices.given`)."""

import pytest
import torch

from command_helpers import refused
from latent_consistency.errors import UserError
from tiny_models import save_tiny_lora


@pytest.fixture(scope="module")
def lora(tiny_lcm, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("lora") / "lora", tiny_lcm, seed=3)


@pytest.mark.parametrize("cls", ["LCMGenerator", "SolverGenerator"])
def test_a_load_refuses_torch_float16_on_the_cpu_as_it_refuses_the_name(cls, tmp_path):
    # was: loaded, and sampled many times slower than float32 (`devices.resolve_dtype` refused only the name "float16")
    from latent_consistency import pipelines

    load = getattr(pipelines, cls).load
    with pytest.raises(UserError, match=r"^float16 on the CPU is refused: .*; use dtype='float32', or bfloat16") as refused_:
        load(str(tmp_path / "model"), device="cpu", dtype=torch.float16)
    assert "--" not in str(refused_.value) and "\n" not in str(refused_.value)


@pytest.mark.parametrize("cls", ["LCMGenerator", "SolverGenerator"])
def test_a_generator_made_of_a_float16_model_on_the_cpu_is_refused_as_a_load_is(cls, tiny_lcm):
    # was: made, and sampled many times slower than float32
    from latent_consistency import pipelines
    from latent_consistency.models import load_lcm

    model = load_lcm(str(tiny_lcm), torch.float16)
    with pytest.raises(UserError, match=r"^float16 on the CPU is refused: .*; use dtype='float32'"):
        getattr(pipelines, cls)(model, "cpu", torch.float16)


def test_a_solver_generator_names_custom_timesteps_as_its_argument(tiny_sd):
    from latent_consistency.pipelines import SolverGenerator

    generator = SolverGenerator.load(tiny_sd)
    # was: "--timesteps applies to LCMs; an ODE solver takes --steps", the command's flags
    with pytest.raises(UserError, match=r"^custom timesteps apply to LCMs; an ODE solver takes a step count: timesteps\(steps\), "
                                        r"without custom=$"):
        generator.timesteps(4, [999, 499])
    assert generator.timesteps(4) == 4


def test_lcm_generate_keeps_its_flags_for_custom_timesteps_with_an_ode_solver(tiny_sd, tmp_path, run_error):
    out = tmp_path / "images"
    refused(run_error, ["generate", "a red star", "--model", str(tiny_sd), "--sampler", "ddim", "--timesteps", "999,499", "--out", str(out)],
            "--timesteps applies to LCMs; an ODE solver takes --steps")
    assert not out.exists()


def test_a_lora_on_a_pixart_model_is_named_as_the_python_argument(tiny_pixart, lora):
    # was: "... leave --lora LORA out", the command's flag, from LCMGenerator.load and models.load_lcm_lora
    from latent_consistency.models import load_lcm_lora
    from latent_consistency.pipelines import LCMGenerator

    for load in (lambda: LCMGenerator.load(str(tiny_pixart), lora=lora), lambda: load_lcm_lora(str(tiny_pixart), lora)):
        with pytest.raises(UserError, match="takes no LoRA") as refused_:
            load()
        assert f"leave lora={str(lora)!r} out" in str(refused_.value) and "--lora" not in str(refused_.value)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_commands_keep_their_lora_flag_for_a_pixart_model(tiny_pixart, lora, tmp_path, run_error, command):
    argv = ["generate", "a red star", "--out", str(tmp_path / "images")] if command == "generate" else ["serve"]
    refused(run_error, [*argv, "--model", str(tiny_pixart), "--lora", str(lora)],
            f"takes no LoRA (diffusers' PixArtAlphaPipeline loads none): leave --lora {lora} out")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _zero_terminal_snr_tiny():
    import dataclasses

    from latent_consistency.world.presets import PRESETS

    tiny = PRESETS["tiny"]
    return dataclasses.replace(tiny, teacher=dataclasses.replace(tiny.teacher, zero_terminal_snr=True))


def test_build_world_names_its_arguments(tmp_path, no_gpu):
    # was: "--out ...", "--parts-from ...", "--device cuda", "(--v-prediction)": the flags of `lcm world build`
    from latent_consistency.world.build import build_world

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    cases = [
        (("tiny", ""), {}, "^out_dir='' names no folder; give the world's folder by its name"),
        ((_zero_terminal_snr_tiny(), tmp_path / "new"), {}, r"must predict v \(prediction_type='v_prediction'\)"),
        (("tiny", tmp_path / "file"), {}, f"^out_dir={str(tmp_path / 'file')!r} is a file; give a folder for the world$"),
        (("tiny", junk), {}, f"^out_dir={str(junk)!r} holds something other than a world"),
        (("tiny", tmp_path / "new"), {"parts_from": junk}, f"^parts_from={str(junk)!r} is not a world folder"),
        (("tiny", tmp_path / "new"), {"device": "cuda"}, "^device='cuda' was asked for but no CUDA GPU is available; use device='cpu'$"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(UserError, match=message) as refused_:
            build_world(*args, progress=False, **kwargs)
        assert "--" not in str(refused_.value), refused_.value
    assert not (tmp_path / "new").exists()


def test_export_world_names_its_arguments(tmp_path, monkeypatch):
    # was: "--out ... is inside the world folder --from ...", the flags of `lcm world export`
    from latent_consistency.world import build

    monkeypatch.setattr(build, "_check_exportable", lambda src: None)  # a finished world takes minutes to build
    world, full = tmp_path / "world", tmp_path / "full"
    world.mkdir()
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=f"^dst={str(world / 'fp16')!r} is inside the world folder src={str(world)!r}; give a new"):
        build.export_world(world, world / "fp16")
    with pytest.raises(UserError, match=f"^dst={str(full)!r} is a file or a folder that is not empty"):
        build.export_world(world, full)
    with pytest.raises(UserError, match="^dst '' names no new folder"):
        build.export_world(world, "")


def test_lcm_world_keeps_its_flags(tmp_path, run_error, monkeypatch, no_gpu):
    from latent_consistency.world import build

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    world = ["world", "build", "--preset", "tiny", "--no-progress"]
    refused(run_error, [*world, "--out", str(junk), "--device", "cpu"], f"--out {junk} holds something other than a world (no world.json)")
    refused(run_error, [*world, "--out", str(tmp_path / "new"), "--parts-from", str(junk), "--device", "cpu"],
            f"--parts-from {junk} is not a world folder")
    refused(run_error, [*world, "--out", str(tmp_path / "new"), "--device", "cuda"],
            "--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    refused(run_error, [*world, "--out", str(tmp_path / "new"), "--zero-terminal-snr", "--dry-run"],
            "a zero-terminal-SNR teacher must predict v (--v-prediction)")
    monkeypatch.setattr(build, "_check_exportable", lambda src: None)
    src = tmp_path / "world"
    src.mkdir()
    refused(run_error, ["world", "export", "--from", str(src), "--out", str(src / "fp16")],
            f"--out {src / 'fp16'} is inside the world folder --from {src}; give a new or empty folder outside it")
    refused(run_error, ["world", "export", "--from", str(src), "--out", str(junk)],
            f"--out {junk} is a file or a folder that is not empty; give a new or empty folder")


def test_lcm_demo_building_its_world_keeps_the_commands_wording(tmp_path, run_error, no_gpu):
    """`lcm demo --world-preset` builds into OUT/world-NAME through `build_world`: its errors read as a command's, not as
    `build_world`'s Python arguments."""
    world = tmp_path / "demo" / "world-tiny"
    world.mkdir(parents=True)
    (world / "notes.txt").write_text("mine")
    refused(run_error, ["demo", "--out", str(tmp_path / "demo"), "--world-preset", "tiny", "--device", "cpu"],
            f"--out {world} holds something other than a world (no world.json)")
    assert (world / "notes.txt").read_text() == "mine"
