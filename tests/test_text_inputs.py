"""Text a user gives (prompts on the command line, prompt files, captions) that is not plain UTF-8, and the checks of
`lcm generate` and `lcm evaluate` that must come before anything costly: one line and exit 2, or a counted skip."""

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

from latent_consistency.cli import evaluate, generate
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.errors import UserError
from latent_consistency.prompts import check_prompt, read_prompt_file

BOM = b"\xef\xbb\xbf"


def fails_in_one_line(run_error, argv, message):
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("where", [[], ["--prompt"], ["--negative-prompt", "a blue circle"]])
def test_a_prompt_of_bytes_that_are_not_utf8_is_one_line(tiny_lcm, tmp_path, run_error, where):
    # Python gives a command-line byte that is not UTF-8 as a lone surrogate, which the tokenizer refuses with a TypeError
    bad = "a red \udcff star"
    argv = ["a red star", "--negative-prompt", bad] if where == ["--negative-prompt", "a blue circle"] else [*where, bad]
    out = tmp_path / "out"
    fails_in_one_line(run_error, ["generate", *argv, "--model", str(tiny_lcm), "--out", str(out)], "byte 0xff at character 7")
    assert not out.exists()


def test_standard_input_that_is_not_utf8_is_one_line(tiny_lcm, tmp_path, run_error, monkeypatch):
    # as Python opens standard input: the locale's encoding with surrogateescape
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="surrogateescape"))
    fails_in_one_line(run_error, ["generate", "--prompt-file", "-", "--model", str(tiny_lcm), "--out", str(tmp_path / "out")],
                      "prompt file - is not UTF-8 text (byte 0xe9 on line 1)")


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(BOM + "a red star\ncafé\n".encode())
    assert generate.read_prompts([], str(prompts)) == ["a red star", "café"]
    assert evaluate.read_items(str(prompts), 16, 10) == [{"caption": "a red star"}, {"caption": "café"}]


def test_a_file_of_only_a_byte_order_mark_holds_no_prompts(tiny_lcm, tmp_path, run_error):
    (tmp_path / "bom.txt").write_bytes(BOM + b"\n")
    out = tmp_path / "out"
    fails_in_one_line(run_error, ["generate", "--prompt-file", str(tmp_path / "bom.txt"), "--model", str(tiny_lcm), "--out", str(out)],
                      "holds no prompts")
    assert not out.exists()


def test_prompt_helpers(monkeypatch):
    assert check_prompt("café ☆", "prompt 1") == "café ☆"
    with pytest.raises(UserError, match="prompt 2 is not UTF-8 text .lone surrogate U\\+D800 at character 1"):
        check_prompt("\ud800", "prompt 2")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("a red star".encode("utf-16"))))  # Windows Notepad's "Unicode"
    with pytest.raises(UserError, match="prompt file - is not UTF-8 text .byte 0xff on line 1"):
        read_prompt_file("-")


@pytest.fixture
def image_folder(tmp_path):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path / "images", 4)


def test_evaluate_a_latin1_prompt_file_is_one_line(tiny_lcm, image_folder, tmp_path, run_error):
    (tmp_path / "latin.txt").write_bytes(b"a red star\ncaf\xe9\n")
    fails_in_one_line(run_error, ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(tmp_path / "latin.txt"), "--reference",
                                  str(image_folder), "--out", str(tmp_path / "out"), "--clip", "x"],
                      "is not UTF-8 text (byte 0xe9 on line 2)")


def test_evaluate_prompt_files_by_suffix_in_any_case_and_folders_named_txt(tmp_path, image_folder):
    (tmp_path / "PROMPTS.TXT").write_text("a red star\na blue circle\n")
    assert evaluate.read_items(str(tmp_path / "PROMPTS.TXT"), 16, 10) == [{"caption": "a red star"}, {"caption": "a blue circle"}]
    named_txt = image_folder.rename(tmp_path / "images.txt")  # an image folder, whatever its name
    assert [it["caption"] for it in evaluate.read_items(str(named_txt), 16, 2)] == ["a red star number 0", "a red star number 1"]
    (tmp_path / "empty.txt").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        evaluate.read_items(str(tmp_path / "empty.txt"), 16, 2)


