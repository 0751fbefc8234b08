"""Hub ids (org/name) read from the local Hugging Face cache with the hub offline, as a user with a populated cache gives
them: every command reads one as it reads the same model's local folder (the same images, the same records beside the
weights), records name the hub id, a resume knows the commit it started from, and a hub id that cannot be had is one line
and exit code 2 (`hub.check_hub_id`). The cache is built here in its real layout: models--org--name/ with blobs/,
refs/main and snapshots/<commit>/ whose files are symlinks to the blobs."""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from latent_consistency.errors import UserError

REVISION, NEW_REVISION = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
# The guidance record of the cached LCM: its default g is not diffusers' 8, so a record left unread shows
RECORD = {"guidance_scale_min": 1.5, "guidance_scale_max": 3.0, "guidance_scale": 2.0}


def cache_model(cache: Path, repo_id: str, folder: Path, revision: str = REVISION) -> Path:
    """`folder` as huggingface_hub caches a download of `repo_id` at `revision`; the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture(scope="module")
def models(tiny_sd, tiny_lcm, tmp_path_factory):
    """Local folders: the tiny SD, the tiny LCM with a guidance record, and a LoRA of the SD with the LCMScheduler config
    `lcm distill --adapter lora` saves beside it (3 original inference steps, not diffusers' default 50)."""
    from diffusers import LCMScheduler

    from tiny_models import save_tiny_lora

    root = tmp_path_factory.mktemp("hub-models")
    lcm = shutil.copytree(tiny_lcm, root / "lcm")
    (lcm / "guidance.json").write_text(json.dumps(RECORD))
    lora = save_tiny_lora(root / "lora", tiny_sd)
    LCMScheduler(original_inference_steps=3).save_config(lora)
    return SimpleNamespace(sd=tiny_sd, lcm=lcm, lora=lora)


@pytest.fixture(scope="module")
def cache_dir(models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    for repo_id, folder in (("org/tiny-sd", models.sd), ("org/tiny-lcm", models.lcm), ("org/lcm-lora", models.lora)):
        cache_model(cache, repo_id, folder)
    return cache


@pytest.fixture
def hub(cache_dir, monkeypatch, tmp_path):
    """The cache as the hub client's, offline; the hub client's warnings, collected (offline, reading a cached hub id
    through diffusers logs one per component: "Could not reach the Hub ... Using cached commit hash")."""
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    warnings = []
    monkeypatch.setattr(hf_api.logger, "warning", lambda message, *args, **kwargs: warnings.append(message))
    return SimpleNamespace(cache=cache_dir, warnings=warnings)


def generated(run_error, out, *argv):
    """`lcm generate "a red star" ... --out out`: the pixels and the text record of its one image."""
    code, err = run_error(["generate", "a red star", "--steps", "2", "--seed", "3", "--out", str(out), *argv])
    assert code == 0, err
    (png,) = out.glob("*.png")
    image = Image.open(png)
    return np.asarray(image), json.loads(image.text["lcm-generate"])


def test_an_lcm_hub_id_generates_what_its_folder_does(hub, models, run_error, tmp_path):
    """Its guidance record (default g 2) is read from the cached snapshot as from the folder, and the hub client has
    nothing to warn about on the way."""
    pixels, record = generated(run_error, tmp_path / "hub", "--model", "org/tiny-lcm")
    local_pixels, local_record = generated(run_error, tmp_path / "local", "--model", str(models.lcm))
    assert np.array_equal(pixels, local_pixels)
    assert record["model"] == "org/tiny-lcm" and record["guidance_scale"] == local_record["guidance_scale"] == RECORD["guidance_scale"]
    assert hub.warnings == []


def test_an_lcm_lora_hub_id_generates_what_its_folder_does(hub, models, run_error, tmp_path):
    """A LoRA hub id loads from the cache (diffusers alone cannot pick its weights file offline), under the LCMScheduler
    config saved beside its weights."""
    pixels, record = generated(run_error, tmp_path / "hub", "--model", "org/tiny-sd", "--lora", "org/lcm-lora")
    local_pixels, local_record = generated(run_error, tmp_path / "local", "--model", str(models.sd), "--lora", str(models.lora))
    assert np.array_equal(pixels, local_pixels)
    assert (record["model"], record["lora"]) == ("org/tiny-sd", "org/lcm-lora")
    assert record["timesteps"] == local_record["timesteps"] == [998, 665]  # T/k = 3 original steps: k = 333


def test_a_local_folder_of_the_hub_ids_path_is_read_instead(hub, models, run_error, tmp_path):
    """As diffusers does: ./org/tiny-lcm here holds the SD (no LCM), which is what is read."""
    shutil.copytree(models.sd, tmp_path / "org" / "tiny-lcm")
    code, err = run_error(["generate", "a", "--model", "org/tiny-lcm", "--out", str(tmp_path / "out")])
    assert code == 2 and "without the guidance input of an LCM" in err, err


def test_a_model_folder_of_symlinks_loads_and_is_fingerprinted_through_them(hub, models, tmp_path):
    """A folder whose components are links to folders elsewhere (and whose files are links, as a cache snapshot's): it
    loads, and its identity for a resume sees the weights behind the links."""
    from latent_consistency.models import load_lcm
    from latent_consistency.training.sources import model_digest

    parts = shutil.copytree(models.lcm, tmp_path / "parts")
    folder = tmp_path / "links"
    folder.mkdir()
    for entry in parts.iterdir():
        (folder / entry.name).symlink_to(entry)
    snapshot = hub.cache / "models--org--tiny-lcm" / "snapshots" / REVISION
    assert load_lcm(str(folder)).guidance_record.guidance_scale == RECORD["guidance_scale"]
    assert model_digest(str(folder)) == model_digest(str(models.lcm)) == model_digest(str(snapshot))
    weights = parts / "unet" / "diffusion_pytorch_model.safetensors"  # a byte the digest samples (the middle one's first)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert model_digest(str(folder)) != model_digest(str(models.lcm))


def config_of(**models):
    from latent_consistency.training.sources import MODEL_FIELDS

    return SimpleNamespace(**dict.fromkeys(MODEL_FIELDS, "") | models)


def test_a_resume_knows_the_hub_commit_it_started_from(hub, models, tmp_path, monkeypatch):
    """A run on hub ids records the commits they load; the same commits resume, a newer one downloaded since is refused."""
    from huggingface_hub import constants

    from latent_consistency.training.sources import check_sources, record_sources

    cache = shutil.copytree(hub.cache, tmp_path / "hf", symlinks=True)  # a cache of its own, whose refs/main moves on
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    config = config_of(teacher="org/tiny-sd", lora="org/lcm-lora")
    record_sources(tmp_path, config)
    assert json.loads((tmp_path / "sources.json").read_text()) == {"teacher": f"commit {REVISION}", "lora": f"commit {REVISION}"}
    check_sources(tmp_path, config)
    cache_model(cache, "org/tiny-sd", models.lcm, NEW_REVISION)
    with pytest.raises(UserError, match=f"--teacher org/tiny-sd is not the model this run started with: the hub id loads commit {NEW_REVISION}"):
        check_sources(tmp_path, config)


def test_a_distillation_from_a_hub_teacher(hub, models, run_error, tmp_path):
    """`lcm distill --teacher org/name`: its config and sources.json name the hub id and its commit, and it resumes."""
    from tiny_models import write_captioned_images

    out, data = tmp_path / "run", write_captioned_images(tmp_path / "images", 4)
    argv = ["distill", "--preset", "tiny", "--teacher", "org/tiny-sd", "--data", str(data), "--out", str(out), "--checkpoint-every", "1"]
    code, err = run_error([*argv, "--steps", "1"])
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["teacher"] == "org/tiny-sd"
    assert json.loads((out / "sources.json").read_text()) == {"teacher": f"commit {REVISION}"}
    code, err = run_error([*argv, "--steps", "2", "--resume"])
    assert code == 0, err
    assert hub.warnings == []


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every place a command takes a model, with `{}` for the hub id given there
MODEL_PLACES = {
    "generate --model": ["generate", "a", "--model", "{}"],
    "generate --lora": ["generate", "a", "--model", "org/tiny-sd", "--lora", "{}"],
    "distill --teacher": ["distill", "--preset", "tiny", "--teacher", "{}", "--data", "{images}"],
    "distill --student-init": ["distill", "--preset", "tiny", "--teacher", "org/tiny-sd", "--student-init", "{}", "--data", "{images}"],
    "finetune --model": ["finetune", "--preset", "tiny", "--model", "{}", "--data", "{images}"],
    "finetune --lora": ["finetune", "--preset", "tiny", "--model", "org/tiny-sd", "--lora", "{}", "--adapter", "lora", "--data", "{images}"],
    "evaluate --lcm": ["evaluate", "--lcm", "{}", "--prompts", "{images}", "--steps", "1"],
    "evaluate --teacher": ["evaluate", "--lcm", "org/tiny-lcm", "--teacher", "{}", "--prompts", "{images}", "--steps", "1"],
    "serve --model": ["serve", "--model", "{}", "--port", "{port}"],
    "cache --model": ["cache", "--model", "{}", "--data", "{images}"],
}
# A name that cannot be had as given, and a word its message must hold
UNUSABLE = {
    "not in the cache": ("someone/not-cached", "not in the local cache"),
    "a revision not in the cache": ("org/tiny-lcm@v9", "at revision v9 it is not in the local cache"),
    "a folder in a repo": ("org/tiny-sd/unet", "give its hub id, org/tiny-sd"),
    "the repo's address": ("https://huggingface.co/org/tiny-lcm", "give its hub id, org/tiny-lcm"),
    "not a hub id": ("org/no such model", "nor a valid hub id"),
}


@pytest.mark.parametrize("place", MODEL_PLACES)
@pytest.mark.parametrize("case", UNUSABLE)
def test_a_hub_id_that_cannot_be_had_is_one_line_before_any_output(place, case, hub, images, run_error, tmp_path):
    name, word = UNUSABLE[case]
    out = tmp_path / "out"
    argv = [a.replace("{images}", str(images)).replace("{port}", str(free_port())).replace("{}", name) for a in MODEL_PLACES[place]]
    if argv[0] != "serve":
        argv += ["--out", str(out)]
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and name in err and word in err, err
    assert not out.exists(), "an output was written before the error"


def test_fine_tuning_a_hub_lcm_takes_its_guidance_record(hub):
    """LCF of a cached hub LCM draws ω over the range its record says and validates at its default g, as of its folder."""
    from latent_consistency.training.config import FinetuneConfig, resolve_config

    config = resolve_config(FinetuneConfig, "tiny", overrides={"model": "org/tiny-lcm", "data": "d", "out": "o"})
    recorded = (config.guidance_scale_min, config.guidance_scale_max, config.validation_guidance_scale)
    assert recorded == (RECORD["guidance_scale_min"], RECORD["guidance_scale_max"], RECORD["guidance_scale"])


def test_an_evaluation_knows_the_hub_commit_it_scored(hub, models, tmp_path, monkeypatch):
    """Results scored on a hub id are not reused for a newer commit of it downloaded since."""
    from huggingface_hub import constants

    from latent_consistency.evaluation.table import model_identity

    cache = shutil.copytree(hub.cache, tmp_path / "hf", symlinks=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    before = model_identity("org/tiny-lcm")
    cache_model(cache, "org/tiny-lcm", models.sd, NEW_REVISION)
    assert before == f"org/tiny-lcm@{REVISION}" and model_identity("org/tiny-lcm") == f"org/tiny-lcm@{NEW_REVISION}"


def test_a_student_init_hub_id_is_read_from_the_cache(hub):
    from latent_consistency.models import load_diffusion_model
    from latent_consistency.training.students import _initial_unet

    unet = _initial_unet("org/tiny-lcm", load_diffusion_model("org/tiny-sd"), "epsilon")
    assert unet.config.time_cond_proj_dim == 32 and hub.warnings == []


def test_a_preview_decoder_hub_id_is_read_from_the_cache(hub, tmp_path):
    """`--preview-decoder madebyollin/taesd` offline: the cached TAESD loads as its folder does, with no hub-client lines."""
    import torch

    from latent_consistency.preview import load_preview_decoder
    from test_preview_decoder import save_tiny_autoencoder

    folder = save_tiny_autoencoder(tmp_path / "taesd")
    cache_model(hub.cache, "org/taesd", folder)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_preview_decoder("org/taesd").decode(latents), load_preview_decoder(str(folder)).decode(latents),
                               rtol=0, atol=0)
    assert hub.warnings == []
