"""Model folders a user points `lcm generate`, `serve` and `evaluate` at that hold something else than a loadable pipeline:
weights only as PyTorch pickles or as an fp16 variant, a flow-matching scheduler, parts of different model families, a
training run or a LoRA in place of a pipeline, a pickled LoRA. Each is one line on stderr and exit code 2, before any
output is written (`models.load_diffusion_model`, `models.load_lcm_lora`)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from test_model_inputs import assert_refused, free_port


def _pickle_weights(folder, name):
    """The component's safetensors weights replaced by the same tensors in a PyTorch .bin file."""
    file = folder / name / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(file), file.with_suffix(".bin"))
    file.unlink()


def _fp16_variant(folder, name):
    file = folder / name / "diffusion_pytorch_model.safetensors"
    file.rename(file.with_name("diffusion_pytorch_model.fp16.safetensors"))


def _flow_matching_scheduler(folder):
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))


def _vae_of_16_channels(folder):
    from diffusers import AutoencoderKL

    AutoencoderKL(latent_channels=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(folder / "vae")


def _wider_text_encoder(folder):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict() | {"hidden_size": 64}
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(folder / "text_encoder")


def _text_encoder_of_a_smaller_vocabulary(folder):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(folder / "text_encoder").to_dict() | {"vocab_size": 20, "bos_token_id": 0, "eos_token_id": 1,
                                                                                  "pad_token_id": 1}
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(folder / "text_encoder")


def _epsilon_at_zero_terminal_snr(folder):
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"rescale_betas_zero_snr": True}))  # the tiny LCM predicts ε


def _sdxl_refiner(folder):
    """What a StableDiffusionXLImg2ImgPipeline refiner's folder holds: no first text encoder, aesthetic-score conditioning."""
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None], "tokenizer": [None, None],
              "requires_aesthetics_score": True}
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder")


# What is done to a copy of the tiny LCM, and words the one-line message must hold
BROKEN = {
    "unet weights only as a .bin": (lambda f: _pickle_weights(f, "unet"), ["diffusion_pytorch_model.bin", "safetensors"]),
    "vae weights only as an fp16 variant": (lambda f: _fp16_variant(f, "vae"), ["diffusion_pytorch_model.fp16.safetensors", "variant"]),
    "a flow-matching scheduler": (_flow_matching_scheduler, ["FlowMatchEulerDiscreteScheduler", "noise schedule"]),
    "a vae of 16 latent channels": (_vae_of_16_channels, ["16-channel latents", "4-channel"]),
    "a text encoder of another width": (_wider_text_encoder, ["64-wide", "32"]),
    "a text encoder of a smaller vocabulary": (_text_encoder_of_a_smaller_vocabulary, ["text encoder of 20", "tokenizer"]),
    "ε at zero terminal SNR": (_epsilon_at_zero_terminal_snr, ["predicts ε on a zero-terminal-SNR schedule", "predict v"]),
    "an SDXL refiner": (_sdxl_refiner, ["SDXL refiner", "give the SDXL base model"]),  # was: "text_encoder/ is missing"
}


def broken_copy(model, tmp_path, case):
    folder = shutil.copytree(model, tmp_path / "broken")
    BROKEN[case][0](folder)
    return folder


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_generate_refuses_a_model_folder_it_cannot_load(case, tiny_lcm, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a red star", "--model", str(broken_copy(tiny_lcm, tmp_path, case)), "--out", str(out)])
    assert_refused(code, err, out, *BROKEN[case][1])


def test_serve_refuses_parts_of_different_families_before_it_serves(tiny_lcm, tmp_path, run_error):
    code, err = run_error(["serve", "--model", str(broken_copy(tiny_lcm, tmp_path, "a vae of 16 latent channels")),
                           "--port", str(free_port())])
    assert code == 2 and len(err.splitlines()) == 1 and "16-channel latents" in err, err


def test_evaluate_refuses_a_teacher_with_a_flow_matching_scheduler(tiny_sd, tiny_lcm, tmp_path, run_error):
    teacher = broken_copy(tiny_sd, tmp_path, "a flow-matching scheduler")
    out = tmp_path / "out"
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), "--teacher", str(teacher), "--prompts", "world:shapes",
                           "--steps", "1", "--out", str(out)])
    assert_refused(code, err, out, "FlowMatchEulerDiscreteScheduler")


