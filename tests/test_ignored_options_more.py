"""Options of `lcm generate`, `lcm serve` (its flags and request fields), `lcm cache` and `lcm world build` that were accepted
and then did nothing: each one now works or is refused in one line (exit 2 or a 422, nothing written). Also `lcm serve
--style-lora`, which `lcm generate` had and the server did not."""

import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from latent_consistency.cli import build_parser, main
from test_ignored_options import refused
from test_serve import free_port, make_app
from test_shard_journeys import img2dataset_sample, write_shard
from tiny_models import save_tiny_lora


@pytest.fixture(scope="module")
def style_lora(tiny_lcm, tmp_path_factory):
    """A random style LoRA for the tiny LCM's UNet."""
    return save_tiny_lora(tmp_path_factory.mktemp("style") / "style", tiny_lcm, seed=3)


@pytest.fixture(scope="module")
def lcm_generator(tiny_lcm):
    import torch

    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# --- TCD's γ with one step ---

def test_every_gamma_makes_the_same_image_in_one_step(lcm_generator):
    """Why one step refuses γ: TCD re-injects noise between steps and none after the last (`sampling.sample_tcd`; the Python
    call, the command and the server refuse it: `sampling.check_tcd_steps`)."""
    import torch

    from latent_consistency.sampling import sample_tcd

    latents, cond, _ = lcm_generator.start(["a red star"], [1], 16, 16)
    f = lcm_generator.model.consistency_model(8.0)

    def tcd(steps: int, gamma: float) -> torch.Tensor:
        return sample_tcd(f, latents, lcm_generator.timesteps(steps), cond, 7.0, f.schedule, gamma, [torch.Generator().manual_seed(1)])

    assert tcd(1, 0.0).equal(tcd(1, 0.9))
    assert not tcd(2, 0.0).equal(tcd(2, 0.9))


@pytest.mark.parametrize("steps", [["--steps", "1"], ["--timesteps", "999"], ["--steps", "1", "--init-image", "INIT", "--strength", "0.5"]],
                         ids=["steps", "timesteps", "img2img"])
def test_gamma_with_one_step_is_refused(tiny_lcm, run_error, tmp_path, steps):
    # was: exit 0, and --gamma 0.1 and --gamma 0.9 wrote the same image (the help: "the share of fresh noise per step")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "init.png")
    steps = [str(tmp_path / "init.png") if arg == "INIT" else arg for arg in steps]
    out = tmp_path / "images"
    refused(run_error, ["generate", "a red star", "--model", str(tiny_lcm), "--gamma", "0.9", *steps, "--out", str(out)],
            "one step has no next one: every --gamma makes the same image", out)


def test_a_request_with_gamma_and_one_step_is_refused(lcm_generator):
    # was: 200, the same image at every gamma
    with TestClient(make_app(lcm_generator)) as client:
        response = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "gamma": 0.5, "seed": 1})
        assert response.status_code == 422 and "every gamma makes the same image" in response.json()["error"], response.text
        assert client.post("/v1/images", json={"prompt": "a red star", "steps": 2, "gamma": 0.5, "seed": 1}).status_code == 200


# --- an LCM-LoRA on a PixArt model ---

@pytest.fixture(scope="module")
def tiny_pixart_lcm(tmp_path_factory):
    from tiny_models import save_tiny_pixart

    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart-lcm", seed=1, lcm=True)


@pytest.mark.parametrize("which,advice", [("lcm", "a PixArt-LCM samples as it is"), ("teacher", "distil it into a PixArt-LCM first")])
def test_a_lora_on_a_pixart_model_is_refused_with_advice_for_sampling(tiny_pixart, tiny_pixart_lcm, style_lora, run_error, tmp_path,
                                                                      which, advice):
    # was: "... cannot load LoRA weights: distil a full student (no --adapter lora)", advice for `lcm distill`
    model = tiny_pixart_lcm if which == "lcm" else tiny_pixart
    out = tmp_path / "images"
    refused(run_error, ["generate", "a red star", "--model", str(model), "--lora", str(style_lora), "--out", str(out)],
            f"takes no LoRA (diffusers' PixArtAlphaPipeline loads none): leave --lora {style_lora} out", out)
    code, err = run_error(["generate", "a red star", "--model", str(model), "--lora", str(style_lora), "--out", str(out)])
    assert advice in err and "--adapter" not in err, err


# --- lcm serve --style-lora ---

