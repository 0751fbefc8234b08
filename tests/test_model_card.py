"""The model card (README.md) an export carries: Hub metadata that parses, what the model was made from and how, its ω
response, and usage lines that fit the kind of model. Its diffusers snippet is run on real exports in test_distill."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from latent_consistency.guidance_record import GuidanceRecord
from latent_consistency.training.config import DistillConfig, FinetuneConfig
from latent_consistency.training.model_card import model_card

RESPONSE = {999: 0.42, 759: 0.71, 499: 0.81, 259: 0.8, 99: 0.59}


def card_of(folder: str, config, record=None, pipeline=None) -> ModelCard:
    return ModelCard(model_card(Path(folder), config, record, pipeline))


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
    assert 'from_pretrained("runs/x/lcm")' in python and "num_inference_steps=4, guidance_scale=2)" in python
    assert command[:5] == ["lcm", "generate", "a photo of a cat", "--model", "runs/x/lcm"]


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
    assert 'DiffusionPipeline.from_pretrained("org/sd-model")' in python and 'LCMScheduler.from_pretrained("o/lora")' in python
    assert 'load_lora_weights("o/lora")' in python and "guidance_scale=1)" in python
    assert command[command.index("--model") + 1] == "org/sd-model" and command[command.index("--lora") + 1] == "o/lora"


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
    assert call.args[0].value == f"{out}/lcm" and command[command.index("--model") + 1] == f"{out}/lcm"
