"""Inputs nobody tried, found in review: seeds of 2^32 and more in every front end, a teacher or a run's checkpoint given as
an LCM, a guidance scale far off for what is sampled, HEAD requests to the server, shards read for an evaluation."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import warnings

import pytest
import torch
from fastapi.testclient import TestClient

from latent_consistency.errors import UserError
from latent_consistency.guidance_record import GuidanceRecord, write_record
from latent_consistency.pipelines import DISTINCT_SEEDS, LCMGenerator, RepeatedSeedWarning
from test_evaluate_inputs import write_shards
from test_generation_edges import generate
from test_serve import make_app

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def client(lcm):
    with TestClient(make_app(lcm)) as c:
        yield c


def lcm_with_record(tiny_lcm, folder, low: float, high: float):
    """A copy of the tiny LCM whose guidance record says it was distilled on [low, high] (the demo's [1, 2])."""
    copy = shutil.copytree(tiny_lcm, folder)
    write_record(copy, GuidanceRecord(low, high, low, None))
    return copy


# --- 1. seeds of 2^32 and more: taken, as diffusers takes them, and said in every front end ------------------------------------

def test_the_python_api_warns_of_a_seed_that_repeats_a_smaller_seeds_image(lcm):
    # was: LCMGenerator took seed 2^32 (up to MAX_SEED) without a word and drew seed 0's image
    timesteps, size = lcm.timesteps(1), lcm.default_size()
    with pytest.warns(RepeatedSeedWarning, match="seed 4294967296 makes the image of seed 0.*give seeds at most 4294967295"):
        repeated = lcm(["a red star", "a ring"], timesteps, 3.0, [1, DISTINCT_SEEDS], size, size)
    torch.testing.assert_close(repeated, lcm(["a red star", "a ring"], timesteps, 3.0, [1, 0], size, size), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RepeatedSeedWarning)
        lcm(["a red star"], timesteps, 3.0, [DISTINCT_SEEDS - 1], size, size)  # the last seed of its own


def test_generate_says_a_repeated_seed_once_as_its_note_not_again_as_the_librarys_warning(tiny_lcm, tmp_path, run_error):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_error(generate(tiny_lcm, tmp_path / "out", "a red star", "--seed", str(DISTINCT_SEEDS), "--steps", "1"))
    assert code == 0 and "note: seed 4294967296 makes the image of seed 0" in err, err
    assert not [w for w in caught if issubclass(w.category, RepeatedSeedWarning)]


def test_serve_answers_a_repeated_seed_with_a_note_header(client):
    # was: `"seed": 4294967296` (the API takes up to 2^63 - 1) answered seed 0's image without a word
    response = client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": DISTINCT_SEEDS + 5})
    assert response.status_code == 200 and response.headers["X-Seed"] == str(DISTINCT_SEEDS + 5)
    note = response.headers["X-Seed-Note"]
    assert note.startswith("seed 4294967301 makes the image of seed 5") and "give seed at most 4294967295" in note, note
    assert "X-Seed-Note" not in client.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 5}).headers


def test_the_page_shows_the_seed_note():
    from importlib import resources

    page = resources.files("latent_consistency.serve").joinpath("page.html").read_text(encoding="utf-8")
    assert 'response.headers.get("X-Seed-Note")' in page


# --- 2. a teacher given to `lcm generate` without --sampler ------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", ["tiny_sd", "tiny_pixart"])
def test_a_teacher_without_sampler_is_told_it_samples_as_it_is_with_an_ode_solver(teacher, request, tmp_path, run_error):
    # was: "distil it first ..., or load its LCM-LoRA (--lora)" (PixArt-α: "distil it first"), not that --sampler dpm++ samples it
    code, err = run_error(generate(request.getfixturevalue(teacher), tmp_path / "out", "a star"))
    assert code == 2 and len(err.splitlines()) == 1 and "distil it first" in err and "--sampler dpm++" in err, err
    assert not (tmp_path / "out").exists()


def test_other_front_ends_keep_hints_of_their_own(tiny_sd, tiny_lcm, tmp_path, run_error):
    from latent_consistency.models import NotAnLCM

    with pytest.raises(NotAnLCM) as raised:  # `lcm serve` and the library: no --sampler to give
        LCMGenerator.load(str(tiny_sd), CPU, torch.float32)
    assert "--sampler" not in str(raised.value)
    code, err = run_error(["evaluate", "--lcm", str(tiny_sd), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "e"),
                           "--device", "cpu"])
    assert code == 2 and len(err.splitlines()) == 1 and "give it as --teacher beside an LCM as --lcm" in err, err


# --- 3. --guidance-scale far off, said of what is sampled --------------------------------------------------------------------------

