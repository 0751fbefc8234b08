"""The Python API review's findings (LCMGenerator, loaders, samplers, `to_pil`, the latent cache), each pinned:

1. A blank path ("", "  ") is refused by every loader instead of reading the current folder (`hub.given_name`).
2. img2img from Python defaults to strength 0.8, as `lcm generate`, `lcm serve` and diffusers (`DEFAULT_STRENGTH`).
3. gamma with one step is refused by the Python call, as by the command and the server (`sampling.check_tcd_steps`).
4. An LCM saved as it was loaded keeps its guidance record (`models.save_pipeline`).
5. `to_pil` refuses NaN images, latents and a single image rather than drawing them.
6. The samplers refuse noise and a condition the network cannot take, and generator lists of another length; the prompt
   encoders refuse a str and an empty list; `evaluation.compare` draws its noise in the model's dtype.
7. `~` is expanded in a model's, LoRA's, cache's and image folder's path.
8. Seeds as a 1-D array or tensor; None and numbers as paths are UserErrors; `use_preview_decoder(None)` turns it off.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.data.latent_cache import LatentCache
from latent_consistency.errors import UserError
from latent_consistency.evaluation.clip import ClipModel
from latent_consistency.evaluation.compare import SamplerSpec, _noise, sample
from latent_consistency.grids import to_pil
from latent_consistency.guidance_record import RECORD, GuidanceRecord, write_record
from latent_consistency.models import load_lcm, load_lcm_lora, save_lcm_pipeline
from latent_consistency.pipelines import DEFAULT_STRENGTH, LCMGenerator
from latent_consistency.sampling import sample_lcm, sample_tcd
from tiny_models import save_tiny_lora

PROMPT = ["a red star"]


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("loras") / "lora", tiny_sd)


@pytest.fixture(scope="module")
def recorded_lcm(tiny_lcm, tmp_path_factory):
    """The tiny LCM with the guidance record `lcm distill` writes beside it: g in [1, 2], default 2."""
    folder = shutil.copytree(tiny_lcm, tmp_path_factory.mktemp("models") / "recorded-lcm")
    write_record(folder, GuidanceRecord(1.0, 2.0, 2.0))
    return folder


@pytest.fixture(scope="module")
def model(tiny_lcm):
    return load_lcm(str(tiny_lcm))


def noise_of(model, batch: int = 1, **kwargs) -> torch.Tensor:
    c, s = model.unet.config.in_channels, model.unet.config.sample_size
    return torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0), **kwargs)


# --- 1. blank paths, 7. `~`, 8. paths that are no text ---------------------------------------------------------------------

def test_a_blank_model_name_is_refused_not_read_from_the_current_folder(tiny_lcm, monkeypatch):
    # was: "cannot load a diffusers model from : We couldn't connect to 'https://huggingface.co' ...", and "  " was
    # "model folder    does not exist"
    monkeypatch.chdir(tiny_lcm)
    for blank in ("", "  "):
        with pytest.raises(UserError, match=f"cannot load a diffusers model from '{blank}': the name is empty; give a folder or a hub id"):
            LCMGenerator.load(blank)


def test_a_blank_lora_is_refused_not_loaded_from_the_current_folder(tiny_sd, tiny_lcm, tiny_lora, monkeypatch):
    # was: the LoRA of the current folder was loaded in silence
    monkeypatch.chdir(tiny_lora)
    with pytest.raises(UserError, match="cannot load the LoRA '': the name is empty"):
        load_lcm_lora(str(tiny_sd), "")
    with pytest.raises(UserError, match="cannot load the LoRA ' ': the name is empty"):
        LCMGenerator.load(str(tiny_sd), lora=" ")
    with pytest.raises(UserError, match="cannot load the LoRA '': the name is empty"):
        LCMGenerator.load(str(tiny_lcm), style_loras=[("", 1.0)])


def test_a_blank_image_folder_or_cache_is_refused_not_read_from_the_current_folder(tmp_path, monkeypatch):
    # was: ImageFolderDataset("") scanned the current folder's captioned images, LatentCache("") read its cache
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    monkeypatch.chdir(tmp_path)
    assert len(ImageFolderDataset(".", 16)) == 1  # the folder is there, named
    with pytest.raises(UserError, match="cannot load the image folder '': the name is empty; give a folder of captioned images"):
        ImageFolderDataset("", 16)
    with pytest.raises(UserError, match="cannot load the latent cache ' ': the name is empty"):
        LatentCache(" ")
    with pytest.raises(UserError, match="cannot load a CLIP model from '': the name is empty"):
        ClipModel.load("")


@pytest.mark.parametrize("call", [
    lambda lcm, sd: LCMGenerator.load(None),
    lambda lcm, sd: LCMGenerator.load(123),
    lambda lcm, sd: LCMGenerator.load(sd, lora=123),
    lambda lcm, sd: LCMGenerator.load(lcm, style_loras=[(None, 1.0)]),
    lambda lcm, sd: LatentCache(None),
    lambda lcm, sd: ImageFolderDataset(None, 16),
], ids=["model None", "model int", "lora int", "style LoRA None", "cache None", "image folder None"])
def test_a_path_that_is_no_text_is_a_user_error(tiny_lcm, tiny_sd, call):
    # was: TypeError: expected str, bytes or os.PathLike object
    with pytest.raises(UserError, match=r"give .*\(a str or pathlib.Path\)"):
        call(str(tiny_lcm), str(tiny_sd))


def test_a_tilde_in_a_model_or_lora_path_is_the_home_folder(tiny_lcm, tiny_sd, tiny_lora, recorded_lcm, tmp_path, monkeypatch):
    # was: "model folder ~/models/tiny-lcm does not exist" (and "LoRA ~/lora does not exist") with the folder there
    (tmp_path / "models").mkdir()
    for folder in (tiny_lcm, tiny_sd, tiny_lora, recorded_lcm):
        (tmp_path / "models" / folder.name).symlink_to(folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    generator = LCMGenerator.load(f"~/models/{recorded_lcm.name}")
    assert generator.default_guidance_scale() == 2.0  # its guidance record read from the expanded path too
    with_lora = LCMGenerator.load(f"~/models/{tiny_sd.name}", lora=f"~/models/{tiny_lora.name}")
    assert with_lora.kind == "lora"


# --- 2. img2img's default strength -------------------------------------------------------------------------------------------

def test_img2img_from_python_defaults_to_the_commands_strength(lcm):
    # was: strength 1.0 (the init image noised to t = 999), where `lcm generate`, `lcm serve` and diffusers take 0.8
    assert DEFAULT_STRENGTH == 0.8
    size = lcm.default_size()
    init = torch.linspace(-1, 1, 3 * size * size).reshape(1, 3, size, size)
    default = lcm(PROMPT, steps=2, init_images=init)
    assert torch.equal(default, lcm(PROMPT, steps=2, init_images=init, strength=0.8))
    assert not torch.equal(default, lcm(PROMPT, steps=2, init_images=init, strength=1.0))
    # custom timesteps say where img2img starts: no strength is taken for them
    assert torch.equal(lcm(PROMPT, [999, 499], init_images=init), lcm(PROMPT, [999, 499], init_images=init, strength=1.0))
    with pytest.raises(UserError, match="strength 0.5 applies to img2img: give init images, or leave strength out"):
        lcm(PROMPT, steps=2, strength=0.5)


def test_an_init_image_of_another_size_is_told_the_size_keywords(lcm):
    # was: "resize it to the width and height", which named no keyword of the call
    size = lcm.default_size()
    init = torch.zeros(1, 3, size + 8, size)
    with pytest.raises(UserError, match=rf"init image is {size}x{size + 8} px, not the {size}x{size} asked for; resize it, or ask "
                                        rf"for its size \(height={size + 8}, width={size}\)"):
        lcm(PROMPT, steps=2, init_images=init)


def test_the_command_and_server_take_the_apis_default_strength():
    from latent_consistency.cli import generate
    from latent_consistency.serve.request import ImageRequest

    assert generate.DEFAULT_STRENGTH is DEFAULT_STRENGTH
    assert ImageRequest.model_fields["strength"].default == DEFAULT_STRENGTH


# --- 3. gamma with one step ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [dict(steps=1), dict(timesteps=[999])], ids=["steps=1", "one timestep"])
def test_gamma_with_one_step_is_refused_by_the_python_call(lcm, steps):
    # was: accepted, every gamma giving the same image (not Algorithm 3's either)
    with pytest.raises(UserError, match="gamma is TCD's share of fresh noise between steps, and one step has no next one: every gamma "
                                        r"makes the same image; give 2 or more steps \(or 2 timesteps\), or leave gamma out"):
        lcm(PROMPT, gamma=0.5, **steps)
    lcm(PROMPT, steps=2, gamma=0.5)


# --- 4. the guidance record of a saved LCM -----------------------------------------------------------------------------------

def test_an_lcm_saved_as_loaded_keeps_its_guidance_record(recorded_lcm, tmp_path):
    # was: no guidance.json in the saved folder, and the LCM loaded again sampled at the kind's g = 8 instead of 2
    model = load_lcm(str(recorded_lcm))
    saved = save_lcm_pipeline(tmp_path / "saved", model.unet, model, model.scheduler_config)
    assert (saved / RECORD).is_file()
    assert LCMGenerator.load(str(saved)).default_guidance_scale() == 2.0
    student = type(model.unet).from_config(model.unet.config)  # another network: its run writes its own record
    assert not (save_lcm_pipeline(tmp_path / "student", student, model, model.scheduler_config) / RECORD).exists()


# --- 5. to_pil ---------------------------------------------------------------------------------------------------------------------

def test_to_pil_refuses_nan_images_latents_and_a_single_image():
    # was: NaN drawn black, 4-channel latents drawn as an RGBA picture, [3, H, W] torch's "permute(sparse_coo)" error
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0, 0, 0] = float("nan")
    images[2, 1, 2, 2] = float("inf")
    with pytest.raises(UserError, match="image.s. 1, 2 of the 3 hold NaN or infinite pixels"):
        to_pil(images)
    with pytest.raises(UserError, match=r"got \[1, 4, 4, 4\] torch.float32; latents are decoded first: model.codec.decode"):
        to_pil(torch.zeros(1, 4, 4, 4))
    with pytest.raises(UserError, match=r"got \[3, 4, 4\] torch.float32; one image \[3, H, W\] is images\[None\]"):
        to_pil(torch.zeros(3, 4, 4))
    with pytest.raises(UserError, match="pixels p in .0, 255. are p / 127.5 - 1"):
        to_pil(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    assert [image.mode for image in to_pil(torch.zeros(2, 3, 4, 4))] == ["RGB", "RGB"]


# --- 6. the low-level sampling contract --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_the_samplers_refuse_noise_and_conditions_the_network_cannot_take(model, sampler):
    # was: torch's dtype, convolution and GroupNorm errors from inside the UNet
    f, cond, timesteps = model.consistency_model(), model.prompts.encode(PROMPT), model.timesteps(2)

    def run(z, c=cond, generator=None):
        if sampler == "lcm":
            return sample_lcm(f, z, timesteps, c, 1.0, f.schedule, generator)
        return sample_tcd(f, z, timesteps, c, 1.0, f.schedule, 0.3, generator)

    z = noise_of(model)
    assert run(z).shape == z.shape
    for wrong in (torch.float64, torch.float16):
        with pytest.raises(UserError, match=f"the latents are {wrong} but the network's weights are torch.float32"):
            run(z.to(wrong))
    with pytest.raises(UserError, match="the condition c is torch.float64 but the network's weights are torch.float32"):
        run(z, cond.double())
    with pytest.raises(UserError, match=r"the latents must be \[B, 4, h, w\] .* got \[1, 3, 8, 8\]"):
        run(z[:, :3])
    with pytest.raises(UserError, match=r"the latents must be \[B, 4, h, w\] .* got \[4, 8, 8\]"):
        run(z[0])
    with pytest.raises(UserError, match="the latents must be a floating-point tensor"):
        run(z.long())
    with pytest.raises(UserError, match="generator must be a torch.Generator"):
        run(z, generator=0)


def test_a_list_of_generators_is_one_per_latent(model):
    # was: IndexError (more latents than generators), or generators left over in silence
    f, cond, timesteps = model.consistency_model(), model.prompts.encode(PROMPT * 4), model.timesteps(2)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(UserError, match=r"give one torch.Generator per latent \(4\), got 3"):
        sample_lcm(f, noise_of(model, 4), timesteps, cond, 1.0, f.schedule, generators)
    with pytest.raises(UserError, match=r"give one torch.Generator per latent \(2\), got 3"):
        sample_lcm(f, noise_of(model, 2), timesteps, cond[:2], 1.0, f.schedule, generators)


def test_under_autocast_the_network_casts_the_noise(tiny_lcm):
    """A training run's validation samples a half-precision starting model from float32 noise under autocast: not refused."""
    model = load_lcm(str(tiny_lcm), torch.bfloat16)
    f = model.consistency_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z0 = sample_lcm(f, noise_of(model), model.timesteps(1), model.prompts.encode(PROMPT), 1.0, f.schedule)
    assert torch.isfinite(z0).all()