def test_serve_takes_a_style_lora_and_serves_what_generate_makes(tiny_lcm, style_lora, tmp_path):
    """was: `lcm serve --style-lora` was no option (exit 2): a style LoRA could be sampled, but not served. Now the served image is
    `lcm generate`'s with the same style LoRA, weight and seed, and /v1/config says which LoRAs the model carries."""
    from latent_consistency.cli.serve import build_app

    style = f"{style_lora}:0.7"
    app = build_app(build_parser().parse_args(["serve", "--model", str(tiny_lcm), "--style-lora", style, "--device", "cpu"]))
    with TestClient(app) as client:
        served = client.post("/v1/images", json={"prompt": "a red star", "steps": 2, "seed": 5})
        config = client.get("/v1/config").json()
    assert served.status_code == 200, served.text
    assert config["style_loras"] == [[str(style_lora), 0.7]] and config["lora"] is None
    made = {}
    for name, extra in (("styled", ["--style-lora", style]), ("plain", [])):
        argv = ["generate", "a red star", "--model", str(tiny_lcm), "--steps", "2", "--seed", "5", "--out", str(tmp_path / name), *extra]
        assert main([*argv, "--device", "cpu"]) == 0
        made[name] = pixels((tmp_path / name / "0000-a-red-star.png").read_bytes())
    np.testing.assert_array_equal(pixels(served.content), made["styled"])
    assert not np.array_equal(made["styled"], made["plain"])  # the style LoRA did something


def test_serve_refuses_a_style_lora_weight_that_is_no_number(tiny_lcm, style_lora, run_error, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--style-lora", f"{style_lora}:heavy", "--port", str(free_port())])
    assert code == 2 and len(err.splitlines()) == 1 and "'heavy' after the colon is not a weight" in err, err


# --- lcm cache --num-workers with shards ---

def test_cache_of_shards_refuses_num_workers(tiny_sd, run_error, tmp_path):
    # was: exit 0, and the shards read in this process, as without --num-workers (`UsableBatches` sets it to 0)
    write_shard(tmp_path / "shards" / "00000.tar", img2dataset_sample("a", "a red one"))
    out = tmp_path / "cache"
    refused(run_error, ["cache", "--model", str(tiny_sd), "--data", str(tmp_path / "shards"), "--num-workers", "2", "--out", str(out)],
            "is webdataset shards, which are read and decoded in this process: leave --num-workers out", out)


# --- lcm world build --parts-from into a started build ---

def started_build(folder, reused_from=None):
    """A world folder whose build has finished its first phase (from `reused_from`, if given), as `build_world` records it."""
    from latent_consistency.world.build import PHASES, STATE_FILE, world_spec
    from latent_consistency.world.presets import get_preset

    folder.mkdir()
    (folder / "world.json").write_text(json.dumps(world_spec(get_preset("tiny"), "epsilon")))
    state = {"done": [PHASES[0]], "seconds": {PHASES[0]: 0.0}} | ({"reused_from": {PHASES[0]: str(reused_from)}} if reused_from else {})
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


@pytest.fixture
def builds(monkeypatch):
    """`build_world`'s calls, recorded instead of run."""
    import latent_consistency.world.build
    from latent_consistency.errors import UserError

    calls = []

    def build_world(*args, **kwargs):
        calls.append(kwargs)
        raise UserError("not built in this test")

    monkeypatch.setattr(latent_consistency.world.build, "build_world", build_world)
    return calls


def test_parts_from_into_a_started_build_is_refused(run_error, tmp_path, builds):
    # was: accepted, and the build went on training the phases --parts-from names (`build_world` copies parts into a build
    # that has not started only)
    out = started_build(tmp_path / "world")
    before = sorted(p.name for p in out.iterdir())
    code, err = run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--parts-from", str(tmp_path / "other")])
    assert code == 2 and len(err.splitlines()) == 1 and "has started without parts of that world (tokenizer done)" in err, err
    assert builds == [] and sorted(p.name for p in out.iterdir()) == before


def test_resuming_a_build_with_the_parts_it_took_is_accepted(run_error, tmp_path, builds):
    """The same command run again, --parts-from included, resumes the build that took its first phases from there."""
    other = tmp_path / "other"
    out = started_build(tmp_path / "world", reused_from=other)
    run_error(["world", "build", "--preset", "tiny", "--out", str(out), "--parts-from", str(other)])
    assert [call["parts_from"] for call in builds] == [str(other)]
