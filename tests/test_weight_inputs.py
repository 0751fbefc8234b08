"""Weights that only partly fit their model: a LoRA with tensors for layers the model lacks or shapes it does not have, a
component's weights file with tensors its config.json's model does not have. diffusers drops such tensors with a logged
warning (off in the CLI), so each was a silent partial load; now one line on stderr and exit code 2, before any output is
written (`models.load_lcm_lora`, `models.load_component`)."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_model_inputs import assert_refused

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 4)


def lora_of_another_unet(tmp_path, model, **unet_changes):
    """A LoRA (`tiny_models.save_tiny_lora`) of `model` with its UNet's config changed: another model's LoRA."""
    from diffusers import UNet2DConditionModel

    from tiny_models import save_tiny_lora

    other = shutil.copytree(model, tmp_path / "other-model")
    config = UNet2DConditionModel.load_config(other, subfolder="unet")
    UNet2DConditionModel.from_config({**config, **unet_changes}).save_pretrained(other / "unet")
    return save_tiny_lora(tmp_path / "lora", other)


def edited_lora(tmp_path, model, edit):
    """`model`'s own LoRA with its tensors (a dict by key) edited."""
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", model)
    save_file(edit(load_file(lora / LORA_FILE)), lora / LORA_FILE, metadata={"format": "pt"})
    return lora


def lora_command(command, model, lora, images, out):
    if command == "generate":
        return ["generate", "a red star", "--model", str(model), "--lora", str(lora), "--out", str(out)]
    return ["evaluate", "--lcm", str(model), "--lora", str(lora), "--prompts", str(images), "--steps", "1", "--out", str(out)]


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_a_lora_with_layers_the_model_lacks(command, tiny_sd, images, tmp_path, run_error):
    """A LoRA of a UNet with two layers per block: its second layers' 32 tensors were dropped, the other 64 loaded."""
    lora = lora_of_another_unet(tmp_path, tiny_sd, layers_per_block=2)
    out = tmp_path / "out"
    code, err = run_error(lora_command(command, tiny_sd, lora, images, out))
    assert_refused(code, err, out, "32 of its 96 tensors", "unet.down_blocks.1.attentions.1.", "does not fit")


def test_a_lora_with_other_layer_names(tiny_sd, tmp_path, run_error):
    lora = edited_lora(tmp_path, tiny_sd, lambda tensors: {k.replace("to_q.", "to_query."): v for k, v in tensors.items()})
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "16 of its 64 tensors", ".to_query.lora_")


def test_a_lora_for_a_text_encoder_the_model_lacks(tiny_sd, tmp_path, run_error):
    """An SDXL LoRA's text_encoder_2 layers on SD 1.5 (one text encoder): diffusers loads none of them, without a word."""
    extra = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    lora = edited_lora(tmp_path, tiny_sd, lambda tensors: tensors | {extra: torch.zeros(4, 32)})
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "1 of its 65 tensors", extra)


def test_a_lora_with_text_encoder_layers_the_model_lacks(tiny_sd, tmp_path, run_error):
    """Layer 7's q_proj of a text encoder with 2 layers; layer 0's loads (that part of the text encoder path works)."""
    layer = "text_encoder.encoder.layers.{}.self_attn.q_proj.lora_{}.weight"
    extra = {layer.format(i, "A"): torch.ones(4, 32) for i in (0, 7)} | {layer.format(i, "B"): torch.ones(32, 4) for i in (0, 7)}
    lora = edited_lora(tmp_path, tiny_sd, lambda tensors: tensors | extra)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "2 of its 68 tensors", "text_encoder.encoder.layers.7.self_attn.q_proj.lora_")


def test_a_lora_with_a_text_encoder_layer_of_another_width(tiny_sd, tmp_path, run_error):
    """transformers raises without naming the tensor ("look at the above report", a log the CLI keeps quiet)."""
    layer = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_{}.weight"
    extra = {layer.format("A"): torch.ones(4, 16), layer.format("B"): torch.ones(32, 4)}  # q_proj takes 32 features, not 16
    lora = edited_lora(tmp_path, tiny_sd, lambda tensors: tensors | extra)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "1 of its 66 tensors", f"(e.g. {layer.format('A')})", "other shapes")


