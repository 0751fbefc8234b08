"""Command-line inputs a review gave that no test had: negative values spelled with an exponent or a comma (`--lr -1e-4`,
`--timesteps -3,999`), held-out data reached through a symlink inside --data, the refusal of a folder without a usable
caption, and `lcm generate`'s file name of a prompt cut just after a separator."""

import argparse
import io
import os
import tarfile
import time

import pytest
from PIL import Image

from tiny_models import write_captioned_images

SHARED = "its loss would not be held out"


# --- Negative values: every value of every flag of every command ---

def value_flags(parser, words=()):
    """(command words, flag, action) of each flag that takes a value, in `parser` and its subcommands' parsers."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from value_flags(sub, (*words, name))
        elif action.option_strings and action.nargs != 0 and action.help != argparse.SUPPRESS:
            yield words, action.option_strings[0], action


@pytest.mark.parametrize("value", ["-1e-4", "-3,999", "-inf", "-2E3"])
def test_every_flag_takes_a_negative_value_however_it_is_spelled(capsys, value):
    # defect: argparse takes only -5 and -0.5 for negative numbers: `lcm distill --lr -1e-4`, `lcm generate --timesteps
    # -3,999,...`, `--lr -inf` stopped at "argument --lr: expected one argument", where `--lr=-1e-4` reached the flag's own
    # check ("lr must be positive"). Each flag now gets the value: parsed, or refused by its own type or choices.
    from latent_consistency.cli import build_parser

    parser = build_parser()
    flags = list(value_flags(parser))
    assert len({words for words, _, _ in flags}) >= 9 and len(flags) > 100  # every command, world's and evaluate's subcommands
    for _, _, action in flags:
        action.required = False  # each flag alone: not refused for another one left out
    wrong = []
    for words, flag, action in flags:
        try:
            args = parser.parse_args([*words, flag, value])
        except SystemExit:
            err = capsys.readouterr().err.strip()
            if "expected one argument" in err or f"error: argument {flag}:" not in err:
                wrong.append((words, flag, err))
            continue
        taken = getattr(args, action.dest)
        if value not in str(taken) and not isinstance(taken, float):
            wrong.append((words, flag, taken))
    assert not wrong, wrong[:5]


def test_a_negative_learning_rate_in_exponent_form_gets_its_own_message(tiny_sd, run_error, tmp_path):
    # defect: `lcm distill --lr -1e-4` said "argument --lr: expected one argument", --lr=-1e-4 "lr must be positive"
    (tmp_path / "data").mkdir()  # a folder of data beside the run folder (inside it, --out is refused first)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--dry-run"]
    for spelling in (["--lr", "-1e-4"], ["--lr=-1e-4"]):
        code, err = run_error([*argv, *spelling])
        assert code == 2 and err == "lcm distill: error: --lr must be positive, got -0.0001", (spelling, code, err)
    code, err = run_error([*argv, "--lr", "-inf"])
    assert code == 2 and err == "lcm distill: error: --lr must be a finite number, got -inf", err
    assert not (tmp_path / "run").exists()


def test_negative_timesteps_reach_the_timestep_check(tiny_lcm, run_error, tmp_path):
    # defect: `lcm generate --timesteps -3,999` said "argument --timesteps: expected one argument"
    code, err = run_error(["generate", "a red star", "--model", str(tiny_lcm), "--timesteps", "-3,999", "--out", str(tmp_path / "a"),
                           "--height", "16", "--width", "16", "--device", "cpu"])
    assert code == 2 and len(err.splitlines()) == 1 and "expected one argument" not in err and "-3" in err, err
    assert not (tmp_path / "a").exists()


# --- Held-out data through a symlink ---

def distill(tiny_sd, out, data, eval_data):
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--eval-data", str(eval_data),
            "--out", str(out), "--omega-response-samples", "0", "--dry-run"]


def refused(run_error, argv, out, shared):
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and SHARED in err and f"both read {shared}" in err, (code, err)
    assert not out.exists()


@pytest.mark.parametrize("target", ["held", "held/part", "held/part/3.png"])
def test_a_symlink_in_the_training_folder_into_the_held_out_data_is_refused(tiny_sd, run_error, tmp_path, target):
    # defect: `--data train --eval-data held` with train/extra a symlink to held (or into it: a subfolder, an image) passed
    # the check, which compared the folders' own paths: the image folder follows the link, so the run trained on the
    # held-out images and logged their loss as eval_loss
    write_captioned_images(tmp_path / "train", 4)
    write_captioned_images(tmp_path / "held" / "part", 4, caption="a blue moon number {i}")
    link = tmp_path / "train" / ("extra.png" if target.endswith(".png") else "extra")
    link.symlink_to(tmp_path / target)
    refused(run_error, distill(tiny_sd, tmp_path / "run", tmp_path / "train", tmp_path / "held"), tmp_path / "run",
            f"{(tmp_path / target).resolve()} (through the link {link})")


def test_a_held_out_folder_with_a_link_to_the_training_folder_is_refused(tiny_sd, run_error, tmp_path):
    write_captioned_images(tmp_path / "train", 4)
    write_captioned_images(tmp_path / "held", 4, caption="a blue moon number {i}")
    (tmp_path / "held" / "more").symlink_to(tmp_path / "train")
    refused(run_error, distill(tiny_sd, tmp_path / "run", tmp_path / "train", tmp_path / "held"), tmp_path / "run",
            f"{(tmp_path / 'train').resolve()} (through the link {tmp_path / 'held' / 'more'})")


def write_shard(path):
    """A webdataset shard of one captioned 16 px image."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(png, "PNG")
    with tarfile.open(path, "w") as tar:
        for name, data in (("0.png", png.getvalue()), ("0.txt", b"a red star")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_a_symlinked_shard_in_the_training_folder_that_is_held_out_is_refused(tiny_sd, run_error, tmp_path):
    # defect: a folder of shards whose 00001.tar is a link to the held-out shard trained on it
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    write_shard(tmp_path / "train" / "00000.tar")
    write_shard(tmp_path / "held" / "00002.tar")
    (tmp_path / "train" / "00001.tar").symlink_to(tmp_path / "held" / "00002.tar")
    refused(run_error, distill(tiny_sd, tmp_path / "run", tmp_path / "train", tmp_path / "held" / "00002.tar"), tmp_path / "run",
            f"{(tmp_path / 'held' / '00002.tar').resolve()} (through the link {tmp_path / 'train' / '00001.tar'})")


def test_links_elsewhere_or_hidden_still_run(tiny_sd, run_error, tmp_path):
    # the other side: a link to other images, or a hidden one (the reader leaves hidden names out), shares nothing
    write_captioned_images(tmp_path / "train", 4)
    write_captioned_images(tmp_path / "more", 4, caption="a green leaf number {i}")
    write_captioned_images(tmp_path / "held", 4, caption="a blue moon number {i}")
    (tmp_path / "train" / "more").symlink_to(tmp_path / "more")
    (tmp_path / "train" / ".held").symlink_to(tmp_path / "held")
    code, err = run_error(distill(tiny_sd, tmp_path / "run", tmp_path / "train", tmp_path / "held"))
    assert code in (0, None), err


def test_the_link_check_of_a_large_folder_takes_well_under_a_second(tmp_path):
    # the check lists each folder once, without a stat per file: 12,000 images with a link among them
    import latent_consistency.data.spec  # noqa: F401  (imported before the clock starts, as a run has it)
    from latent_consistency.training.config import _shared_data

    for part in range(12):
        folder = tmp_path / "train" / f"{part:02d}"
        folder.mkdir(parents=True)
        for i in range(1000):
            (folder / f"{i:05d}.png").touch()
    write_captioned_images(tmp_path / "held", 2)
    (tmp_path / "train" / "07" / "zz").symlink_to(tmp_path / "held")
    start = time.perf_counter()
    shared = _shared_data(str(tmp_path / "held"), str(tmp_path / "train"))
    took = time.perf_counter() - start
    assert shared == f"{(tmp_path / 'held').resolve()} (through the link {tmp_path / 'train' / '07' / 'zz'})"
    assert took < 0.5, took


# --- A folder without a usable caption: its one line ---

def test_a_folder_without_a_usable_caption_is_refused_in_one_line(tiny_sd, run_error, tmp_path):
    # defect: `lcm cache --data photos` of images without captions printed the scan's log line ("image folder photos:
    # no_caption x1 (0.png)") above its one-line error, which sums up the same skips
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("   ")
    code, err = run_error(["cache", "--model", str(tiny_sd), "--data", str(folder), "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lcm cache: error: no usable captioned image") and "no_caption=3" in err, err


def test_a_usable_folder_still_counts_and_logs_what_its_scan_skipped(tmp_path, capsys):
    from latent_consistency.data.imagefolder import ImageFolderDataset

    write_captioned_images(tmp_path / "photos", 2)
    Image.new("RGB", (16, 16)).save(tmp_path / "photos" / "uncaptioned.png")
    dataset = ImageFolderDataset(tmp_path / "photos", 16)
    assert len(dataset) == 2 and dataset.skipped.counts == {"no_caption": 1}
    assert ("no_caption", "uncaptioned.png is not in metadata.jsonl") in dataset.skipped.seen


# --- lcm generate: a prompt cut just after a separator ---

CUT_AFTER_DASH = "a" * 59 + " b" + "c" * 10  # its name's 60 characters end at the "-" before "b"


def test_a_name_cut_after_a_separator_does_not_end_in_it():
    from latent_consistency.cli.generate import earlier_image_filename, image_filename

    assert image_filename(0, CUT_AFTER_DASH) == "0000-" + "a" * 59 + ".png"
    assert earlier_image_filename(0, CUT_AFTER_DASH) == "0000-" + "a" * 59 + "-.png"
    assert image_filename(3, "A red star!") == earlier_image_filename(3, "A red star!") == "0003-a-red-star.png"
    assert image_filename(1, "!!!") == "0001-image.png"


def test_a_rerun_keeps_an_image_of_the_earlier_name(tiny_lcm, run_error, tmp_path):
    # an image an earlier version wrote as 0000-aaa…a-.png is this run's image 0: --skip-existing keeps it (not a second copy
    # as 0000-aaa…a.png), and a rerun without it is refused as over any image of this run's
    from latent_consistency.cli.generate import earlier_image_filename, image_filename

    out = tmp_path / "images"
    argv = ["generate", CUT_AFTER_DASH, "a red star", "--model", str(tiny_lcm), "--out", str(out), "--height", "16", "--width", "16",
            "--device", "cpu"]
    code, err = run_error(argv)
    assert code == 0, err
    new, earlier = out / image_filename(0, CUT_AFTER_DASH), out / earlier_image_filename(0, CUT_AFTER_DASH)
    os.rename(new, earlier)
    code, err = run_error(argv)
    assert code == 2 and f"already holds {earlier.name} and 1 more" in err, err
    stamp = earlier.stat().st_mtime_ns
    code, err = run_error([*argv, "--skip-existing"])
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted([earlier.name, image_filename(1, "a red star")])
    assert earlier.stat().st_mtime_ns == stamp