@pytest.mark.parametrize("case", ["one prompt, a large reference", "one sample"])
def test_evaluate_too_few_generated_images_names_the_prompts(case, tiny_lcm, image_folder, tmp_path, run_error):
    (tmp_path / "one.txt").write_text("a red star\n")
    prompts = {"one prompt, a large reference": ["--prompts", str(tmp_path / "one.txt"), "--reference", str(image_folder)],
               "one sample": ["--prompts", str(image_folder), "--samples", "1"]}[case]
    code, err = run_error(["evaluate", "--lcm", str(tiny_lcm), *prompts, "--out", str(tmp_path / "out"), "--clip", "x"])
    assert code == 2 and "FID needs at least 2 generated images" in err and "--images-per-prompt 1 make 1" in err, err
    assert "--reference" not in err and "real images" not in err
    # the fix it names passes the check: the next error is that no metric is asked for
    fails_in_one_line(run_error, ["evaluate", "--lcm", str(tiny_lcm), *prompts, "--images-per-prompt", "2", "--out", str(tmp_path / "out")],
                      "no metric to compute")


@pytest.mark.parametrize("argv, message", [
    (["--guidance-scale", "1e6"], "argument --guidance-scale: 1e+06 is out of range (guidance scales in (0, 30])"),
    (["--guidance-scales", "2,31"], "argument --guidance-scales: 31 is out of range"),
    (["--steps", "1,0"], "argument --steps: must be at least 1, got 0"),
])
def test_evaluate_guidance_scales_and_steps_have_one_range(argv, message, run_error):
    fails_in_one_line(run_error, ["evaluate", *argv], message)


def test_evaluate_checks_steps_before_making_the_out_folder(tiny_lcm, image_folder, tmp_path, run_error):
    out = tmp_path / "out"
    fails_in_one_line(run_error, ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--steps", "2,99",
                                  "--out", str(out)], "steps must be between 1 and 50")
    assert not out.exists()


def test_generate_caps_the_negative_scale_as_the_api_does(tiny_lcm, tmp_path, run_error):
    fails_in_one_line(run_error, ["generate", "a", "--negative-prompt", "b", "--negative-scale", "1e300", "--model", str(tiny_lcm),
                                  "--out", str(tmp_path / "out")], "--negative-scale 1e+300 is above 30")


def test_generate_checks_the_size_before_resizing_the_init_image(tiny_lcm, tmp_path, run_error, monkeypatch):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    read = []
    monkeypatch.setattr(generate, "read_init_image", lambda *a: read.append(a))
    out = tmp_path / "out"
    fails_in_one_line(run_error, ["generate", "a", "--model", str(tiny_lcm), "--init-image", str(tmp_path / "init.png"),
                                  "--height", "4000", "--width", "4000", "--out", str(out)], "--height 4000 is more than 8x")
    assert read == [] and not out.exists()


def write_image(path):
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(path)


def test_sidecar_captions_are_utf8_with_or_without_a_bom_and_others_are_counted(tmp_path):
    captions = {"plain": b"a red star", "bom": BOM + "a blue circle, café".encode(),
                "utf16": "a green square".encode("utf-16"), "latin1": "café".encode("latin-1")}
    for name, data in captions.items():
        write_image(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(data)
    dataset = ImageFolderDataset(tmp_path, 16)
    assert sorted(dataset.samples) == [("bom.png", "a blue circle, café"), ("plain.png", "a red star")]
    assert dataset.skipped.counts == {"bad_caption": 2}


def test_metadata_lines_that_are_not_utf8_or_hold_surrogates_are_counted(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"{i}.png")
    lines = [BOM + json.dumps({"file_name": "0.png", "text": "a red star"}).encode(),
             json.dumps({"file_name": "1.png", "text": "caf\xe9"}, ensure_ascii=False).encode("latin-1"),
             json.dumps({"file_name": "2.png", "text": "a \ud800 star"}).encode(),  # the JSON escape \ud800
             json.dumps({"file_name": "3.png", "text": "café"}, ensure_ascii=False).encode()]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    dataset = ImageFolderDataset(tmp_path, 16)
    assert dataset.samples == [("0.png", "a red star"), ("3.png", "café")]
    assert dataset.skipped.counts == {"bad_metadata": 1, "bad_caption": 1, "no_caption": 1}  # 1.png, whose line is unread