def test_the_prompt_encoders_refuse_a_str_and_no_prompts(model):
    # was: one embedding per character of "a red star", and IndexError for []
    with pytest.raises(UserError, match=r"prompts must be a list of strings, e.g. \['a red star'\], got 'a red star'"):
        model.prompts.encode("a red star")
    with pytest.raises(UserError, match="prompts is empty; give at least one prompt"):
        model.prompts.encode([])


def test_an_evaluation_samples_a_bfloat16_lcm_from_noise_in_its_dtype(tiny_lcm):
    # was: RuntimeError, expected m1 and m2 to have the same dtype (the noise was always float32)
    lcm = load_lcm(str(tiny_lcm), torch.bfloat16)
    assert _noise(lcm, range(2), "cpu")[0].dtype == torch.bfloat16
    images = sample(SamplerSpec("lcm", 1, 2.0), lcm, lcm, PROMPT * 2)
    assert images.shape[:2] == (2, 3) and torch.isfinite(images).all()


# --- 8. seeds as arrays, the preview decoder off ------------------------------------------------------------------------------

def test_seeds_may_be_a_1d_integer_array_or_tensor(lcm):
    # was: "give one seed per prompt (2), got array([1, 2])"
    prompts = PROMPT * 2
    expected = lcm(prompts, steps=1, seeds=[1, 2])
    assert torch.equal(lcm(prompts, steps=1, seeds=np.array([1, 2])), expected)
    assert torch.equal(lcm(prompts, steps=1, seeds=torch.tensor([1, 2])), expected)
    with pytest.raises(UserError, match="seeds must be integers"):
        lcm(prompts, steps=1, seeds=np.array([1.0, 2.0]))


def test_use_preview_decoder_none_goes_back_to_the_vae(lcm):
    # was: TypeError from the path check, and no documented way back to the VAE's decoder
    expected = lcm(PROMPT, steps=1)
    lcm.model.preview_decoder = object()  # as `use_preview_decoder(name)` leaves it
    try:
        lcm.use_preview_decoder(None)
        assert lcm.model.preview_decoder is None
        assert torch.equal(lcm(PROMPT, steps=1), expected)
    finally:
        lcm.model.preview_decoder = None


def test_loading_a_lora_from_python_does_not_warn_of_float32_modules_the_model_has_none_of(tiny_sd, tiny_lora, caplog):
    # was: diffusers' ModelMixin.to printed "There are modules in UNet2DConditionModel that should be kept in float32: [].
    # Casting directly with `to()` can lead to inconsistent results" at every load of a LoRA
    with caplog.at_level("WARNING"):
        generator = LCMGenerator.load(str(tiny_sd), lora=str(tiny_lora), dtype=torch.bfloat16)
    assert not [r for r in caplog.records if "should be kept in float32" in r.getMessage()]
    assert {p.dtype for p in generator.model.unet.parameters()} == {torch.bfloat16}
