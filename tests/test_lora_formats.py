"""LoRA files from the wild and LoRAs combined at generation, as LCM-LoRA users take them (Luo et al. 2023b: the LCM-LoRA
beside style LoRAs). Each format found on the hub and Civitai either loads and samples what diffusers samples with it, or is
refused in one line that says what it is; `--style-lora FILE[:W]` mixes LoRAs as diffusers' `set_adapters` does."""

import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latent_consistency.cli import main
from latent_consistency.models import add_style_loras, load_lcm, load_lcm_lora
from latent_consistency.parameterization import omega_from_guidance_scale
from latent_consistency.sampling import sample_lcm
from test_lora_journeys import peft_loras, save_diffusers_lora, save_kohya_lora
from tiny_models import load_pipeline, save_tiny_lora

LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPTS = ["a red star"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def same_latents(model, pipe, g: float = 1.5, steps: int = 2):
    """Our Algorithm 3 on `model` against the diffusers pipeline `pipe` (an LCMScheduler) from the same z_T and noise."""
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, latents=latents.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(7)).images
    f = model.consistency_model(g)
    ours = sample_lcm(f, latents.clone(), model.timesteps(steps), model.prompts.encode(PROMPTS), omega_from_guidance_scale(g),
                      f.schedule, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def refused(code, err, out, *words):
    assert code == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists(), "an output was written before the error"


@pytest.fixture(scope="module")
def lora_tensors(tiny_sd, tmp_path_factory):
    """A tiny SD LoRA as diffusers' `save_lora_weights` saves it: "unet.<module>.lora_A.weight" (rank 4 = alpha)."""
    return load_file(str(save_tiny_lora(tmp_path_factory.mktemp("lora"), tiny_sd) / LORA_FILE))


def older_diffusers(tensors: dict, attn_procs: bool) -> dict:
    """The same LoRA as diffusers saved it before peft: "<module>.lora.down.weight" (LoRACompatibleLinear), or before that as
    attention processors, "<attention>.processor.to_q_lora.down.weight"."""
    out = {}
    for key, value in tensors.items():
        module, which, _ = key.rsplit(".", 2)
        part = "down" if which == "lora_A" else "up"
        if attn_procs:
            attention, projection = re.match(r"(.*)\.(to_q|to_k|to_v|to_out)(?:\.0)?$", module).groups()
            out[f"{attention}.processor.{projection}_lora.{part}.weight"] = value
        else:
            out[f"{module}.lora.{part}.weight"] = value
    return out


@pytest.mark.parametrize("form", ["lora.down", "attention processors", "float16", "bfloat16"])
def test_diffusers_lora_files_of_every_vintage_and_precision_sample_as_diffusers_loads_them(form, tiny_sd, lora_tensors, tmp_path):
    tensors = {"lora.down": lambda t: older_diffusers(t, False), "attention processors": lambda t: older_diffusers(t, True),
               "float16": lambda t: {k: v.half() for k, v in t.items()},
               "bfloat16": lambda t: {k: v.bfloat16() for k, v in t.items()}}[form](lora_tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "style.safetensors")
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.load_lora_weights(tmp_path, weight_name="style.safetensors")
    same_latents(load_lcm_lora(str(tiny_sd), str(tmp_path / "style.safetensors")), pipe)


def test_a_unets_own_lora_file_loads_at_its_alpha(tiny_sd, tmp_path):
    """`unet.save_lora_adapter(folder)` (diffusers' own; `save_attn_procs` before it) writes the UNet's layers without the
    pipeline's "unet." prefix, with lora_alpha = 2r in the file's metadata.
    was: refused as "a LoRA of another model (other layers or layer names)", which it is not (diffusers' load_lora_weights
    loads none of its layers, silently); now it loads as `unet.load_lora_adapter(prefix=None)` loads it, at its alpha."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS))
    unet.save_lora_adapter(tmp_path / "unet-lora")
    assert not any(k.startswith("unet.") for k in load_file(str(tmp_path / "unet-lora" / LORA_FILE)))
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.unet.load_lora_adapter(tmp_path / "unet-lora", prefix=None, weight_name=LORA_FILE)
    same_latents(load_lcm_lora(str(tiny_sd), str(tmp_path / "unet-lora")), pipe)


def test_a_peft_adapter_folder_loads_at_its_configs_alpha(tiny_sd, tmp_path):
    """peft's `save_pretrained`: adapter_config.json (lora_alpha = 3r) beside adapter_model.safetensors, whose keys are
    "base_model.model.<module>.lora_A.weight".
    was: refused as "a LoRA of another model"; now it samples as the peft model it was saved from does."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    peft_model = get_peft_model(unet, LoraConfig(r=2, lora_alpha=6, init_lora_weights=False, target_modules=TARGETS))
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=peft_model.get_base_model(), safety_checker=None)
    pipe.scheduler = load_pipeline(tiny_sd, "LCMScheduler").scheduler
    same_latents(load_lcm_lora(str(tiny_sd), str(tmp_path / "adapter")), pipe)


