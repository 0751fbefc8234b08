"""What a `kill -9` of a long command other than distill/finetune leaves behind, and that the next run copes with it:
each test writes the leftover state directly (no real kills) and runs the command again."""

import json
import pathlib

import pytest

from latent_consistency.data.latent_cache import PARTIAL_MARK, LatentCache, write_latent_cache
from latent_consistency.models import LatentCodec
from latent_consistency.prompts import CLIPPromptEncoder
from latent_consistency.world import build
from latent_consistency.world.artifact import WORLD_FILE
from latent_consistency.world.build import STATE_FILE, build_world, world_spec
from latent_consistency.world.datasets import get_dataset
from latent_consistency.world.presets import get_preset
from tiny_models import make_tiny_components


class _Stop(Exception):
    """Stands in for the rest of a build a test does not need to run."""


def test_world_build_parts_from_redone_after_a_kill_mid_copy(tmp_path, monkeypatch):
    """`lcm world build --parts-from` killed while copying the other world's phases (before build_state.json records
    them) leaves half a copy: the rerun copies them again over it, not a FileExistsError traceback."""
    spec = world_spec(get_preset("tiny"), "epsilon")
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True)
    (src / "tokenizer" / "vocab.json").write_text("{}")
    (src / "tokenizer" / "merges.txt").write_text("whole")
    (src / WORLD_FILE).write_text(json.dumps(spec))
    (src / STATE_FILE).write_text(json.dumps({"done": ["tokenizer"]}))
    out = tmp_path / "out"
    (out / "tokenizer").mkdir(parents=True)  # what the kill left: world.json, and the copy half made
    (out / "tokenizer" / "vocab.json").write_text("{")
    (out / WORLD_FILE).write_text(json.dumps(spec))

    def stop(self, stage):
        raise _Stop

    monkeypatch.setattr(build._Build, "judge", stop)
    checked = []  # the copied phase's outputs are checked before any work (`_check_phase_outputs`): these stand-ins load no tokenizer
    monkeypatch.setattr(build, "_load_outputs", lambda _, phase: checked.append(phase))
    with pytest.raises(_Stop):
        build_world("tiny", out, device="cpu", progress=False, parts_from=src)
    assert checked == ["tokenizer"]
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}" and (out / "tokenizer" / "merges.txt").read_text() == "whole"
    assert json.loads((out / STATE_FILE).read_text())["done"] == ["tokenizer"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return make_tiny_components(tmp_path_factory.mktemp("parts"))


def _write_cache(path, parts):
    return write_latent_cache(get_dataset("shapes", "train", size=4), path, LatentCodec(parts["vae"]),
                              CLIPPromptEncoder(parts["tokenizer"], parts["text_encoder"]), {"dataset": "shapes"}, progress=False)


@pytest.mark.parametrize("killed_at", ["rename", "unlink"])
def test_latent_cache_killed_as_it_is_committed(tmp_path, parts, monkeypatch, killed_at):
    """A latent cache killed while `<cache>.partial` becomes the cache: before the rename the rerun writes it again
    (its `.partial` still marked as ours, not refused as someone else's folder); after it the cache is whole and read."""
    out = tmp_path / "cache"
    real = getattr(pathlib.Path, killed_at)

    def kill(self, *args, **kwargs):
        if killed_at == "rename" or self.name == PARTIAL_MARK:
            raise _Stop
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, killed_at, kill)
    with pytest.raises(_Stop):
        _write_cache(out, parts)
    monkeypatch.undo()
    if not out.exists():
        _write_cache(out, parts)  # as `lcm demo` does when the cache has no manifest yet
    assert len(LatentCache(out)) == 4 and not out.with_name("cache.partial").exists()
