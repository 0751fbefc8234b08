import os
from collections import Counter

# A hub lookup hangs ~23 s before failing when offline; every test runs without the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# `lcm`'s parser imports world.demo (and through it world.build), which bind `artifact.load_world` as they find it when
# first imported: imported here, before any test replaces it, so that no test's replacement outlives that test
import latent_consistency.world.demo  # noqa: F401
from tiny_models import save_tiny_lcm, save_tiny_pixart, save_tiny_sd, save_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion (ε-prediction) folder."""
    return save_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory):
    """A tiny random LCM folder saved by diffusers."""
    return save_tiny_lcm(tmp_path_factory.mktemp("models") / "tiny-lcm")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL (base) folder: two text encoders, pooled embedding and micro-conditioning."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_lcm(tmp_path_factory):
    """A tiny random SDXL-family LCM folder."""
    return save_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl-lcm", seed=1, lcm=True)


@pytest.fixture(scope="session")
def tiny_pixart(tmp_path_factory):
    """A tiny random PixArt-α folder."""
    return save_tiny_pixart(tmp_path_factory.mktemp("models") / "tiny-pixart")


@pytest.fixture(scope="module")
def lcm(tiny_lcm):
    """The tiny LCM as an `LCMGenerator` on the CPU, once per test module (the serve tests' model)."""
    import torch

    from latent_consistency.pipelines import LCMGenerator

    return LCMGenerator.load(str(tiny_lcm), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def api(lcm):
    """A test client of `lcm serve`'s app on `lcm` (`test_serve.make_app`), once per test module; an exception in the app
    comes back as the 500 a client gets, not raised in the test."""
    from fastapi.testclient import TestClient

    from test_serve import make_app

    with TestClient(make_app(lcm), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def run_error(capsys):
    """Run the `lcm` command line; (exit code, standard error), argparse's own exits included: the command's own, not what
    the test wrote before it (a tiny model's loading bar, a cache's note)."""
    from latent_consistency.cli import main

    def run(argv):
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
        return code, capsys.readouterr().err.strip()

    return run


@pytest.fixture
def encoded(monkeypatch):
    """The number of images the VAE encodes from here on (`LatentCodec.encode` counted)."""
    from latent_consistency.models import LatentCodec

    counted, encode = [0], LatentCodec.encode

    def counting(codec, images, **kw):
        counted[0] += len(images)
        return encode(codec, images, **kw)

    monkeypatch.setattr(LatentCodec, "encode", counting)
    return counted


@pytest.fixture
def listings(monkeypatch):
    """The folders listed from here on (real paths), each with the number of times it was listed (`os.scandir`, which
    `os.walk` lists with)."""
    listed, scandir = Counter(), os.scandir

    def counted(path="."):
        listed[os.path.realpath(path)] += 1
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counted)
    return listed
