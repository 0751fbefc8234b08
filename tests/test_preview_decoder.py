"""The preview decoder (`latent_consistency.preview`, `lcm generate --preview-decoder`): a tiny AutoencoderTiny decodes as
a diffusers pipeline with it as its VAE does, the command writes images with it, bad decoders are one-line errors, and
`lcm world preview-decoder` distils a loadable one from the shipped world (resumably)."""

import functools
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.cli import main
from latent_consistency.preview import PreviewDecoder, load_preview_decoder


def save_tiny_autoencoder(folder, latent_channels=4, stages=2, scaling_factor=1.0, seed=0):
    """A random diffusers AutoencoderTiny (TAESD's class) upsampling 2^(stages-1)x, saved as a folder."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    tiny = AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8,) * stages, decoder_block_out_channels=(8,) * stages,
                           num_encoder_blocks=(1,) * stages, num_decoder_blocks=(1,) * stages, scaling_factor=scaling_factor)
    tiny.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tiny_taesd(tmp_path_factory):
    """A random AutoencoderTiny for the tiny models' 4-channel latents, 2x smaller than their images."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.mark.parametrize("scaling_factor", [1.0, 0.5])
def test_preview_decode_equals_the_diffusers_pipeline_with_autoencoder_tiny(tiny_lcm, tmp_path, scaling_factor):
    """diffusers' LatentConsistencyModelPipeline with the AutoencoderTiny as its VAE, output_type "pt", against our decode
    of the same pipeline's latents (output_type "latent", same seeds): TAESD's latents are the scaled ones, divided by its
    own scaling_factor (1.0 for TAESD; 0.5 here checks the division is the pipeline's)."""
    from diffusers import AutoencoderTiny, LatentConsistencyModelPipeline

    folder = save_tiny_autoencoder(tmp_path / "taesd", scaling_factor=scaling_factor)
    tiny = AutoencoderTiny.from_pretrained(folder)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm, vae=tiny, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red star", "a blue ring"], num_inference_steps=2, guidance_scale=6.0, height=16, width=16)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(4)).images
    images = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(4)).images  # in [0, 1]
    preview = load_preview_decoder(str(folder))
    ours = preview.decode(latents)
    assert ours.shape == (2, 3, 16, 16)
    assert (ours.clamp(-1, 1) / 2 + 0.5 - images).abs().max().item() < 1e-6
    # through the codec hook: decode is the preview's, encode stays the VAE's
    from latent_consistency.models import LatentCodec, load_lcm

    model = load_lcm(str(tiny_lcm))
    model.preview_decoder = preview
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(model.codec.encode(x), LatentCodec(model.vae).encode(x))
    assert torch.equal(model.codec.decode(latents), ours)


def test_generate_with_a_preview_decoder_writes_its_images(tiny_lcm, tiny_taesd, tmp_path):
    common = ["generate", "a red star", "a blue ring", "--model", str(tiny_lcm), "--steps", "2", "--seed", "3"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert main(common + ["--out", str(tmp_path / "preview"), "--preview-decoder", str(tiny_taesd)]) == 0
    names = sorted(p.name for p in (tmp_path / "preview").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "full").iterdir()) and len(names) == 2
    for name in names:
        preview = Image.open(tmp_path / "preview" / name)
        assert preview.size == (16, 16)
        assert not np.array_equal(np.asarray(preview), np.asarray(Image.open(tmp_path / "full" / name)))  # another decoder
    # the same images as the library's generator with the preview decoder
    from latent_consistency.grids import to_pil
    from latent_consistency.pipelines import LCMGenerator

    generator = LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)
    generator.use_preview_decoder(str(tiny_taesd))
    images = generator(["a red star"], generator.timesteps(2), 8.0, [3], 16, 16)
    assert np.array_equal(np.asarray(to_pil(images)[0]), np.asarray(Image.open(tmp_path / "preview" / names[0])))


def test_a_solver_generates_with_a_preview_decoder(tiny_sd, tiny_taesd, tmp_path):
    argv = ["generate", "a red star", "--model", str(tiny_sd), "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "out"),
            "--preview-decoder", str(tiny_taesd)]
    assert main(argv) == 0
    assert Image.open(next((tmp_path / "out").iterdir())).size == (16, 16)


def bad_decoders(tiny_lcm, tmp_path) -> dict:
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing folder": (str(tmp_path / "none"), "does not exist"),
        "not a model folder": (str(empty), "no config.json"),
        "not an AutoencoderTiny": (str(tiny_lcm / "vae"), "not an AutoencoderTiny (TAESD) folder: its config names AutoencoderKL"),
        "other latent channels": (str(save_tiny_autoencoder(tmp_path / "taesd-8", latent_channels=8)), "decodes 8-channel latents"),
        "other size factor": (str(save_tiny_autoencoder(tmp_path / "taesd-x4", stages=3)), "upsamples latents 4x"),
        "hub id offline": ("madebyollin/taesd", "cannot load the preview decoder madebyollin/taesd"),
    }


