"""LoRA journeys end to end, as a user takes them: a LoRA saved by diffusers/peft or kohya's trainers (another lora_alpha than
its rank, text-encoder layers) fine-tuned with `lcm finetune --lora` and exported, then loaded again by `lcm generate --lora`
and diffusers' `load_lora_weights`; an exported LoRA given as its weights file rather than its folder; an LCM-LoRA applied to
another model of its architecture (a v-prediction fine-tune of its teacher). Each must give what diffusers' recipe gives."""

import json
import shutil

import pytest
import torch

from latent_consistency.cli import main
from latent_consistency.models import load_diffusion_model, load_lcm_lora
from latent_consistency.pipelines import LCMGenerator

CPU = torch.device("cpu")
LORA_FILE = "pytorch_lora_weights.safetensors"
PROMPTS, SEEDS = ["a red star"], [3]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 4)


def peft_loras(model, unet_alpha: float, text_alpha: float | None = None, seed: int = 4):
    """Random (non-zero) peft LoRA state dicts of a tiny model's UNet (rank 4) and, with `text_alpha`, its text encoder (rank 2),
    with their LoraConfigs."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet_config = LoraConfig(r=4, lora_alpha=unet_alpha, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(unet_config)
    parts = {"unet": (get_peft_model_state_dict(unet), unet_config)}
    if text_alpha is not None:
        text_config = LoraConfig(r=2, lora_alpha=text_alpha, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        text_encoder = inject_adapter_in_model(text_config, CLIPTextModel.from_pretrained(model, subfolder="text_encoder"))
        parts["text_encoder"] = (get_peft_model_state_dict(text_encoder), text_config)
    return parts


def save_diffusers_lora(folder, parts):
    """`StableDiffusionPipeline.save_lora_weights` with each part's adapter metadata, as diffusers' training scripts save one."""
    from diffusers import StableDiffusionPipeline

    kwargs = {f"{name}_lora_layers": layers for name, (layers, _) in parts.items()}
    kwargs |= {f"{name}_lora_adapter_metadata": config.to_dict() for name, (_, config) in parts.items()}
    StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **kwargs)
    return folder


def save_kohya_lora(path, parts):
    """The same LoRA in kohya-ss's format: lora_unet_/lora_te_ module names with "_" for ".", lora_down/lora_up, and one
    `alpha` tensor per module."""
    from safetensors.torch import save_file

    tensors = {}
    for name, (layers, config) in parts.items():
        prefix = "lora_unet_" if name == "unet" else "lora_te_text_model_"
        for key, value in layers.items():
            module, which, _ = key.rsplit(".", 2)
            kohya = prefix + module.removeprefix("text_model.").replace(".", "_")
            tensors[f"{kohya}.{'lora_down' if which == 'lora_A' else 'lora_up'}.weight"] = value.contiguous()
            tensors[f"{kohya}.alpha"] = torch.tensor(float(config.lora_alpha))
    save_file(tensors, path)
    return path


def images_of(model, lora, steps: int = 2, g: float = 1.5) -> torch.Tensor:
    generator = LCMGenerator.load(str(model), CPU, torch.float32, lora=str(lora))
    return generator(PROMPTS, generator.timesteps(steps), g, SEEDS, 16, 16)


def finetune_unchanged(model, lora, images, out):
    """`lcm finetune --lora` at a learning rate too small to move a float32 weight: the exported LoRA is the given one."""
    assert main(["finetune", "--preset", "tiny", "--model", str(model), "--lora", str(lora), "--adapter", "lora", "--data", str(images),
                 "--lr", "1e-12", "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    return out / "lora"


def diffusers_images(model, lora, scheduler_config: dict | None = None, steps: int = 2, g: float = 1.5) -> torch.Tensor:
    """diffusers' LCM-LoRA recipe: StableDiffusionPipeline + load_lora_weights + LCMScheduler.from_config(its scheduler's)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **(scheduler_config or {}))
    pipe.load_lora_weights(lora)
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=g, height=16, width=16, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def test_a_finetuned_lora_with_another_alpha_than_its_rank_exports_at_its_scale(tiny_sd, images, tmp_path):
    """A diffusers LoRA with lora_alpha = 3r (scale 3), fine-tuned with `lcm finetune --lora` and exported.
    was: the export held the weights but not the adapter config, so `lcm generate --lora` and diffusers' load_lora_weights
    read it with lora_alpha = r: at a third of its scale, images 0.25 off the LoRA's own, silently."""
    lora = save_diffusers_lora(tmp_path / "scaled", peft_loras(tiny_sd, unet_alpha=12))
    exported = finetune_unchanged(tiny_sd, lora, images, tmp_path / "run")
    before, after = images_of(tiny_sd, lora), images_of(tiny_sd, exported)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(diffusers_images(tiny_sd, exported), after.clamp(-1, 1), rtol=1e-5, atol=1e-5)