def _run_folder(tmp_path, tiny_lcm, exported):
    run = tmp_path / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    if exported:
        shutil.copytree(tiny_lcm, run / "lcm")
    return run


@pytest.mark.parametrize("exported", [True, False])
def test_a_training_run_folder_as_the_model_points_at_its_export(exported, tiny_lcm, tmp_path, run_error):
    run = _run_folder(tmp_path, tiny_lcm, exported)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(run), "--out", str(out)])
    assert_refused(code, err, out, "training run", str(run / "lcm") if exported else "has exported no model yet")


def test_a_lora_folder_as_the_model_is_told_to_be_given_as_lora(tiny_sd, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "LoRA", "--lora")


def test_a_component_folder_as_the_model_points_at_its_pipeline(tiny_lcm, tmp_path, run_error):
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_lcm / "unet"), "--out", str(out)])
    assert_refused(code, err, out, "the unet/ folder of a pipeline", str(tiny_lcm))


@pytest.mark.parametrize("given", ["folder", "file"])
def test_a_pickled_lora_is_refused_as_pickled_model_weights_are(given, tiny_sd, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    file = lora / "pytorch_lora_weights.safetensors"
    torch.save(load_file(file), lora / "pytorch_lora_weights.bin")
    file.unlink()
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora if given == "folder" else lora / "pytorch_lora_weights.bin"),
                           "--out", str(out)])
    assert_refused(code, err, out, "pytorch_lora_weights.bin", "safetensors")


def _preview_decoder(tmp_path, edit):
    """The tiny AutoencoderTiny of test_preview_decoder, its weights file edited (`edit`: the file -> None)."""
    from test_preview_decoder import save_tiny_autoencoder

    folder = save_tiny_autoencoder(tmp_path / "taesd")
    edit(folder / "diffusion_pytorch_model.safetensors")
    return folder


def _pickled(file):
    torch.save(load_file(file), file.with_suffix(".bin"))
    file.unlink()


def _without_a_decoder_tensor(file):
    from safetensors.torch import save_file

    tensors = load_file(file)
    del tensors["decoder.layers.6.weight"]
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize(("edit", "words"), [(_pickled, ["holds its weights only as diffusion_pytorch_model.bin, a PyTorch pickle", "safetensors"]),
                                             (_without_a_decoder_tensor, ["lack 1 tensor(s)", "decoder.layers.6.weight"])],
                         ids=["weights only as a .bin", "weights without a tensor"])
def test_a_preview_decoder_whose_weights_do_not_load(edit, words, tiny_lcm, tmp_path, run_error):
    decoder = _preview_decoder(tmp_path, edit)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_lcm), "--preview-decoder", str(decoder), "--out", str(out)])
    assert_refused(code, err, out, *words)


def test_an_sdxl_second_text_encoder_of_another_pooled_width(tmp_path, run_error):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tiny_models import save_tiny_sdxl

    folder = save_tiny_sdxl(tmp_path / "sdxl")
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2").to_dict() | {"projection_dim": 16}
    CLIPTextModelWithProjection(CLIPTextConfig(**config)).save_pretrained(folder / "text_encoder_2")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(folder), "--sampler", "ddim", "--out", str(out)])
    assert_refused(code, err, out, "16-wide pooled embeddings", "32-wide")


@pytest.mark.parametrize(("file", "words"), [("lora", ["LoRA file", "--lora"]), ("checkpoint", ["single-file checkpoint", "from_single_file"])])
def test_a_weights_file_as_the_model_says_what_to_give(file, words, tiny_sd, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    given = save_tiny_lora(tmp_path / "lora", tiny_sd) / "pytorch_lora_weights.safetensors"
    if file == "checkpoint":
        given = shutil.copy(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "model.safetensors")
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(given), "--out", str(out)])
    assert_refused(code, err, out, *words)


@pytest.mark.parametrize(("given", "words"), [("pipeline", ["pipeline folder, not a LoRA", "--model"]), ("run", ["training run", "lora"])])
def test_a_pipeline_or_a_run_as_the_lora_says_what_to_give(given, words, tiny_sd, tiny_lcm, tmp_path, run_error):
    from tiny_models import save_tiny_lora

    lora = tiny_lcm
    if given == "run":
        lora = _run_folder(tmp_path, tiny_lcm, exported=False)
        save_tiny_lora(lora / "lora", tiny_sd)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, *words)