def sgm_module(module: str) -> str:
    """A tiny SDXL UNet's module (one layer per block) by its name in Stability's SGM code, which kohya's SDXL LoRAs use:
    down_blocks.b.attentions.j -> input_blocks.(1 + 2b + j).1, mid_block -> middle_block.1, up_blocks.b.attentions.j ->
    output_blocks.(2b + j).1 (diffusers' `_maybe_map_sgm_blocks_to_diffusers` reverses it)."""
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module):
        return f"input_blocks.{1 + 2 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", module):
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    return f"output_blocks.{2 * int(m[1]) + int(m[2])}.1.{m[3]}"


@pytest.fixture(scope="module")
def sgm_lora(tiny_sdxl, tmp_path_factory):
    """A kohya/A1111 SDXL LoRA as Civitai holds them: lora_unet_input_blocks_... keys in SGM block names, alpha 2 of rank 4."""
    folder = tmp_path_factory.mktemp("sgm")
    tensors = {}
    for key, value in load_file(str(save_tiny_lora(folder / "lora", tiny_sdxl) / LORA_FILE)).items():
        module, which, _ = key.removeprefix("unet.").rsplit(".", 2)
        kohya = "lora_unet_" + sgm_module(module).replace(".", "_")
        tensors[f"{kohya}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
        tensors[f"{kohya}.alpha"] = torch.tensor(2.0)
    save_file(tensors, folder / "civitai-style.safetensors")
    return folder / "civitai-style.safetensors"


def test_a_kohya_sdxl_lora_in_sgm_block_names_samples_as_the_sdxl_pipeline_loads_it(tiny_sdxl, sgm_lora):
    """was: refused ("Target modules {...every layer...} not found in the base model", one line of every module's name):
    diffusers' SDXL pipeline maps SGM block names by the UNet's config, which the LoRA loader did not give it."""
    pipe = load_pipeline(tiny_sdxl, "LCMScheduler")
    pipe.load_lora_weights(sgm_lora.parent, weight_name=sgm_lora.name)
    same_latents(load_lcm_lora(str(tiny_sdxl), str(sgm_lora)), pipe)


def test_a_kohya_sdxl_lora_on_sd_is_one_short_line(tiny_sd, sgm_lora, tmp_path, run_error):
    """was: "cannot load the LoRA ...: Target modules {...} not found in the base model", naming every module of the LoRA
    (thousands of characters for a real SDXL LoRA) and not what is wrong; now it says that the LoRA does not fit."""
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(sgm_lora), "--out", str(out)])
    refused(code, err, out, "does not fit", "SDXL's on SD 1.5")
    assert len(err) < 600, err


def test_a_lycoris_loha_is_refused_as_such(tiny_sd, tmp_path, run_error):
    """A LyCORIS LoHa (hada_w1_a... keys), common on Civitai beside LoRAs.
    was: "cannot load the LoRA ...: The following keys have not been correctly renamed:" and nothing after the colon."""
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{module}.hada_w1_a": torch.ones(64, 4), f"{module}.hada_w1_b": torch.ones(4, 64), f"{module}.alpha": torch.tensor(4.0)},
              tmp_path / "loha.safetensors")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(tmp_path / "loha.safetensors"), "--out", str(out)])
    refused(code, err, out, "LyCORIS", f"{module}.hada_w1_")


@pytest.fixture(scope="module")
def style_lora(tiny_sd, tmp_path_factory):
    """A kohya-format style LoRA with text-encoder layers (alpha 8 of rank 4, text encoder alpha 6 of rank 2)."""
    return save_kohya_lora(tmp_path_factory.mktemp("style") / "style.safetensors", peft_loras(tiny_sd, unet_alpha=8, text_alpha=6, seed=9))


