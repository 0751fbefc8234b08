"""Reduced precision (`--mixed-precision bf16`): what mixed precision must leave as the user gave it.

Mixed precision runs the frozen networks in half precision; it must not change the weights a run starts from or the
frozen parts it exports (the guide: "the frozen VAE and text encoder go out in float32 like the student")."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from latent_consistency.training.config import FinetuneConfig, resolve_config

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8)


FROZEN_PARTS = {"vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}


def test_a_bf16_distillation_exports_the_teachers_own_vae_and_text_encoder(tiny_sd, image_folder, tmp_path):
    """The VAE and text encoder are frozen: the exported LCM must carry the teacher's weights. Was: they ran in bf16 and
    went out as float32 copies of the bf16-rounded weights (up to 1.7e-3 off the teacher's), a different decoder and text
    encoder than the model distilled from, silently."""
    out = tmp_path / "run"
    # a process of its own: accelerate keeps one mixed-precision setting per process
    run = subprocess.run([sys.executable, "-m", "latent_consistency.cli", "distill", "--preset", "tiny", "--teacher", str(tiny_sd),
                          "--data", str(image_folder), "--out", str(out), "--steps", "1", "--omega-response-samples", "0",
                          "--mixed-precision", "bf16"], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for part, name in FROZEN_PARTS.items():
        teacher, exported = load_file(str(tiny_sd / part / name)), load_file(str(out / "lcm" / part / name))
        assert teacher.keys() == exported.keys()
        changed = [k for k in teacher if not torch.equal(teacher[k], exported[k])]
        assert not changed, f"{part}: {len(changed)} of {len(teacher)} tensors differ from the teacher's, e.g. {changed[0]}"


def test_fine_tuning_an_lcm_lora_in_bf16_starts_from_its_adapters_unrounded(tiny_sd, image_folder, tmp_path):
    """`lcm finetune --model SD --lora LORA --adapter lora --mixed-precision bf16` trains the given LCM-LoRA's adapters in
    float32. Was: the whole UNet copy, adapters included, was cast to bf16 and back, so training started from the LoRA
    rounded to bf16 (up to 1e-3 off), not from the one given."""
    from latent_consistency.training.objectives import objective_of
    from latent_consistency.training.students import make_student
    from tiny_models import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    start = {}
    for precision in ("no", "bf16"):
        config = resolve_config(FinetuneConfig, "tiny", overrides=dict(model=str(tiny_sd), lora=str(lora), data=str(image_folder),
                                                                        out=str(tmp_path / precision), adapter="lora",
                                                                        mixed_precision=precision))
        objective = objective_of(config)
        base = objective.load(config, torch.device("cpu"))
        student = make_student(config, base, objective.scheduler_config(config, base), share_unet=True)
        start[precision] = {n: p.detach().clone() for n, p in student.unet.named_parameters() if p.requires_grad}
    assert start["no"] and start["no"].keys() == start["bf16"].keys()
    assert all(p.dtype == torch.float32 for p in start["bf16"].values())
    changed = [k for k in start["no"] if not torch.equal(start["no"][k], start["bf16"][k])]
    assert not changed, f"{len(changed)} of {len(start['no'])} LoRA tensors start rounded to bf16, e.g. {changed[0]}"