@pytest.mark.parametrize("case", ["missing folder", "not a model folder", "not an AutoencoderTiny", "other latent channels",
                                  "other size factor", "hub id offline"])
def test_bad_preview_decoder_is_one_line_exit_2_nothing_written(tiny_lcm, tmp_path, run_error, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    decoder, message = bad_decoders(tiny_lcm, tmp_path)[case]
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--out", str(out), "--preview-decoder", decoder])
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


def test_serve_refuses_a_bad_preview_decoder_before_it_listens(tiny_lcm, tmp_path, run_error):
    code, err = run_error(["serve", "--model", str(tiny_lcm), "--preview-decoder", str(tmp_path / "none")])
    assert code == 2 and len(err.splitlines()) == 1 and "does not exist" in err, err


def test_world_preview_decoder_distils_a_loadable_folder_and_resumes(tmp_path, monkeypatch):
    """`lcm world preview-decoder` on the shipped world, a few steps on a few images: a diffusers AutoencoderTiny folder
    that loads as a preview decoder for the world; a run interrupted after its training finishes as an uninterrupted one."""
    from diffusers import AutoencoderTiny

    from latent_consistency.world import preview_decoder
    from latent_consistency.world.artifact import default_world_path, load_world

    small = functools.partial(preview_decoder.PreviewDecoderConfig, held_out=16, checkpoint_every=2)
    monkeypatch.setattr(preview_decoder, "PreviewDecoderConfig", small)
    argv = ["world", "preview-decoder", "--steps", "4", "--images", "32", "--device", "cpu", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    folder = tmp_path / "a"
    assert AutoencoderTiny.load_config(str(folder))["_class_name"] == "AutoencoderTiny"
    report = json.loads((folder / preview_decoder.QUALITY_FILE).read_text())
    assert report["config"]["steps"] == 4 and report["training_images"] == 32 and np.isfinite(report["quality"]["psnr_preview_vs_vae"])
    assert (folder / preview_decoder.GRID_FILE).is_file() and not (tmp_path / "a.partial").exists()
    world = load_world(default_world_path())
    preview = load_preview_decoder(str(folder)).check_fits(world.codec.latent_channels, world.codec.downsampling_factor)
    assert isinstance(preview, PreviewDecoder)
    assert preview.decode(torch.randn(2, 4, 8, 8)).shape == (2, 3, 32, 32)

    # killed after training, before the folder was written: the rerun resumes from the last checkpoint (step 4)
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(preview_decoder, "preview_quality", killed)
        assert main(argv + ["--out", str(tmp_path / "b")]) == 130  # the CLI's exit code on an interrupt
    assert (tmp_path / "b.partial" / "checkpoints").is_dir() and not (tmp_path / "b").exists()
    monkeypatch.setattr(preview_decoder, "train_preview_decoder", functools.partial(_no_new_steps, preview_decoder.train_preview_decoder))
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors")) for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code = main(argv + ["--out", str(tmp_path / "a")])  # not empty
    assert code == 2


def test_world_preview_decoder_killed_after_its_move_into_out_finishes_on_the_rerun(tmp_path, monkeypatch):
    """Killed after the finished decoder was moved into --out, before its work folder went: the rerun removes the work
    folder and is done (it was "not empty", and OUT.partial stayed)."""
    from latent_consistency.world import preview_decoder

    monkeypatch.setattr(preview_decoder, "PreviewDecoderConfig", functools.partial(preview_decoder.PreviewDecoderConfig, held_out=16))
    argv = ["world", "preview-decoder", "--steps", "2", "--images", "16", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "c")]

    class KilledAtTheEnd:
        def __getattr__(self, name):
            return getattr(shutil, name)

        def rmtree(self, path, *args, **kwargs):
            if str(path).endswith(".partial"):
                raise KeyboardInterrupt
            return shutil.rmtree(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(preview_decoder, "shutil", KilledAtTheEnd())
        assert main(argv) == 130
    assert (tmp_path / "c" / preview_decoder.QUALITY_FILE).is_file() and (tmp_path / "c.partial").is_dir()
    assert main(argv) == 0
    assert not (tmp_path / "c.partial").exists() and (tmp_path / "c" / preview_decoder.QUALITY_FILE).is_file()


def _no_new_steps(train, tiny, data, config, phase):
    """train_preview_decoder, checking that it resumes at the last step (its loss function is never called)."""
    fit = phase.fit

    def resumed_fit(modules, optimizer, scheduler, loss_fn, steps, *args, **kwargs):
        return fit(modules, optimizer, scheduler, lambda: pytest.fail("a training step ran again"), steps, *args, **kwargs)

    phase.fit = resumed_fit
    return train(tiny, data, config, phase)
