"""`lcm generate`'s file names for prompts in any script, and an image folder's scan named once in a training run's log.

was: a name kept the prompt's ASCII letters and digits alone ("ein Hund über der Brücke" -> 0000-ein-hund-ber-der-br-cke.png,
"猫が座っている" -> 0000-image.png); and with --eval-fraction the data folder's scan was logged twice, once for each side of
the split."""

import logging
import os
import random
import re
import unicodedata
from contextlib import contextmanager

import pytest
from PIL import Image

from latent_consistency.cli.generate import RECORD_KEY, earlier_image_filename, image_filename, output_files
from latent_consistency.data.holdout import Holdout
from latent_consistency.data.spec import open_dataset
from latent_consistency.errors import UserError
from tiny_models import write_captioned_images

GERMAN, JAPANESE, HINDI = "ein Hund über der Brücke", "猫が座っている", "हिन्दी में एक बिल्ली"
FORBIDDEN = '/\\:*?"<>|'


def old_image_filename(index: int, prompt: str) -> str:
    """The name before this change, as it was written: ASCII letters and digits only."""
    return f"{index:04d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:60].rstrip('-') or 'image'}.png"


# --- lcm generate: file names ---

def test_a_prompt_in_any_script_keeps_its_words_in_the_name():
    assert image_filename(0, GERMAN) == "0000-ein-hund-über-der-brücke.png"
    assert image_filename(1, JAPANESE) == "0001-猫が座っている.png"
    assert image_filename(2, HINDI) == "0002-हिन्दी-में-एक-बिल्ली.png"  # the vowel signs (combining marks) kept with their letters
    names = {image_filename(0, prompt) for prompt in (JAPANESE, "犬が走っている", "鳥が飛んでいる", "!!!")}
    assert len(names) == 4  # were all 0000-image.png


def test_a_name_is_one_spelling_of_its_prompt():
    # NFKC: an "ü" typed as u + combining diaeresis (macOS's NFD), full-width letters and ligatures name as their plain forms
    assert image_filename(0, unicodedata.normalize("NFD", GERMAN)) == image_filename(0, GERMAN)
    assert image_filename(0, "Ａ ＲＥＤ ｓｔａｒ") == "0000-a-red-star.png"
    assert image_filename(0, "ﬁsh") == "0000-fish.png"


def test_what_a_file_system_forbids_and_whitespace_become_one_dash():
    prompt = "猫" + "".join(f"{c}x" for c in FORBIDDEN) + "\x00\x1f\x7f\u202e\t\n\u3000y"
    name = image_filename(0, prompt)
    assert name == "0000-猫-" + "x-" * len(FORBIDDEN) + "y.png"
    assert not set(name) & set(FORBIDDEN) and name.isprintable()


@pytest.mark.parametrize("character", ["é", "猫", "𠀀"])  # 2, 3 and 4 bytes of UTF-8
def test_a_long_prompt_names_well_under_255_bytes_cut_at_a_characters_end(character):
    for prompt in (character * 300, "a" + character * 300, "ab" + character * 300):
        name = image_filename(9999, prompt)
        assert len(name.encode()) <= len("9999-") + 120 + len(".png")  # under eCryptfs's 143 too
        assert set(name.removeprefix("9999-").removesuffix(".png")) <= set(prompt)  # no half character
    assert image_filename(0, "é" * 100) == "0000-" + "é" * 60 + ".png"  # 60 characters, as an ASCII prompt's


def test_an_ascii_prompt_names_its_image_as_before_byte_for_byte():
    rng = random.Random(0)
    prompts = ["A red star!", "a large red star at the top left", "a" * 59 + " b" + "c" * 10, "!!!", " -x- ", "A_B", "x" * 61]
    prompts += ["".join(rng.choice([chr(i) for i in range(128)]) for _ in range(rng.randrange(1, 90))) for _ in range(2000)]
    for i, prompt in enumerate(prompts):
        assert image_filename(i, prompt) == old_image_filename(i, prompt), repr(prompt)
    assert earlier_image_filename(0, "a" * 59 + " b") == "0000-" + "a" * 59 + "-.png"


