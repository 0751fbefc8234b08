"""Held-out data that shares files with the training data, spelled in ways the `--eval-data` checks did not see: a shard
that a brace pattern of --data names too, a folder of --eval-data that holds --data. Each run trained on its held-out
samples and logged their loss as `eval_loss`, a held-out loss that was not held out."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

SHARED = "its loss would not be held out"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three webdataset shards of four captioned 16 px images each: shards/00000.tar .. 00002.tar."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for shard in range(3):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(4):
                key = f"{shard:02d}{i:04d}"
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(png, "PNG")
                for ext, data in (("png", png.getvalue()), ("txt", f"a red star {key}".encode())):
                    member = tarfile.TarInfo(f"{key}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    return folder


def distill(tiny_sd, out, data, eval_data, *extra):
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--eval-data", str(eval_data),
            "--out", str(out), "--steps", "1", "--omega-response-samples", "0", *extra]


def refused(run_error, argv, out):
    code, err = run_error(argv)
    assert code == 2 and len(err.splitlines()) == 1 and SHARED in err, (code, err)
    assert not out.exists()


@pytest.mark.parametrize("data, eval_data", [("{00000..00002}.tar", "00002.tar"), ("{00000..00001}.tar", "{00001..00002}.tar"),
                                             ("*.tar", "00001.tar")])
def test_held_out_shards_that_the_training_pattern_names_too_are_refused(tiny_sd, shards, run_error, tmp_path, data, eval_data):
    # defect: `lcm distill --data "shards/{00000..00002}.tar" --eval-data shards/00002.tar` trained on 00002.tar and
    # logged its loss as the held-out eval_loss; only the same spelling or a path inside a --data folder was refused
    refused(run_error, distill(tiny_sd, tmp_path / "run", shards / data, shards / eval_data), tmp_path / "run")


def test_disjoint_held_out_shards_still_run(tiny_sd, shards, run_error, tmp_path):
    # defect (the other side of the one above): the check must not refuse shards that share nothing
    code, err = run_error(distill(tiny_sd, tmp_path / "run", shards / "{00000..00001}.tar", shards / "00002.tar",
                                  "--dry-run"))
    assert code in (0, None), err
    refused(run_error, distill(tiny_sd, tmp_path / "bad", shards / "{00000..00001}.tar", shards / "0000[01].tar", "--dry-run"),
            tmp_path / "bad")


def test_a_held_out_folder_that_holds_the_training_data_is_refused(tiny_sd, run_error, tmp_path):
    # defect: `--data images/part --eval-data images` read images/part inside the held-out folder (its subfolders are
    # read): the eval_loss averaged over the training images too; only the other way round (--eval-data inside --data)
    # was refused
    from tiny_models import write_captioned_images

    write_captioned_images(tmp_path / "images", 4)
    write_captioned_images(tmp_path / "images" / "part", 4, caption="a blue moon number {i}")
    refused(run_error, distill(tiny_sd, tmp_path / "run", tmp_path / "images" / "part", tmp_path / "images"), tmp_path / "run")


def test_a_held_out_shard_folder_that_holds_the_training_shard_is_refused(tiny_sd, shards, run_error, tmp_path):
    # defect: `--data shards/00001.tar --eval-data shards` held out the training shard itself
    refused(run_error, distill(tiny_sd, tmp_path / "run", shards / "00001.tar", shards), tmp_path / "run")


@pytest.mark.parametrize("flag, value, message", [("--lr", "0", "--lr must be positive, got 0.0"),
                                                  ("--lr", "-0.5", "--lr must be positive, got -0.5"),
                                                  ("--huber-c", "0", "--huber-c must be positive, got 0.0"),
                                                  ("--validation-guidance-scale", "-1", "--validation-guidance-scale must be 0 or more, got -1.0")])
def test_a_bad_learning_rate_is_named_alone(tiny_sd, run_error, tmp_path, flag, value, message):
    # defect: `lcm distill --lr 0` said "lr and huber_c must be positive and validation_guidance_scale >= 0, got 0.0, 0.001,
    # 8.0": three fields and three numbers, for one wrong flag
    (tmp_path / "data").mkdir()  # a folder of data beside the run folder (inside it, --out is refused first)
    argv = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            flag, value, "--dry-run"]
    code, err = run_error(argv)
    assert code == 2 and err == f"lcm distill: error: {message}", (code, err)
    assert not (tmp_path / "run").exists()
