"""The model card (README.md) an export carries: Hub metadata that parses, what the model was made from and how, its ω
response, and usage lines that fit the kind of model. Its diffusers snippet and `lcm generate` line are run on real exports."""

from __future__ import annotations

import ast
import json
import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from huggingface_hub import ModelCard

from latent_consistency.guidance_record import GuidanceRecord
from latent_consistency.training.config import DistillConfig, FinetuneConfig
from latent_consistency.training.model_card import model_card
from tiny_models import sample_as_its_model_card_says, save_tiny_lora, write_captioned_images

RESPONSE = {999: 0.42, 759: 0.71, 499: 0.81, 259: 0.8, 99: 0.59}


def card_of(folder: str, config, record=None, pipeline=None, base=None) -> ModelCard:
    return ModelCard(model_card(Path(folder), config, record, pipeline, base))


def snippets(card: ModelCard) -> tuple[str, list[str]]:
    """The card's Python snippet and its `lcm generate` line, split as a shell would."""
    python = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    command = card.text.split("```sh\n", 1)[1].split("```", 1)[0]
    return python, shlex.split(command)


def test_an_lcm_of_a_hub_teacher_names_it_as_its_base_model_with_its_omega_response():
    config = DistillConfig(teacher="org/sd-model", data="world:shapes", out="runs/x", steps=2000, method="lcd")
    card = card_of("runs/x/lcm", config, GuidanceRecord(1.0, 4.0, 2.0, RESPONSE))
    assert card.data.base_model == "org/sd-model" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "text-to-image" and "latent-consistency-model" in card.data.tags
    assert "ω response at t = 999 / 759 / 499 / 259 / 99: 0.42 / 0.71 / 0.81 / 0.80 / 0.59" in card.text
    assert "[1, 4], sampled at 2 by default" in card.text and "ignores" not in card.text
    python, command = snippets(card)
    assert f'from_pretrained("{os.path.abspath("runs/x/lcm")}")' in python and "num_inference_steps=4, guidance_scale=2)" in python
    assert command[:5] == ["lcm", "generate", "a photo of a cat", "--model", os.path.abspath("runs/x/lcm")]


def test_a_local_teacher_is_no_base_model_and_an_lcm_that_ignores_guidance_says_so():
    config = DistillConfig(teacher="/home/me/models/sd", data="imgs", out="o")
    card = card_of("o/lcm", config, GuidanceRecord(1.0, 2.0, 2.0, {999: 0.0, 499: 0.05}))
    assert card.data.base_model is None and "/home/me/models/sd" in card.text
    assert "It ignores its guidance scale" in card.text


def test_lora_adapters_are_sampled_on_their_base_model_with_their_scheduler():
    config = FinetuneConfig(model="org/sd-model", lora="org/lcm-lora", data="imgs", out="o", adapter="lora")
    card = card_of("o/lora", config)
    assert "lcm-lora" in card.data.tags and card.data.base_model == "org/sd-model"
    assert "latent consistency fine-tuning (LCF" in card.text and "with the LCM-LoRA `org/lcm-lora`" in card.text
    python, command = snippets(card)
    lora = os.path.abspath("o/lora")  # as the `lcm generate` line names it: the snippet runs from any working directory
    assert 'DiffusionPipeline.from_pretrained("org/sd-model")' in python and f'LCMScheduler.from_pretrained("{lora}")' in python
    assert f'load_lora_weights("{lora}")' in python and "guidance_scale=1)" in python
    assert command[command.index("--model") + 1] == "org/sd-model" and command[command.index("--lora") + 1] == os.path.abspath("o/lora")


@pytest.mark.parametrize("method, steps", [("guidance", 25), ("progressive", 8)])
def test_a_guidance_distilled_model_is_sampled_with_ddim_at_its_own_steps(method, steps):
    config = DistillConfig(teacher="t", data="d", out="o", method=method, student_steps=8 if method == "progressive" else 0)
    card = card_of("o/guided", config, GuidanceRecord(1.0, 8.0, 4.5, None))
    assert "guidance-distillation" in card.data.tags and "latent-consistency-model" not in card.data.tags
    python, command = snippets(card)
    assert "DDIMScheduler.from_config" in python and f"num_inference_steps={steps}, guidance_scale=4.5)" in python
    assert command[-4:] == ["--sampler", "ddim", "--steps", str(steps)]


def test_a_pixart_lcm_is_sampled_without_classifier_free_guidance():
    """PixArt's LCM has no ω input: its diffusers pipeline would run classifier-free guidance at g > 1."""
    config = DistillConfig(teacher="t", data="d", out="o", guidance_scale_min=4.5, guidance_scale_max=4.5)
    python, _ = snippets(card_of("o/lcm", config, GuidanceRecord(4.5, 4.5, 4.5, None), "PixArtAlphaPipeline"))
    assert "guidance_scale=0)" in python