def test_an_image_an_earlier_version_named_in_ascii_is_found_as_this_runs(tmp_path):
    # a run of the earlier version killed midway: --skip-existing keeps its images, not a second copy under the new names
    out = tmp_path / "images"
    out.mkdir()
    cut_after_dash = "ü " + "a" * 59 + " b"  # its ASCII name's 60 characters ended at a "-", which the earlier version dropped
    prompts = [GERMAN, JAPANESE, cut_after_dash, "a red star"]
    for i in (0, 1, 2):
        Image.new("RGB", (8, 8)).save(out / old_image_filename(i, prompts[i]))
    files, kept = output_files(str(out), prompts, skip_existing=True)
    assert [f.name for f in files] == ["0000-ein-hund-ber-der-br-cke.png", "0001-image.png", "0002-" + "a" * 59 + ".png",
                                       "0003-a-red-star.png"] and kept == {0, 1, 2}
    with pytest.raises(UserError, match="already holds 0000-ein-hund-ber-der-br-cke.png and 2 more"):
        output_files(str(out), prompts)
    assert [f.name for f in output_files(str(tmp_path / "new"), prompts)[0]] == [image_filename(i, p) for i, p in enumerate(prompts)]


def test_a_name_a_disk_lists_decomposed_is_this_runs(tmp_path, monkeypatch):
    # macOS's HFS+ lists 0000-ein-hund-über-….png with its "ü" decomposed (NFD): still this run's image, not written over
    out = tmp_path / "images"
    out.mkdir()
    name = image_filename(0, GERMAN)
    Image.new("RGB", (8, 8)).save(out / name)
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda folder: [unicodedata.normalize("NFD", n) for n in listdir(folder)])
    with pytest.raises(UserError, match=f"already holds {name}"):
        output_files(str(out), [GERMAN])


def test_lcm_generate_writes_prompts_of_any_script_under_their_names(tiny_lcm, run_error, tmp_path):
    out = tmp_path / "images"
    code, err = run_error(["generate", GERMAN, JAPANESE, "--model", str(tiny_lcm), "--out", str(out), "--height", "16", "--width", "16",
                           "--device", "cpu"])
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["0000-ein-hund-über-der-brücke.png", "0001-猫が座っている.png"]
    assert '"prompt": "猫が座っている"' in Image.open(out / "0001-猫が座っている.png").text[RECORD_KEY]


# --- an image folder's scan, named once in the log ---

@contextmanager
def logged():
    """The lines the data logs meanwhile (pytest's caplog is off under -p no:logging)."""
    lines, logger = [], logging.getLogger("latent_consistency.data")
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def folder_with_an_uncaptioned_image(folder):
    write_captioned_images(folder, 8)
    Image.new("RGB", (16, 16)).save(folder / "uncaptioned.png")
    return folder


def test_the_two_sides_of_a_held_out_split_log_the_folders_scan_once(tmp_path):
    folder = folder_with_an_uncaptioned_image(tmp_path / "data")
    with logged() as lines:
        sides = [open_dataset(str(folder), 16, holdout=Holdout(0.5, part)) for part in ("train", "eval")]
    assert lines == [f"image folder {folder}: no_caption x1 (uncaptioned.png is not in metadata.jsonl)"]
    assert all(side.skipped.counts == {"no_caption": 1} for side in sides)  # counted by both, as before


def test_a_quiet_scan_counts_without_logging(tmp_path):
    # for the held-out data every process of a run reads whole, as rank 0 of 1: the first process logs its scan
    folder = folder_with_an_uncaptioned_image(tmp_path / "held-out")
    with logged() as lines:
        dataset = open_dataset(str(folder), 16, quiet_scan=True)
    assert lines == [] and dataset.skipped.counts == {"no_caption": 1}
    with logged() as lines:
        open_dataset(str(folder), 16)
    assert lines == [f"image folder {folder}: no_caption x1 (uncaptioned.png is not in metadata.jsonl)"]


@pytest.mark.slow
@pytest.mark.parametrize("held_out", ["--eval-data", "--eval-fraction"])
def test_a_training_run_names_each_data_folder_once(tiny_sd, tmp_path, capsys, held_out):
    from latent_consistency.cli import main

    data = folder_with_an_uncaptioned_image(tmp_path / "data")
    other = folder_with_an_uncaptioned_image(tmp_path / "held-out")
    split = ["--eval-data", str(other)] if held_out == "--eval-data" else ["--eval-fraction", "0.5"]
    with logged() as lines:
        assert main(["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), *split, "--out", str(tmp_path / "run"),
                     "--steps", "2", "--checkpoint-every", "0", "--validate-every", "2"]) == 0
    capsys.readouterr()
    folders = [line.split(": ")[0] for line in lines if "no_caption" in line]
    assert folders == [f"image folder {data}"] + ([f"image folder {other}"] if held_out == "--eval-data" else [])
