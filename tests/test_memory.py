"""Memory a user's settings ask of the device: `lcm evaluate` samples a batch sized by the image's pixels (it sampled 250
images at once at any size: a Stable Diffusion 1.5 row decoded 250 512 px images in one VAE call, about 125 GB), which
`--batch-size` sets; and a device out of memory is one line naming what to lower, exit 2, not a traceback."""

import json
from types import SimpleNamespace

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.evaluation import compare

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 5.06 MiB is free."


def test_the_default_batch_holds_at_most_sixteen_512_px_images_worth_of_pixels():
    sizes = {32: 250, 16: 250, 64: 250, 256: 64, 512: 16, 768: 7, 1024: 4, 2048: 1}
    assert {side: compare.batch_size(SimpleNamespace(native_size=side)) for side in sizes} == sizes


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 10)


def test_evaluate_batch_size_sets_the_images_sampled_at_once_and_not_the_scores(tiny_lcm, image_folder, tmp_path, monkeypatch):
    from tiny_models import save_tiny_clip

    clip = save_tiny_clip(tmp_path / "clip")
    real_noise, parts = compare._noise, []  # z_T of each batch sampled at once
    monkeypatch.setattr(compare, "_noise", lambda model, seeds, device: parts.append(len(seeds)) or real_noise(model, seeds, device))
    args = ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--steps", "1", "--guidance-scale", "2",
            "--samples", "10", "--clip", str(clip), "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert parts == [10, 8]  # a tiny model's 16 px images: all 10 at once; then the grid's 8 columns
    parts.clear()
    assert main([*args, "--out", str(tmp_path / "parts"), "--batch-size", "4"]) == 0
    assert parts == [4, 4, 2, 4, 4]
    whole, in_parts = (json.loads((tmp_path / name / "results.json").read_text())["rows"]["lcm|1|2"] for name in ("whole", "parts"))
    for key in ("clip_fid", "clip_kid", "clip_clip_score"):
        assert in_parts[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    # a rerun into the first folder with another batch keeps its rows (the batch is not part of the evaluation): only
    # its grid is drawn again
    parts.clear()
    assert main([*args, "--out", str(tmp_path / "whole"), "--batch-size", "3"]) == 0 and parts == [3, 3, 2]


def test_generate_out_of_gpu_memory_is_one_line_naming_what_to_lower(tiny_lcm, tmp_path, monkeypatch, run_error):
    from latent_consistency.pipelines import LCMGenerator

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(OOM)

    monkeypatch.setattr(LCMGenerator, "__call__", out_of_memory)
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--out", str(tmp_path / "images")])
    assert code == 2 and err.splitlines() == ["lcm generate: error: out of memory: the GPU could not give 2.00 GiB; give fewer images at "
                                              "once (--batch-size), a smaller --height and --width, or --dtype float16"], err


def test_a_distillation_out_of_memory_keeps_its_checkpoint_and_says_to_resume(tiny_sd, image_folder, tmp_path, monkeypatch, run_error):
    from latent_consistency.training import loop

    real_build, calls = loop.build_loss, []

    def loss_running_out_at_step_3(*args, **kwargs):
        loss = real_build(*args, **kwargs)

        def step(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                                   "to allocate 2199023255552 bytes. Error code 12 (Cannot allocate memory)")
            return loss(*a, **k)
        return step

    monkeypatch.setattr(loop, "build_loss", loss_running_out_at_step_3)
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(image_folder), "--out", str(out), "--omega-response-samples", "0"]
    code, err = run_error(argv)
    assert code == 2, err
    assert err.splitlines()[-1].startswith("lcm distill: error: out of memory: the CPU's memory could not give 2,048.00 GiB; give a "
                                           "smaller --batch-size with --grad-accumulation"), err
    assert "then --resume goes on from the last checkpoint" in err and "Traceback" not in err
    assert (out / "checkpoints" / "step-0000002").is_dir()  # what was written stays
    monkeypatch.setattr(loop, "build_loss", real_build)
    assert main([*argv, "--resume"]) == 0


def test_serve_answers_an_image_the_device_has_no_memory_for_507_and_serves_on(tiny_lcm, monkeypatch):
    """Was: a 500 "internal error (OutOfMemoryError)", as for a fault of the server. The batcher runs a failed batch's
    requests alone; one that fails alone is its size's, said as such."""
    from fastapi.testclient import TestClient

    from latent_consistency.pipelines import LCMGenerator
    from test_serve import make_app

    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    original = LCMGenerator.__call__

    def out_of_memory_above_16_px(self, prompts, timesteps, guidance_scale, seeds, height, width, **kwargs):
        if height > 16:
            raise torch.OutOfMemoryError(OOM)
        return original(self, prompts, timesteps, guidance_scale, seeds, height, width, **kwargs)

    monkeypatch.setattr(LCMGenerator, "__call__", out_of_memory_above_16_px)
    with TestClient(make_app(generator), raise_server_exceptions=False) as c:
        big = c.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1, "width": 32, "height": 32})
        assert big.status_code == 507 and big.json() == {"error": "the server's device ran out of memory for this image: ask a smaller "
                                                                   "width and height, or fewer images at once"}
        assert c.post("/v1/images", json={"prompt": "a red star", "steps": 1, "seed": 1}).status_code == 200
        assert "507" in c.get("/openapi.json").json()["paths"]["/v1/images"]["post"]["responses"]