def test_a_guidance_scale_out_of_range_is_said_of_the_teacher_or_the_lcms_recorded_range(tiny_sd, tiny_lcm, tmp_path, run_error):
    # was: "LCMs are distilled with guidance scales around 3-15" for a teacher's DDIM too, and for an LCM distilled on [1, 2]
    code, err = run_error(generate(tiny_sd, tmp_path / "t", "a star", "--sampler", "ddim", "--guidance-scale", "100"))
    assert code == 2 and "--guidance-scale 100 is outside [0, 30]" in err and "classifier-free guidance is usually 5-10" in err, err
    assert "LCMs" not in err
    demo = lcm_with_record(tiny_lcm, tmp_path / "demo-lcm", 1.0, 2.0)
    code, err = run_error(generate(demo, tmp_path / "d", "a star", "--guidance-scale", "100"))
    assert code == 2 and "distilled on guidance scales [1, 2]" in err and "3-15" not in err, err
    code, err = run_error(generate(tiny_lcm, tmp_path / "l", "a star", "--guidance-scale", "100"))
    assert code == 2 and "LCMs are distilled with guidance scales around 3-15" in err, err
    assert not any((tmp_path / name).exists() for name in "tdl")


def test_serve_says_the_recorded_range_of_a_guidance_scale_above_its_limit(tiny_lcm, tmp_path):
    from latent_consistency.serve.request import ImageRequest, Limits, prepare

    demo = LCMGenerator.load(str(lcm_with_record(tiny_lcm, tmp_path / "demo-lcm", 1.0, 2.0)), CPU, torch.float32)
    with pytest.raises(UserError, match=r"guidance_scale 100 is above 30; this model was distilled on guidance scales \[1, 2\]"):
        prepare(ImageRequest(prompt="a star", guidance_scale=100), demo, Limits(max_side=64), 2.0)


# --- 4. a run's folder or checkpoint given as --model --------------------------------------------------------------------------------

def fake_run(folder, exported: bool):
    """A training run's layout (`training.run_folder`): its config, a checkpoint, and the LCM it exported when `exported`."""
    checkpoint = folder / "checkpoints" / "step-0000400"
    checkpoint.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for name in ("state.json", "student.safetensors"):
        (checkpoint / name).write_text("{}")
    if exported:
        (folder / "lcm").mkdir()
        (folder / "lcm" / "model_index.json").write_text("{}")
    return folder


def test_a_runs_checkpoint_given_as_the_model_points_at_the_runs_export(tmp_path, run_error):
    # was: "... is not a diffusers pipeline folder (no model_index.json and unet/ or transformer/); give a folder saved by ..."
    run = fake_run(tmp_path / "runs" / "x" / "distill", exported=True)
    code, err = run_error(generate(run / "checkpoints" / "step-0000400", tmp_path / "out", "a star"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "checkpoint step-0000400 of the training run" in err and f"give the model it exported, {run / 'lcm'}" in err, err
    code, err = run_error(generate(run, tmp_path / "out", "a star"))
    assert code == 2 and f"it is a training run: give the model it exported, {run / 'lcm'}" in err, err
    unfinished = fake_run(tmp_path / "runs" / "y", exported=False)
    code, err = run_error(generate(unfinished / "checkpoints" / "step-0000400", tmp_path / "out", "a star"))
    assert code == 2 and "it has exported no model yet" in err and "--resume" in err, err
    assert not (tmp_path / "out").exists()


# --- 5. HEAD, a proxy's health check -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/health", "/v1/config", "/metrics"])
def test_every_get_route_answers_head_with_its_headers_and_no_body(client, path):
    # was: 405 for HEAD / and every other GET route
    got, head = client.get(path), client.head(path)
    assert head.status_code == 200 and head.content == b"", (head.status_code, head.content[:80])
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_of_the_post_only_image_route_is_still_a_405(client):
    response = client.head("/v1/images")
    assert response.status_code == 405 and response.headers["allow"] == "POST"


# --- 6. shards read for an evaluation: their skips said once --------------------------------------------------------------------------

def corrupt_first_sample(shard) -> None:
    """The shard with a sample whose PNG does not decode put before its others: every pass over it meets it."""
    with tarfile.open(shard) as archive:
        members = [(info, archive.extractfile(info).read()) for info in archive.getmembers()]
    with tarfile.open(shard, "w") as archive:
        for info, payload in [(tarfile.TarInfo("bad.png"), b"not a png"), (tarfile.TarInfo("bad.txt"), b"a broken sample"), *members]:
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def data_warnings():
    """The warnings the data readers log (skipped samples) while a test runs."""
    handler, logger = Records(), logging.getLogger("latent_consistency.data")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_an_evaluation_of_shards_logs_a_corrupt_sample_once_and_notes_a_repeated_seed(tiny_lcm, tmp_path, run_error, data_warnings):
    # was: the corrupt sample was logged by the prompts' read, the reference's size check, its fingerprint and each metric's
    # pass (4 times here), each pass opening the shards anew; and `--seed 4294967296` evaluated seed 0's images without a word
    from tiny_models import save_tiny_clip

    shards = write_shards(tmp_path / "shards", 1, 3)
    corrupt_first_sample(shards / "00000.tar")
    clip = save_tiny_clip(tmp_path / "clip")
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(shards), "--clip", str(clip), "--steps", "1",
                           "--seed", str(DISTINCT_SEEDS), "--out", str(tmp_path / "out"), "--device", "cpu", "--grid-columns", "1"])
    assert code == 0, err
    assert "lcm evaluate: note: seed 4294967296 makes the image of seed 0" in err and "--seed at most 4294967293 for 3 image(s)" in err, err
    assert len([m for m in data_warnings if "x1 (" in m]) == 1, data_warnings
    assert json.loads((tmp_path / "out" / "results.json").read_text())