def test_paths_with_quotes_and_spaces_stay_one_argument_and_one_string():
    out = "my runs/it's \"here\""
    config = DistillConfig(teacher="t", data="d", out=out)
    python, command = snippets(card_of(f"{out}/lcm", config, GuidanceRecord(1.0, 2.0, 2.0, None)))
    call = next(node for node in ast.walk(ast.parse(python)) if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained")
    assert call.args[0].value == os.path.abspath(f"{out}/lcm") and command[command.index("--model") + 1] == os.path.abspath(f"{out}/lcm")


def test_a_pixart_lcm_card_says_its_guidance_is_built_in_not_an_input():
    """It has no ω input: its card said it takes g as an input and is "sampled at 4.5 by default" while its snippet
    samples at 0 and `lcm generate` at 1 (no classifier-free guidance either way)."""
    config = DistillConfig(teacher="t", data="d", out="o", guidance_scale_min=4.5, guidance_scale_max=4.5)
    card = card_of("o/lcm", config, GuidanceRecord(4.5, 4.5, 4.5, None), "PixArtAlphaPipeline")
    assert "g as an input" not in card.text and "sampled at 4.5" not in card.text
    assert "Distilled at guidance scale g = 4.5, built into the model" in card.text


def test_lcf_of_an_lcm_says_its_range_is_its_lcms_not_trained():
    """LCF (Algorithm 4) has no teacher and teaches no guidance: "g trained on [3, 15]" was not true of it."""
    config = FinetuneConfig(model="org/lcm", data="imgs", out="o")
    card = card_of("o/lcm", config, GuidanceRecord(2.0, 8.0, 4.0, None))
    assert "trained on" not in card.text and "g on [2, 8] (its LCM's ω input: LCF teaches no guidance), sampled at 4" in card.text
    assert "From: the LCM `org/lcm`" in card.text and card.data.base_model == "org/lcm"


def _base(**fields) -> SimpleNamespace:
    """A stand-in for the run's base model with what a card reads of it: an LCF card also states its k and native size."""
    return SimpleNamespace(skip=20, native_size=16, schedule=SimpleNamespace(num_train_timesteps=1000), **fields)


def test_lcf_of_an_lcm_lora_names_its_base_a_model_not_an_lcm_and_tags_it_lora():
    """`finetune --model SD --lora LCM-LoRA`: SD is no LCM (the card said "From: the LCM `SD`"). The Hub knows LoRA
    adapters by the "lora" tag."""
    config = FinetuneConfig(model="org/sd", lora="org/lcm-lora", data="imgs", out="o", adapter="lora")
    card = card_of("o/lora", config, base=_base(time_cond_proj_dim=None, guidance_record=None))
    assert "From: the model `org/sd` with the LCM-LoRA `org/lcm-lora`" in card.text and {"lora", "lcm-lora"} <= set(card.data.tags)


@pytest.mark.parametrize("base_record, g", [(GuidanceRecord(2.0, 6.0, 3.5, None), 3.5), (None, 8)])
def test_lora_adapters_on_an_lcm_are_sampled_at_its_guidance_scale(base_record, g):
    """`finetune --model LCM --adapter lora`: the LCM keeps its ω input, so its diffusers pipeline reads g as ω = g - 1 and
    the card's guidance_scale=1 sampled it unguided, while `lcm generate` samples at the LCM's recorded g (else 8)."""
    config = FinetuneConfig(model="org/lcm", data="imgs", out="o", adapter="lora")
    card = card_of("o/lora", config, base=_base(time_cond_proj_dim=32, guidance_record=base_record))
    python, _ = snippets(card)
    assert f"guidance_scale={g:g})" in python and "classifier-free guidance" not in card.text
    assert "# LoRA for the LCM org/lcm, fine-tuned with LCF" in card.text


KINDS = {
    "pixart": lambda m, data: ["distill", "--teacher", str(m["pixart"]), "--guidance-scale-min", "4.5", "--guidance-scale-max", "4.5"],
    "sdxl-lora": lambda m, data: ["distill", "--teacher", str(m["sdxl"]), "--adapter", "lora", "--skip", "25"],
    "lcf-of-lcm-lora": lambda m, data: ["finetune", "--model", str(m["sd"]), "--lora", str(save_tiny_lora(data.parent / "l", m["sd"])),
                                        "--adapter", "lora"],
    "lcf-lora-on-lcm": lambda m, data: ["finetune", "--model", str(m["lcm"]), "--adapter", "lora"],
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_card_of_each_kind_of_export_samples_in_diffusers_and_lcm_generate_at_one_guidance_scale(
        kind, tiny_sd, tiny_lcm, tiny_sdxl, tiny_pixart, tmp_path):
    """A tiny run of each kind: the card's YAML parses, its diffusers snippet gives a finite image, its `lcm generate`
    line runs, and both sample at the same g (for a model without ω input, both without classifier-free guidance)."""
    from PIL import Image

    from latent_consistency.cli import main

    data, out = write_captioned_images(tmp_path / "images", 4), tmp_path / "run"
    models = {"sd": tiny_sd, "lcm": tiny_lcm, "sdxl": tiny_sdxl, "pixart": tiny_pixart}
    args = KINDS[kind](models, data)
    assert main([args[0], "--preset", "tiny", *args[1:], "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2"]) == 0
    (folder,) = [p for p in out.iterdir() if (p / "README.md").is_file()]
    card, image = sample_as_its_model_card_says(folder, **({"use_resolution_binning": False} if kind == "pixart" else {}))
    assert np.isfinite(np.asarray(image, dtype=float)).all() and card.data.library_name == "diffusers"
    python, command = snippets(card)
    assert command[:2] == ["lcm", "generate"] and main([*command[1:], "--out", str(tmp_path / "images-out")]) == 0
    (png,) = (tmp_path / "images-out").glob("*.png")
    sampled = json.loads(Image.open(png).text["lcm-generate"])["guidance_scale"]
    written = float(python.split("guidance_scale=")[1].split(")")[0])
    assert written == sampled or (kind in ("pixart",) and max(written, sampled) <= 1), (written, sampled)