def test_a_finetuned_kohya_lora_with_text_encoder_layers_exports(tiny_sd, images, tmp_path):
    """A kohya-format LoRA (lora_unet_/lora_te_ keys, alpha tensors) with text-encoder layers, fine-tuned with `lcm finetune
    --lora`: the text-encoder layers stay frozen and go out with the UNet's.
    was: every step trained, then the export crashed with a traceback (KeyError: 'default': the text encoder's adapter, loaded
    by diffusers, is "default_0") and no LoRA was written."""
    lora = save_kohya_lora(tmp_path / "kohya.safetensors", peft_loras(tiny_sd, unet_alpha=8, text_alpha=6))
    exported = finetune_unchanged(tiny_sd, lora, images, tmp_path / "run")
    from safetensors.torch import load_file

    keys = load_file(str(exported / LORA_FILE))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    torch.testing.assert_close(images_of(tiny_sd, exported), images_of(tiny_sd, lora), rtol=0, atol=1e-6)
    # and its text-encoder layers act: the prompt's embedding is not the plain model's
    plain = load_diffusion_model(str(tiny_sd)).prompts.encode(PROMPTS)
    assert (load_lcm_lora(str(tiny_sd), str(exported)).prompts.encode(PROMPTS) - plain).abs().max() > 1e-3


def test_a_lora_weights_file_given_in_its_folder_samples_under_the_folders_scheduler_config(tiny_sd, tmp_path, run_error):
    """`lcm generate --lora RUN/lora/pytorch_lora_weights.safetensors` for an LCM-LoRA distilled with --skip 10
    (original_inference_steps 100, in the folder's scheduler_config.json).
    was: a file path read no scheduler config, so it sampled at diffusers' default T/k = 50: 4 steps at 999, 759, 499, 259
    instead of the folder's 999, 749, 499, 249, other images than `--lora RUN/lora`, silently."""
    from diffusers import LCMScheduler

    from tiny_models import save_tiny_lora

    folder = save_tiny_lora(tmp_path / "lora", tiny_sd)
    LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", original_inference_steps=100).save_config(folder)
    by_folder, by_file = load_lcm_lora(str(tiny_sd), str(folder)), load_lcm_lora(str(tiny_sd), str(folder / LORA_FILE))
    assert by_file.timesteps(4).tolist() == by_folder.timesteps(4).tolist() == [999, 749, 499, 249]
    # A scheduler config of another kind beside a weights file is not the LoRA's: diffusers' default then
    other = tmp_path / "downloads"
    other.mkdir()
    shutil.copy(folder / LORA_FILE, other / "style.safetensors")
    (other / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}))
    model = load_lcm_lora(str(tiny_sd), str(other / "style.safetensors"))
    assert model.scheduler_config["original_inference_steps"] == 50 and model.prediction_type == "epsilon"


def test_an_lcm_lora_on_a_v_prediction_finetune_of_its_teacher_reads_the_models_parameterisation(tiny_sd, tmp_path):
    """An LCM-LoRA of an ε teacher (its folder's scheduler_config.json says epsilon, as `lcm distill --adapter lora` saves it)
    applied to a v-prediction model of the same architecture, the LCM-LoRA's use as an acceleration module for fine-tunes.
    was: the folder's prediction_type (and noise schedule) replaced the model's, so the v-prediction network's output was
    read as ε: images 1.6 off diffusers' recipe (LCMScheduler.from_config(pipe.scheduler.config)), silently."""
    from diffusers import LCMScheduler

    from tiny_models import save_tiny_lora, save_tiny_sd

    v_model = save_tiny_sd(tmp_path / "v-model", prediction_type="v_prediction")
    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                 original_inference_steps=100).save_config(lora)
    model = load_lcm_lora(str(v_model), str(lora))
    assert model.prediction_type == "v_prediction" and model.scheduler_config["original_inference_steps"] == 100
    ours = images_of(v_model, lora, steps=4, g=1.0)
    ref = diffusers_images(v_model, lora, {"original_inference_steps": 100}, steps=4, g=1.0)
    torch.testing.assert_close(ours.clamp(-1, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given", ["weights file", "folder"])
def test_a_lora_runs_checkpoint_given_as_the_lora_says_what_to_give(given, tiny_sd, tmp_path, run_error):
    """`lcm generate --lora RUN/checkpoints/step-N/student.safetensors` (or the step folder): a checkpoint's LoRA student holds
    the adapters as peft names them (no "unet." prefix) and no adapter config.
    was: refused as "a LoRA of another model (other layers or layer names)? Give the LoRA distilled from this model", which it
    is not; now the message names it a training checkpoint and gives the run's exported lora/ folder."""
    from safetensors.torch import load_file, save_file

    from tiny_models import save_tiny_lora

    lora = load_file(str(save_tiny_lora(tmp_path / "lora", tiny_sd) / LORA_FILE))
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    save_file({k.removeprefix("unet."): v for k, v in lora.items()}, step / "student.safetensors")
    (step / "state.json").write_text(json.dumps({"step": 2}))
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(step / "student.safetensors" if given == "weights file" else step),
                           "--out", str(out)])
    assert code == 2 and len(err.splitlines()) == 1 and "training checkpoint" in err and str(tmp_path / "run" / "lora") in err
    assert not out.exists()
