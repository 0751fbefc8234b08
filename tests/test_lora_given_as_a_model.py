"""A LoRA given where a command takes a model: the hint fits every command (`lcm distill` has no --lora or --model)."""

import pytest

from tiny_models import save_tiny_lora, write_captioned_images


@pytest.mark.parametrize("command", ["distill", "generate"])
def test_a_lora_given_as_a_model_says_to_give_its_model(command, tiny_sd, tmp_path, run_error):
    # was: "it is a LoRA: give it as --lora, with the model it was distilled from as --model", for `lcm distill --teacher` too
    lora = save_tiny_lora(tmp_path / "lora", tiny_sd)
    argv = {"distill": ["distill", "--teacher", str(lora), "--data", str(write_captioned_images(tmp_path / "images", 2)),
                        "--out", str(tmp_path / "run")],
            "generate": ["generate", "a red star", "--model", str(lora), "--out", str(tmp_path / "images-out")]}[command]
    code, err = run_error(argv)
    assert code == 2 and "it is a LoRA: adapters for the model it was distilled from" in err and "as --model" not in err, err