@pytest.fixture(scope="module")
def lcm_lora(tiny_sd, tmp_path_factory):
    return save_diffusers_lora(tmp_path_factory.mktemp("lcm-lora"), peft_loras(tiny_sd, unet_alpha=4, seed=3))


def test_an_lcm_lora_beside_a_style_lora_samples_as_diffusers_set_adapters(tiny_sd, lcm_lora, style_lora):
    """diffusers' recipe: load_lora_weights(lcm, adapter_name="lcm"), load_lora_weights(style, adapter_name="style"),
    set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6]). was: one LoRA only."""
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
    pipe.load_lora_weights(style_lora.parent, weight_name=style_lora.name, adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    model = add_style_loras(load_lcm_lora(str(tiny_sd), str(lcm_lora)), [(str(style_lora), 0.6)])
    same_latents(model, pipe)


def test_a_style_lora_on_a_full_lcm_samples_as_the_lcm_pipeline_with_it(tiny_lcm, tmp_path):
    """A full LCM (ω input) takes a style LoRA of its teacher's architecture: LatentConsistencyModelPipeline with
    load_lora_weights and set_adapters at weight 0.5."""
    style = save_tiny_lora(tmp_path / "style", tiny_lcm, seed=4)
    pipe = load_pipeline(tiny_lcm)
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    same_latents(add_style_loras(load_lcm(str(tiny_lcm)), [(str(style), 0.5)]), pipe, g=3.0)


def png(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32)).permute(2, 0, 1)


def test_generate_style_lora_writes_diffusers_images_and_records_them(tiny_sd, lcm_lora, style_lora, tmp_path, run_error):
    """`lcm generate --lora LCM_LORA --style-lora STYLE:0.6` writes the images diffusers' set_adapters recipe makes (to a
    level of 8 bits), records the style LoRAs, and --skip-existing keeps them only under the same ones."""
    out = tmp_path / "out"
    argv = ["generate", "a red star", "--model", str(tiny_sd), "--lora", str(lcm_lora), "--steps", "2", "--guidance-scale", "1.5",
            "--seed", "3", "--out", str(out)]
    assert main(argv + ["--style-lora", f"{style_lora}:0.6"]) == 0
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
    pipe.load_lora_weights(style_lora.parent, weight_name=style_lora.name, adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    ref = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.5, height=16, width=16, output_type="np",
               generator=[torch.Generator().manual_seed(3)]).images
    ref = torch.from_numpy((ref[0] * 255).round()).permute(2, 0, 1)
    torch.testing.assert_close(png(out / "0000-a-red-star.png"), ref, rtol=0, atol=1.0)
    code, err = run_error(argv + ["--style-lora", f"{style_lora}:0.7", "--skip-existing"])
    assert code == 2 and "style_loras" in err, err
    assert main(argv + ["--style-lora", f"{style_lora}:0.6", "--skip-existing"]) == 0


@pytest.mark.parametrize("style, words", [
    ("{style}:x", ["not a weight", ":0.8"]),
    ("{style}:inf", ["finite"]),
    ("{tmp}/missing.safetensors:0.5", ["does not exist"]),
])
def test_style_lora_mistakes_are_one_line(style, words, tiny_sd, lcm_lora, style_lora, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lcm_lora), "--out", str(out),
                           "--style-lora", style.format(style=style_lora, tmp=tmp_path)])
    refused(code, err, out, *words)


def test_a_style_lora_with_an_ode_sampler_is_refused(tiny_sd, style_lora, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--sampler", "ddim", "--style-lora", str(style_lora),
                           "--out", str(out)])
    refused(code, err, out, "--style-lora", "--sampler lcm")


def test_lcm_generator_load_takes_style_loras(tiny_sd, lcm_lora, style_lora):
    """The Python API: `LCMGenerator.load(..., style_loras=[(FILE, W)])` samples the model `add_style_loras` makes."""
    from latent_consistency.pipelines import LCMGenerator

    cpu = torch.device("cpu")
    generator = LCMGenerator.load(str(tiny_sd), cpu, torch.float32, str(lcm_lora), style_loras=[(str(style_lora), 0.6)])
    pipe = load_pipeline(tiny_sd, "LCMScheduler")
    pipe.load_lora_weights(lcm_lora, adapter_name="lcm")
    pipe.load_lora_weights(style_lora.parent, weight_name=style_lora.name, adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.6])
    same_latents(generator.model, pipe)
