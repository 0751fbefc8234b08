"""The preview decoder review's fixes (findings 1-3): a resumed `lcm world preview-decoder` is refused when the world's
VAE changed at its path (it trained on the old VAE's cached targets), a preview decoder saved as a variant or as pickles
is refused for what it holds (the reason given was pickles, to a folder of fp16 safetensors), and `lcm serve
--preview-decoder` tells its clients that its images are previews (/v1/config and a header)."""

import functools
import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from latent_consistency.cli import build_parser, main
from latent_consistency.errors import UserError
from latent_consistency.preview import load_preview_decoder
from test_preview_decoder import save_tiny_autoencoder


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    return save_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd")


# --- 1. a resume on another world VAE at the same path ---


def _stopped_after_the_data(*args, **kwargs):
    raise KeyboardInterrupt


def test_a_resume_after_the_world_vae_changed_at_its_path_is_refused_and_loses_nothing(tmp_path, monkeypatch, run_error):
    """Stopped once its data (the VAE's targets) is cached; the world's VAE trained again in place (one weight negated, as the
    review did): the rerun is one line, exit 2, and leaves the cached data and settings as they were. It resumed silently
    on the old VAE's targets. With the VAE put back, the rerun resumes and finishes."""
    from latent_consistency.world import preview_decoder
    from latent_consistency.world.artifact import default_world_path

    world = tmp_path / "world"
    shutil.copytree(default_world_path(), world)
    monkeypatch.setattr(preview_decoder, "PreviewDecoderConfig", functools.partial(preview_decoder.PreviewDecoderConfig, held_out=16))
    argv = ["world", "preview-decoder", "--world", str(world), "--steps", "2", "--images", "16", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "preview")]
    with monkeypatch.context() as m:
        m.setattr(preview_decoder, "train_preview_decoder", _stopped_after_the_data)
        assert run_error(argv)[0] == 130
    work = tmp_path / "preview.partial"
    kept = {name: (work / name).read_bytes() for name in ("settings.json", preview_decoder.DATA_FILE)}
    weights = world / "vae" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    vae = load_file(str(weights))
    save_file(vae | {"decoder.conv_out.weight": -vae["decoder.conv_out.weight"]}, str(weights))

    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"the world {world} is not the one {work} started from: its VAE's weights or config changed since" in err
    assert {name: (work / name).read_bytes() for name in kept} == kept and not (tmp_path / "preview").exists()

    weights.write_bytes(original)
    assert main(argv) == 0
    report = json.loads((tmp_path / "preview" / preview_decoder.QUALITY_FILE).read_text())
    assert report["training_images"] == 16 and not work.exists()


def test_a_resume_with_other_settings_is_still_refused_as_such(tmp_path):
    """Another config on the same world VAE keeps its own message: the VAE's is given only where the VAE alone differs."""
    from latent_consistency.world.artifact import default_world_path
    from latent_consistency.world.preview_decoder import PreviewDecoderConfig, check_resume, run_settings

    world = default_world_path()
    (tmp_path / "settings.json").write_text(json.dumps(run_settings(world, PreviewDecoderConfig(steps=3))))
    check_resume(tmp_path, json.loads((tmp_path / "settings.json").read_text()), world)  # the same: resumed
    with pytest.raises(UserError, match="of other settings"):
        check_resume(tmp_path, run_settings(world, PreviewDecoderConfig(steps=4)), world)


# --- 2. a preview decoder saved as a variant, or as pickles ---


def _saved_as(folder, **kwargs):
    """The tiny AutoencoderTiny saved again with `save_pretrained(**kwargs)`."""
    from diffusers import AutoencoderTiny

    AutoencoderTiny.from_pretrained(str(save_tiny_autoencoder(folder.with_name(folder.name + "-plain")))).save_pretrained(str(folder), **kwargs)
    return folder


def test_an_fp16_variant_preview_decoder_is_refused_for_what_it_holds_and_the_advice_works(tmp_path):
    """The message a model folder's component gets (`models.load_component`), with the class that loads the folder: it
    said the folder held no safetensors (pickles), and to save it again with safe_serialization=True, which gives the same
    folder back."""
    from diffusers import AutoencoderTiny

    folder = _saved_as(tmp_path / "taesd-fp16", variant="fp16")
    with pytest.raises(UserError) as refused:
        load_preview_decoder(str(folder))
    message = str(refused.value)
    assert (f"cannot load the preview decoder {folder}: {folder} holds only diffusion_pytorch_model.fp16.safetensors, weights "
            "of the fp16 variant; save the model without a variant" in message), message
    assert "pickle" not in message and len(message.splitlines()) == 1
    # what it says to do: AutoencoderTiny.from_pretrained(FOLDER, variant="fp16").save_pretrained(NEW_FOLDER)
    assert 'AutoencoderTiny.from_pretrained(FOLDER, variant="fp16").save_pretrained(NEW_FOLDER)' in message
    AutoencoderTiny.from_pretrained(str(folder), variant="fp16").save_pretrained(str(tmp_path / "again"))
    assert load_preview_decoder(str(tmp_path / "again")).latent_channels == 4


def test_a_pickled_preview_decoder_is_refused_naming_its_pickle(tmp_path):
    folder = _saved_as(tmp_path / "taesd-bin", safe_serialization=False)
    with pytest.raises(UserError, match="holds its weights only as diffusion_pytorch_model.bin, a PyTorch pickle, which is not "
                                        "loaded here; convert the folder to safetensors, e.g. AutoencoderTiny.from_pretrained"):
        load_preview_decoder(str(folder))


def test_generate_with_a_variant_preview_decoder_is_one_line_exit_2_nothing_written(tiny_lcm, tmp_path, run_error):
    folder = _saved_as(tmp_path / "taesd-fp16", variant="fp16")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--out", str(out), "--preview-decoder", str(folder)])
    assert code == 2 and len(err.splitlines()) == 1 and "weights of the fp16 variant" in err, err
    assert not out.exists()


# --- 3. lcm serve --preview-decoder says its images are previews ---


def _served(tiny_lcm, *flags) -> tuple[dict, dict]:
    """(/v1/config, the headers of one image) of `lcm serve --model tiny_lcm *flags`, as the command builds its app."""
    from latent_consistency.cli.serve import build_app

    app = build_app(build_parser().parse_args(["serve", "--model", str(tiny_lcm), "--device", "cpu", *flags]))
    with TestClient(app) as client:
        config = client.get("/v1/config").json()
        image = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1})
    assert image.status_code == 200, image.text
    return config, image.headers


def test_serve_names_its_preview_decoder_in_config_and_in_each_image(tiny_lcm, tiny_taesd):
    config, headers = _served(tiny_lcm, "--preview-decoder", str(tiny_taesd))
    assert config["preview_decoder"] == str(tiny_taesd)
    assert headers["X-Preview-Decoder"] == str(tiny_taesd)
    config, headers = _served(tiny_lcm)
    assert config["preview_decoder"] is None and "X-Preview-Decoder" not in headers


def test_serve_openapi_describes_the_preview_header(tiny_lcm):
    from latent_consistency.pipelines import LCMGenerator
    from test_serve import make_app

    app = make_app(LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32))
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    assert "X-Preview-Decoder" in schema["paths"]["/v1/images"]["post"]["responses"]["200"]["description"]
