"""Training on two CPU processes (gloo, `accelerate launch --multi_gpu --num_processes 2`, as the README runs it): what each
process reads on its own (its share of an image folder, its own shards) reaches the run's one report and its errors.

test_distill.py checks that two processes share one global batch and only the main one writes; test_sharded.py the same
under FSDP2 and an exact resume. These add the data each process reads alone.
"""

import io
import json
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from two_processes import DATA_PARALLEL, launch


def launch_lcm(args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    """Two processes of `lcm` (or of `script`, which runs it), one thread each."""
    program = [str(script), *args] if script else ["-m", "latent_consistency.cli", *args]
    return launch(DATA_PARALLEL, program, {"OMP_NUM_THREADS": "1"}, timeout=120)


def distill(tiny_sd, data, out, *extra) -> list[str]:
    return ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(data), "--out", str(out), *extra]


# Runs `lcm` as the launcher would, on a slow disk: process 1 checks the run folder 1 s after process 0, and process 0, clearing
# a run that stopped before its first step, takes 3 s after removing its config.json
SLOW_CLEARING = textwrap.dedent("""
    import os, sys, time
    from latent_consistency.training import loop, run_folder

    _prepare, _clear = loop.prepare_run_folder, run_folder.clear_early_run

    def prepare(config, resume, main=True):
        if not main:
            time.sleep(1)
        return _prepare(config, resume, main)

    def clear(out):
        (out / "config.json").unlink()
        time.sleep(3)
        _clear(out)

    loop.prepare_run_folder, run_folder.clear_early_run = prepare, clear
    from latent_consistency.cli import end_process, main
    sys.exit(end_process(main(sys.argv[1:])))
""")


@pytest.mark.slow
def test_what_another_process_skipped_is_reported_and_a_stopped_run_restarts(tiny_sd, tmp_path):
    """One two-process step on an image folder with a corrupt image that only process 1 reads, into the folder of a run
    that stopped before its first step."""
    from latent_consistency.training.config import DistillConfig, resolve_config
    from tiny_models import write_captioned_images

    images = write_captioned_images(tmp_path / "images", 24)
    # With seed 0 the first global batch is samples 18, 4, 21, 10 (process 0: 18, 21; process 1: 4, 10), the final ω response
    # reads 11, 22, 23, 20 on process 0, and every process reads 0-5 (the validation captions): only process 1 meets 10.png
    (images / "10.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    config = resolve_config(DistillConfig, "tiny", overrides={"teacher": str(tiny_sd), "data": str(images), "out": str(out)})
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config.to_dict()))  # a run that stopped before its first step
    (out / "sources.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    script = tmp_path / "slow_clearing.py"
    script.write_text(SLOW_CLEARING)
    done = launch_lcm(distill(tiny_sd, images, out, "--steps", "1"), script)
    # was: process 1 saw the folder half-cleared by process 0 (no config.json, sources.json still there) and stopped with
    # "run folder ... is not empty": the launch failed
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("starting it over") == 1
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m] == [1]
    # was: "data: nothing skipped or converted": the summary counted only what process 0 read
    assert "data: skipped: corrupt=1\n" in done.stdout


def shard(path: Path, images: list[bytes]) -> None:
    """A webdataset shard of `images`, each captioned."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for k, data in enumerate(images):
            for extension, member in (("png", data), ("txt", f"a red star {k}".encode())):
                info = tarfile.TarInfo(f"{k:04d}.{extension}")
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    path.write_bytes(buffer.getvalue())


@pytest.mark.slow
def test_unusable_shards_of_one_process_stop_every_process_with_its_message(tiny_sd, tmp_path):
    """Shard 0 (process 0's) is good, shard 1 (process 1's) holds only corrupt images."""
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(png, "PNG")
    shard(tmp_path / "00000.tar", [png.getvalue()] * 4)
    shard(tmp_path / "00001.tar", [b"not a png"] * 4)
    out = tmp_path / "run"
    done = launch_lcm(distill(tiny_sd, tmp_path / "{00000..00001}.tar", out))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("lcm distill: error:")]
    assert errors and "no usable sample in 1 shard(s)" in errors[0] and set(errors) == {errors[0]}, done.stderr[-3000:]
    # was: process 0 went on to its first collective and died there with gloo's traceback ("Connection closed by peer"),
    # stopped by the launcher (exit code -15), after writing the run folder's config.json and sources.json
    assert "Connection closed" not in done.stderr and "[rank0]:" not in done.stderr, done.stderr[-3000:]
    assert "exitcode  : 2 " in done.stderr  # the first process to stop: a user's error (the launcher may stop the other first)
    assert not out.exists()


# Runs `lcm` with every read of an image file for a fingerprint written to $READS_LOG as "process file" (`two_processes`)
LOGGED_READS = textwrap.dedent("""
    import os, sys
    from latent_consistency.data import imagefolder

    _digest = imagefolder._file_sample_digest

    def digest(path):
        with open(os.environ["READS_LOG"], "a") as log:
            log.write(f"{os.environ['RANK']} {os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}\\n")
        return _digest(path)

    imagefolder._file_sample_digest = digest
    from latent_consistency.cli import end_process, main
    sys.exit(end_process(main(sys.argv[1:])))
""")


@pytest.mark.slow
def test_one_process_reads_the_image_folders_for_their_fingerprints(tiny_sd, tmp_path):
    """Every process reads the whole image folder (the sampler splits it) and each computed its fingerprint, reading
    samples of every file at the first checkpoint and again at a resume: N processes, N times the reads, and minutes each
    at 12 million images. Now the first process computes it for all, --data's and --eval-data's, at the checkpoint and
    at the resume, and the run resumes."""
    from tiny_models import write_captioned_images

    data, held_out = write_captioned_images(tmp_path / "data", 8), write_captioned_images(tmp_path / "held_out", 4)
    script, log, out = tmp_path / "logged_reads.py", tmp_path / "reads.log", tmp_path / "run"
    script.write_text(LOGGED_READS)
    args = distill(tiny_sd, data, out, "--eval-data", str(held_out), "--validate-every", "0")
    done = launch(DATA_PARALLEL, [str(script), *args, "--steps", "1"], {"OMP_NUM_THREADS": "1", "READS_LOG": str(log)}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    reads = log.read_text().splitlines()
    assert sorted(reads) == sorted([f"0 data/{i}.png" for i in range(8)] + [f"0 held_out/{i}.png" for i in range(4)])
    log.unlink()
    done = launch(DATA_PARALLEL, [str(script), *args, "--steps", "2", "--resume"], {"OMP_NUM_THREADS": "1", "READS_LOG": str(log)},
                  timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(log.read_text().splitlines()) == sorted(reads)  # the resume's check and the step-2 checkpoint: once each
