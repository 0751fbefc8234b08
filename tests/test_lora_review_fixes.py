"""The LoRA review's findings (2026-12-07): sampling fuses the LoRAs into the weights (an unfused rank-64 LCM-LoRA cost
+35 % per UNet call), a LoRA that does not fit is refused in one line without peft's warnings before it, a file that is no
weights file is not called a PyTorch pickle, and a LoRA layer with one of its two factors is named as incomplete."""

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from latent_consistency.models import add_style_loras, load_diffusion_model, load_lcm_lora
from latent_consistency.pipelines import LCMGenerator
from test_lora_journeys import peft_loras, save_diffusers_lora, save_kohya_lora
from tiny_models import load_pipeline, save_tiny_lora

CPU = torch.device("cpu")
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """An LCM-LoRA with text-encoder layers (alpha 8 of rank 4, 6 of rank 2), a kohya style LoRA with text-encoder layers
    and a style LoRA with peft's lora_bias on to_q/to_k, which have no bias of their own."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("loras")
    lcm_lora = save_diffusers_lora(root / "lcm-lora", peft_loras(tiny_sd, unet_alpha=8, text_alpha=6, seed=3))
    style = save_kohya_lora(root / "style.safetensors", peft_loras(tiny_sd, unet_alpha=4, text_alpha=2, seed=9))
    torch.manual_seed(5)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, lora_bias=True, target_modules=["to_q", "to_k"])
    unet.add_adapter(config)
    biased = root / "biased"
    StableDiffusionPipeline.save_lora_weights(biased, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return lcm_lora, style, biased


def carries_adapters(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    networks = (model.unet, *model.text_encoders)
    return any(getattr(n, "peft_config", None) or any(isinstance(m, BaseTunerLayer) for m in n.modules()) for n in networks)


@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
def test_generation_fuses_the_loras_and_makes_the_unfused_models_images(tiny_sd, loras, guidance_scale):
    """`LCMGenerator.load` (lcm generate, lcm serve) fuses the LCM-LoRA and the style LoRAs at their weights into the UNet
    and the text encoder and leaves no peft layer; its images are the unfused model's to float32 rounding. Was: peft's
    layers kept, a third more time per UNet call."""
    lcm_lora, style, biased = loras
    styles = [(str(style), 0.6), (str(biased), -0.5)]
    fused = LCMGenerator.load(str(tiny_sd), CPU, torch.float32, str(lcm_lora), styles)
    unfused = LCMGenerator(add_style_loras(load_lcm_lora(str(tiny_sd), str(lcm_lora)), styles), CPU, torch.float32)
    assert carries_adapters(unfused.model) and not carries_adapters(fused.model)
    prompts, seeds = ["a red star", "a blue square"], [3, 4]
    torch.testing.assert_close(fused(prompts, steps=2, guidance_scale=guidance_scale, seeds=seeds),
                               unfused(prompts, steps=2, guidance_scale=guidance_scale, seeds=seeds), rtol=0, atol=1e-5)


def test_the_fused_model_makes_the_images_of_diffusers_load_lora_weights_and_set_adapters(tiny_sd, loras):
    """diffusers' recipe (load_lora_weights of each LoRA under its name, set_adapters at their weights, LCMScheduler, its
    LoRAs unfused) against the fused generator, to 1e-5 on the images (the latents, about 40 in size here, differ by float32
    rounding: 2e-5, as diffusers' own fuse_lora moves them)."""
    lcm_lora, style, _ = loras
    generator = LCMGenerator.load(str(tiny_sd), CPU, torch.float32, str(lcm_lora), [(str(style), 0.6)])
    assert not carries_adapters(generator.model)
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
    pipe.load_lora_weights(style.parent, weight_name=style.name, adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    ref = pipe(["a red star"], num_inference_steps=2, guidance_scale=1.5, height=16, width=16, output_type="pt",
               generator=[torch.Generator().manual_seed(3)]).images
    ours = generator(["a red star"], steps=2, guidance_scale=1.5, seeds=[3], height=16, width=16)
    torch.testing.assert_close((ours + 1) / 2, ref, rtol=0, atol=1e-5)


def test_bfloat16_layers_are_fused_in_float32_and_rounded_once(tiny_sd, tmp_path):
    """A bfloat16 layer is W + (α/r)·B·A computed in float32 from its bfloat16 weights and rounded once: closer to the
    float32 model than diffusers' fusing in bfloat16 (docs/guide.md, "Sampling fuses the LoRAs")."""
    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {k: v.to(torch.bfloat16).float() for k, v in load_file(str(lora / LORA_FILE)).items()}  # as loaded: bfloat16
    weight = load_diffusion_model(str(tiny_sd), torch.bfloat16).unet.get_submodule(module).weight.float()
    expected = (weight + tensors[f"unet.{module}.lora_B.weight"] @ tensors[f"unet.{module}.lora_A.weight"]).to(torch.bfloat16)
    fused = LCMGenerator.load(str(tiny_sd), CPU, torch.bfloat16, str(lora)).model.unet.get_submodule(module)
    assert isinstance(fused, torch.nn.Linear) and fused.weight.dtype == torch.bfloat16
    assert torch.equal(fused.weight, expected)


def no_warnings_and_one_line(run_error, argv):
    """Exit code and stderr of `lcm argv`, asserting that no Python warning was shown (the warnings pytest records are
    those Python prints on stderr, above the command's line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, err = run_error(argv)
    assert [str(w.message)[:200] for w in caught] == []
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


def test_an_sd_lora_on_sdxl_is_one_line_without_peft_s_warning(tiny_sd, tiny_sdxl, tmp_path, run_error):
    """Was peft's RuntimeWarning "While injecting the PEFT adapters, an inconsistency was discovered ... additional target
    modules: [every module the LoRA lacks]" above the refusal: the most common LCM-LoRA mix-up."""
    lora = save_diffusers_lora(tmp_path / "sd-lora", peft_loras(tiny_sd, unet_alpha=4, seed=3))
    err = no_warnings_and_one_line(run_error, ["generate", "a", "--model", str(tiny_sdxl), "--lora", str(lora), "--steps", "2",
                                               "--out", str(tmp_path / "out")])
    assert "does not fit" in err and "SDXL's on SD 1.5" in err, err


def test_a_style_lora_that_does_not_fit_is_one_line_without_peft_s_warning(tiny_sd, tiny_sdxl, tmp_path, run_error):
    """Was peft's UserWarning "Adapter style_0 was active which is now deleted. Setting active adapter to default_0." above
    the refusal."""
    lcm_lora, style = save_tiny_lora(tmp_path / "lcm-lora", tiny_sd), save_tiny_lora(tmp_path / "sdxl-style", tiny_sdxl)
    err = no_warnings_and_one_line(run_error, ["generate", "a", "--model", str(tiny_sd), "--lora", str(lcm_lora), "--style-lora",
                                               str(style), "--steps", "2", "--out", str(tmp_path / "out")])
    assert f"the LoRA {style} does not fit" in err, err


def test_the_warnings_of_a_load_that_succeeds_still_show():
    """Only a refused load's warnings are dropped: a LoRA that loads shows what peft or diffusers warned of."""
    from latent_consistency.models import _warnings_unless_refused

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _warnings_unless_refused():
            warnings.warn("kept", UserWarning, stacklevel=1)
        with pytest.raises(ValueError), _warnings_unless_refused():
            warnings.warn("dropped", RuntimeWarning, stacklevel=1)
            raise ValueError("refused")
    assert [str(w.message) for w in caught] == ["kept"]


@pytest.mark.parametrize("name, content", [
    ("README.md", b"# An LCM-LoRA\n\nLoad it with load_lora_weights.\n"),
    ("adapter_config.json", b'{"r": 4}'),
    ("model.gguf", b"GGUF\x03\x00\x00\x00"),
])
def test_a_file_that_is_no_weights_file_is_not_called_a_pickle(tiny_sd, tmp_path, run_error, name, content):
    """Was: "is README.md, a PyTorch pickle ... convert it: safetensors.torch.save_file(torch.load("README.md"), ...)"."""
    (tmp_path / name).write_bytes(content)
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(tmp_path / name), "--out", str(tmp_path / "out")])
    assert code == 2 and err.endswith(f"the LoRA {tmp_path / name} is not a LoRA weights file (give the lora/ folder or its "
                                      ".safetensors)"), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, legacy", [("lora.weights", False), ("lora.pkl", True)])
