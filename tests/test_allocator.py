"""`allocator.keep_freed_memory`: the CPU sampling commands set glibc's mmap and trim thresholds, and only they, only there."""

import sys

import pytest
import torch

from latent_consistency import allocator


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

        def mallopt(param, value):
            self.calls.append((param, value))
            return self.result

        self.mallopt = mallopt


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: fake if name == "libc.so.6" else pytest.fail(name))
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return fake


def test_sets_the_mmap_threshold_to_64_mib_and_turns_trimming_off(libc):
    assert allocator.keep_freed_memory(torch.device("cpu"))
    assert libc.calls == [(-3, 64 * 2**20), (-1, 2**31 - 1)]


@pytest.mark.parametrize("case", ["gpu", "user's environment", "no glibc", "refused", "other system"])
def test_leaves_the_allocator_alone(case, libc, monkeypatch):
    device = torch.device("cpu")
    if case == "gpu":
        device = torch.device("cuda")
    elif case == "user's environment":
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    elif case == "no glibc":
        def missing(name):
            raise OSError(f"{name}: cannot open shared object file")

        monkeypatch.setattr(allocator.ctypes, "CDLL", missing)
    elif case == "refused":
        libc.result = 0
    else:
        monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert not allocator.keep_freed_memory(device)
    assert libc.calls == ([(-3, 64 * 2**20)] if case == "refused" else [])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_this_machines_glibc_takes_the_settings(monkeypatch):
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert allocator.keep_freed_memory(torch.device("cpu"))


def test_lcm_generate_sets_it_for_its_device(tiny_lcm, tmp_path, monkeypatch):
    from latent_consistency.cli import generate, main

    devices = []
    monkeypatch.setattr(generate, "keep_freed_memory", lambda device: devices.append(device))
    out = tmp_path / "out"
    assert main(["generate", "a red star", "--model", str(tiny_lcm), "--steps", "1", "--out", str(out)]) == 0
    assert devices == [torch.device("cpu")] and len(list(out.glob("*.png"))) == 1
