"""`lcm evaluate --style-lora FILE[:W]`: the LCM scored with the style LoRAs `lcm generate --style-lora` samples it with
(was: no such option, so the combination a user samples with could not be measured). The LCM's rows carry them and the
teacher's do not; the report names them; a rerun with other style LoRAs or weights does not reuse the rows; a wrong
--style-lora is generate's one line, exit 2, no --out made."""

import json

import pytest
import torch

from latent_consistency.cli.evaluate import style_identities
from test_evaluate_inputs import Linear  # the FID Inception stand-in
from test_ignored_options import refused


@pytest.fixture(scope="module")
def styled(tiny_sd, tmp_path_factory):
    """The tiny teacher, an LCM-LoRA of it, a style LoRA for it, prompts, real images and an Inception stand-in."""
    from tiny_models import save_tiny_lora, write_captioned_images

    folder = tmp_path_factory.mktemp("styled")
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(folder / "inception.pt"))
    (folder / "prompts.txt").write_text("a red star\na blue ring\n")
    return dict(sd=tiny_sd, lora=save_tiny_lora(folder / "lcm-lora", tiny_sd, seed=1), style=save_tiny_lora(folder / "style", tiny_sd, seed=5),
                prompts=folder / "prompts.txt", images=write_captioned_images(folder / "images", 4), inception=folder / "inception.pt")


def evaluate(styled, out, *extra) -> list[str]:
    """The LCM-LoRA on the teacher, and the teacher's rows beside it: Luo et al. 2023b's acceleration module."""
    return ["evaluate", "--lcm", str(styled["sd"]), "--lora", str(styled["lora"]), "--teacher", str(styled["sd"]),
            "--prompts", str(styled["prompts"]), "--reference", str(styled["images"]), "--inception", str(styled["inception"]),
            "--steps", "1", "--out", str(out), "--device", "cpu", *extra]


def rows(out) -> dict[str, dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def test_the_style_lora_is_on_the_lcm_rows_only_named_in_the_report_and_part_of_what_a_rerun_matches(styled, tmp_path, run_error):
    """was: `--style-lora` unrecognised (exit 2). Now the LCM's rows score the styled LCM (other numbers than without it)
    and the teacher's the teacher as it is (the same numbers: the style LoRA does not leak onto the teacher loaded from the
    same folder); report.md says which style LoRA at which weight. The same command continues; another weight, or no
    style LoRA, is another evaluation, refused with results.json kept."""
    styled_out, plain_out = tmp_path / "styled", tmp_path / "plain"
    style = f"{styled['style']}:0.7"
    code, err = run_error(evaluate(styled, styled_out, "--style-lora", style))
    assert code == 0, err
    assert run_error(evaluate(styled, plain_out))[0] == 0
    with_style, without = rows(styled_out), rows(plain_out)
    assert with_style.keys() == without.keys()
    for key in with_style:
        same = with_style[key]["inception_fid"] == without[key]["inception_fid"]
        assert same == (with_style[key]["sampler"] != "lcm"), key
    report = (styled_out / "report.md").read_text()
    assert f"style LoRA `{styled['style']}` at weight 0.7 (on the LCM's rows only)" in report
    assert "style LoRA" not in (plain_out / "report.md").read_text()

    results = (styled_out / "results.json").read_text()
    assert run_error(evaluate(styled, styled_out, "--style-lora", style))[0] == 0  # resumed: every row kept as it was
    assert (styled_out / "results.json").read_text() == results
    for other in (["--style-lora", f"{styled['style']}:0.5"], []):
        code, err = run_error(evaluate(styled, styled_out, *other))
        assert code == 2 and "another evaluation" in err.splitlines()[-1], err
        assert (styled_out / "results.json").read_text() == results


@pytest.mark.parametrize("style, message", [("", "--style-lora is empty"), ("STYLE:heavy", "'heavy' after the colon is not a weight"),
                                            ("STYLE:nan", "the weight must be a finite number"),
                                            ("missing.safetensors", "LoRA missing.safetensors does not exist")])
def test_a_wrong_style_lora_is_generates_one_line_and_makes_no_out(styled, tmp_path, run_error, style, message):
    """The syntax and checks of `lcm generate --style-lora` (`parse_style_lora`, `models.add_style_loras`)."""
    style = style.replace("STYLE", str(styled["style"]))
    out = tmp_path / "out"
    refused(run_error, evaluate(styled, out, "--style-lora", style), message, out)


def test_a_style_lora_before_sweep_is_refused(styled, tmp_path, run_error):
    """`lcm evaluate sweep` scores distillation checkpoints on the world: a style LoRA given before it would do nothing."""
    out = tmp_path / "sweep"
    refused(run_error, ["evaluate", "--style-lora", str(styled["style"]), "sweep", "--runs", str(tmp_path), "--out", str(out)],
            "--style-lora is an option of `lcm evaluate` itself, given before `sweep`", out)


def test_style_identities_name_each_file_and_weight_in_order_and_nothing_without_one(styled):
    """What the fingerprint adds: nothing without style LoRAs (an evaluation from before --style-lora still continues),
    and each style LoRA's file and exact weight, in order."""
    one, other = str(styled["style"]), str(styled["lora"])
    assert style_identities([]) == ()
    assert len({style_identities([(one, 0.7)]), style_identities([(one, 0.7000001)]), style_identities([(other, 0.7)]),
                style_identities([(one, 0.7), (other, 1.0)]), style_identities([(other, 1.0), (one, 0.7)])}) == 5
    assert style_identities([(one, 1.0)]) == style_identities([(f"{one}/", 1.0)])  # the same folder however it is spelled
