"""`lcm world build` on the `tiny` preset: plumbing, resumability and bad input (never quality)."""

import dataclasses
import json
import shutil

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.errors import UserError
from latent_consistency.world import build
from latent_consistency.world.artifact import load_world
from latent_consistency.world.build import PHASES, build_world, export_world, finished_phases
from latent_consistency.world.presets import PRESETS, get_preset

pytestmark = pytest.mark.slow  # every test here builds on a tiny world trained in the module's fixture


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world("tiny", tmp_path_factory.mktemp("world") / "tiny", device="cpu", progress=False)


def _forbid_phases(monkeypatch, phases):
    for phase in phases:
        monkeypatch.setattr(build._Build, phase, lambda self, stage, phase=phase: pytest.fail(f"phase {phase} ran again"))


def test_tiny_world_loads_in_diffusers_and_samples(world):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(world), safety_checker=None)
    images = pipe(
        ["a large red star at the top left on a gray background"], num_inference_steps=2, height=32, width=32,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert pipe.vae_scale_factor == 4 and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings


def test_tiny_world_parts_are_sound(world):
    assert finished_phases(world) == list(PHASES)
    assert not (world / build.WORK_DIR).exists()
    w = load_world(world)
    for module in (w.model.unet, w.model.vae, w.model.text_encoder, w.judge):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    # The cache's latents are E(x) scaled to about unit variance by the VAE's scaling_factor.
    cache = LatentCache(world / "latents")
    assert cache.manifest["latent_size"] == [8, 8] and cache.manifest["latent_channels"] == 4
    assert cache.manifest["scaling_factor"] == w.model.vae.config.scaling_factor != 1.0
    assert 0.5 < cache.latents.std() < 2.0
    assert cache.manifest["source"]["dataset"] == "shapes" and len(cache) == get_preset("tiny").train_size
    assert w.codec.decode(cache[0]["latents"][None]).shape == (1, 3, 32, 32)
    # Training losses fall.
    for phase in ("text_encoder", "teacher"):
        loss = json.loads((world / "logs" / f"{phase}.json").read_text())["loss"]
        quarter = len(loss) // 4
        assert sum(loss[-quarter:]) < sum(loss[:quarter]), phase
    report = json.loads((world / "quality" / "quality.json").read_text())
    pretraining = {f"vae_reconstruction_{name}" for name in get_preset("tiny").pretraining_datasets}
    assert set(report["summary"]["passes"]) == {"teacher_alignment", "guidance_helps", "vae_reconstruction"} | pretraining
    assert (world / "quality" / "teacher_grid.png").is_file()


def test_rerun_of_a_finished_build_skips_every_phase(world, monkeypatch):
    _forbid_phases(monkeypatch, PHASES)
    assert build_world("tiny", world, device="cpu", progress=False) == world


def test_interrupted_phase_is_redone_and_its_leftovers_are_not_trusted(world, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    state = json.loads((copy / build.STATE_FILE).read_text())
    (copy / build.STATE_FILE).write_text(json.dumps(state | {"done": PHASES[:3]}))  # killed during "text_encoder"
    leftover = copy / build.WORK_DIR / "text_encoder" / "stage" / "text_encoder"
    leftover.mkdir(parents=True)
    (leftover / "half-written.safetensors").write_text("garbage")
    (copy / "text_encoder" / "model.safetensors").unlink()
    _forbid_phases(monkeypatch, PHASES[:3])
    torch.manual_seed(1234)  # as in another process: torch's global generator starts from a random seed
    build_world("tiny", copy, device="cpu", progress=False)
    assert finished_phases(copy) == list(PHASES)
    assert (copy / "text_encoder" / "model.safetensors").is_file()
    assert not (copy / "text_encoder" / "half-written.safetensors").exists() and not (copy / build.WORK_DIR).exists()
    # each phase starts from its own seed, so the redone phases give what the first build gave, to the last bit
    for weights in ("text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        redone, original = load_file(str(copy / weights)), load_file(str(world / weights))
        assert redone.keys() == original.keys() and all(torch.equal(redone[k], original[k]) for k in original), weights


def test_export_is_fp16_and_loads_as_float32(world, tmp_path):
    from safetensors.torch import load_file

    out = export_world(world, tmp_path / "fp16")
    weights = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert not (out / "latents").exists() and json.loads((out / "world.json").read_text())["weights_dtype"] == "float16"
    w = load_world(out)
    assert w.model.unet.dtype == torch.float32 and w.preset == get_preset("tiny")
    reference = load_world(world)
    for a, b in zip(w.model.unet.parameters(), reference.model.unet.parameters()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    with pytest.raises(UserError, match="not empty"):
        export_world(world, out)


@pytest.mark.parametrize(
    "preset, message",
    [
        (dataclasses.replace(PRESETS["tiny"], dataset="cifar"), "unknown dataset"),
        (dataclasses.replace(PRESETS["tiny"], resolution=30), "not a multiple of 16"),
        (dataclasses.replace(PRESETS["tiny"], resolution=48), "come at 32, 64"),
    ],
)
def test_bad_dataset_or_resolution_is_a_user_error(tmp_path, preset, message):
    with pytest.raises(UserError, match=message):
        build_world(preset, tmp_path / "w", device="cpu", progress=False)
    assert not (tmp_path / "w").exists()


def test_unknown_preset_and_prediction_type_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown world preset 'huge'; use one of tiny, default, large"):
        build_world("huge", tmp_path / "w")
    with pytest.raises(UserError, match="prediction type"):
        build_world("tiny", tmp_path / "w", prediction_type="sample")


def test_foreign_or_differently_built_folder_is_refused(world, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds something other than a world"):
        build_world("tiny", tmp_path, device="cpu", progress=False)
    with pytest.raises(UserError, match="other settings"):
        build_world("tiny", world, device="cpu", progress=False, prediction_type="v_prediction")
    with pytest.raises(UserError, match="other settings"):
        build_world(dataclasses.replace(PRESETS["tiny"], seed=1), world, device="cpu", progress=False)


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["world", "build", "--preset", "huge", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown world preset 'huge'" in err
    assert main(["world", "build", "--preset", "tiny", "--out", str(tmp_path / "w"), "--v-prediction", "--dry-run"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["prediction_type"] == "v_prediction" and spec["preset"]["name"] == "tiny"
    assert not spec["preset"]["teacher"]["zero_terminal_snr"]
    args = ["world", "build", "--preset", "tiny", "--out", str(tmp_path / "w"), "--zero-terminal-snr", "--dry-run"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "zero-terminal-SNR teacher must predict v" in err
    assert main(args + ["--v-prediction"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"]["teacher"]["zero_terminal_snr"]
    assert not (tmp_path / "w").exists()


def test_parts_from_another_world_stand_in_for_the_phases_built_with_equal_settings(world, tmp_path, monkeypatch):
    """`--parts-from`: a build offers its finished phases, an export the ones whose outputs it kept (no latent cache);
    a phase is reused only while its data and PHASE_SETTINGS are equal; the copies are float32 and recorded."""
    from safetensors.torch import load_file

    from latent_consistency.world.build import reusable_phases, world_spec

    tiny, sdxl = PRESETS["tiny"], PRESETS["tiny-sdxl"]
    assert reusable_phases(world, world_spec(tiny, "epsilon")) == list(PHASES)
    assert reusable_phases(world, world_spec(tiny, "v_prediction")) == list(PHASES[:5])  # up to the teacher
    assert reusable_phases(world, world_spec(sdxl, "epsilon")) == ["tokenizer", "judge", "vae"]  # its text encoder differs
    assert reusable_phases(world, world_spec(dataclasses.replace(tiny, seed=1), "epsilon")) == []
    exported = export_world(world, tmp_path / "fp16")
    assert reusable_phases(exported, world_spec(tiny, "v_prediction")) == list(PHASES[:4])

    monkeypatch.setattr(build._Build, "text_encoder", lambda self, stage: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stop where the reused phases end
        build_world(sdxl, tmp_path / "sdxl", device="cpu", progress=False, parts_from=exported)
    state = json.loads((tmp_path / "sdxl" / "build_state.json").read_text())
    assert state["done"] == ["tokenizer", "judge", "vae"] and set(state["reused_from"]) == set(state["done"])
    ours = load_file(str(tmp_path / "sdxl" / "vae" / "diffusion_pytorch_model.safetensors"))
    theirs = load_file(str(world / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in ours.values()} == {torch.float32}
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor.half().float())
    assert (tmp_path / "sdxl" / "judges").is_dir() and not (tmp_path / "sdxl" / "text_encoder").exists()

    with pytest.raises(UserError, match="no phase of that world"):
        build_world(dataclasses.replace(tiny, seed=1), tmp_path / "other", device="cpu", progress=False, parts_from=world)
    assert not (tmp_path / "other").exists()
    assert main(["world", "build", "--preset", "tiny", "--out", str(tmp_path / "w"), "--parts-from", str(tmp_path / "nowhere")]) == 2