def test_a_lora_whose_text_encoder_part_has_no_lora_b(tiny_sd, tmp_path, run_error):
    """diffusers reads a part's rank from its lora_B tensors: without any, an IndexError (a traceback before)."""
    extra = {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32)}
    lora = edited_lora(tmp_path, tiny_sd, lambda tensors: tensors | extra)
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "cannot load the LoRA")


def test_a_lora_of_other_block_widths(tiny_sd, tmp_path, run_error):
    """block_out_channels (32, 32) for (32, 64): the second block's and the middle's tensors have other shapes. The message
    counts them and names one (before: a line with neither)."""
    lora = lora_of_another_unet(tmp_path, tiny_sd, block_out_channels=(32, 32))
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(tiny_sd), "--lora", str(lora), "--out", str(out)])
    assert_refused(code, err, out, "56 of its 64 tensors", "(e.g. unet.down_blocks.1.", ".lora_A.weight)", "other shapes")


def with_a_stray_tensor(model, tmp_path, component):
    folder = shutil.copytree(model, tmp_path / "model")
    name = "diffusion_pytorch_model.safetensors" if component in ("unet", "vae") else "model.safetensors"
    weights = folder / component / name
    save_file(load_file(weights) | {"stray.weight": torch.zeros(3)}, weights, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_weights_with_a_tensor_their_config_lacks(component, tiny_lcm, tmp_path, run_error):
    """diffusers' from_pretrained only logs "weights ... were not used" (transformers likewise): the file is another model's."""
    out = tmp_path / "out"
    code, err = run_error(["generate", "a", "--model", str(with_a_stray_tensor(tiny_lcm, tmp_path, component)), "--out", str(out)])
    assert_refused(code, err, out, f"the {component} weights of", "1 tensor(s)", "stray.weight", "different models")


def test_a_teacher_unet_with_a_tensor_its_config_lacks(tiny_sd, images, tmp_path, run_error):
    """The check is the loader's: distill's teacher is refused as generate's model is."""
    out = tmp_path / "out"
    teacher = with_a_stray_tensor(tiny_sd, tmp_path, "unet")
    code, err = run_error(["distill", "--preset", "tiny", "--teacher", str(teacher), "--data", str(images), "--out", str(out)])
    assert_refused(code, err, out, "the unet weights of", "stray.weight")


def checkpoint_edits():
    def drop(tensors):
        return dict(list(tensors.items())[1:])

    def add(tensors):
        return {**tensors, "down_blocks.9.extra.weight": torch.zeros(2)}

    def reshape(tensors):
        name, tensor = next(iter(tensors.items()))
        return {**tensors, name: torch.zeros(*tensor.shape, 2)}

    return {"a tensor left out": (drop, "lacks 1 of the student's tensors"), "an extra tensor": (add, "down_blocks.9.extra.weight"),
            "another shape": (reshape, "of shape")}


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("edit", list(checkpoint_edits()))
def test_resume_refuses_a_checkpoint_that_does_not_fit_the_student(adapter, edit, tiny_sd, images, tmp_path, run_error):
    """A checkpoint whose student tensors do not fit the run's student (another rank, adapter set or model) was half loaded
    (LoRA: peft skips what does not fit) or a traceback (full); now one line and exit 2, the checkpoint kept."""
    change, words = checkpoint_edits()[edit]
    out = tmp_path / "run"
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--out", str(out), "--adapter", adapter]
    assert run_error([*argv, "--steps", "2"])[0] == 0
    weights = out / "checkpoints" / "step-0000002" / "student.safetensors"
    save_file(change(load_file(weights)), weights)
    edited = load_file(weights)
    code, err = run_error([*argv, "--steps", "4", "--resume"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert words in err and "checkpoint of another model" in err and "step-0000002" in err, err
    assert load_file(weights).keys() == edited.keys() and not (out / "checkpoints" / "step-0000004").exists()