def test_a_pickle_is_told_by_its_first_bytes_whatever_its_name(tiny_sd, tmp_path, run_error, name, legacy):
    """torch.save's zip archive, or its legacy pickle, under a name of no pickle suffix is still a PyTorch pickle."""
    torch.save({"unet.to_q.lora_A.weight": torch.zeros(1)}, tmp_path / name, _use_new_zipfile_serialization=not legacy)
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(tmp_path / name), "--out", str(tmp_path / "out")])
    assert code == 2 and f"is {name}, a PyTorch pickle" in err and "torch.load" in err, err


def test_a_lora_a_without_its_lora_b_is_named_as_incomplete(tiny_sd, tmp_path, run_error):
    """Was: "cannot load the LoRA ...: list index out of range"."""
    module = "unet.down_blocks.1.attentions.0.proj_in"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 64)}, tmp_path / "half.safetensors")
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(tmp_path / "half.safetensors"), "--out",
                           str(tmp_path / "out")])
    assert code == 2 and f"cannot load the LoRA {tmp_path / 'half.safetensors'}: it is incomplete, its layer {module} has lora_A but no lora_B" in err, err


@pytest.mark.parametrize("kohya", [False, True])
def test_one_layer_without_its_up_factor_is_named(tiny_sd, tmp_path, run_error, kohya):
    """A whole LoRA but for one layer's lora_B (diffusers' format) or lora_up (kohya's: diffusers' converter's KeyError)."""
    parts = peft_loras(tiny_sd, unet_alpha=4, seed=3)
    path = save_kohya_lora(tmp_path / "k.safetensors", parts) if kohya else save_diffusers_lora(tmp_path / "d", parts) / LORA_FILE
    tensors = load_file(str(path))
    dropped = sorted(key for key in tensors if key.endswith(("lora_B.weight", "lora_up.weight")))[3]
    del tensors[dropped]
    save_file(tensors, path)
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(path), "--out", str(tmp_path / "out")])
    layer, _, factor = dropped.removesuffix(".weight").rpartition(".")
    lacked = "lora_down but no lora_up" if kohya else "lora_A but no lora_B"
    assert code == 2 and f"it is incomplete, its layer {layer} has {lacked}" in err and factor in err, err
