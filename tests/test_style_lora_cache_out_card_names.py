"""Four defects of earlier reviews:
- `--style-lora` (generate, evaluate, serve: `parse_style_lora`): a weight with no LoRA before the colon (`:0.5`) was
  ("", 0.5), and Path("") took the working directory for the LoRA folder; a Windows path (`C:\\x.safetensors`) was
  refused as "'\\x.safetensors' after the colon is not a weight" where a folder named C stood in the working directory.
- `lcm cache --out X` refused an existing empty folder (and a link to one), which a user made for the cache, as "already
  exists".
- A run's config.json recorded `out` as typed (relative, through a link, a trailing slash) beside absolute, resolved
  `data` and `teacher`: a run that stopped before its first step, run again with --out spelled from another folder, was
  refused as "not empty; pass --resume" instead of started over.
- A model card of a run whose paths hold a non-UTF-8 file name (lone surrogates from `os.fsdecode`) crashed when written.
"""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from latent_consistency.cli.cache import check_out
from latent_consistency.cli.generate import parse_style_lora
from latent_consistency.errors import UserError
from latent_consistency.guidance_record import GuidanceRecord
from latent_consistency.training.config import DistillConfig, FinetuneConfig
from latent_consistency.training.model_card import _literal, _shell_word, _shown, write_model_card
from latent_consistency.training.run_folder import prepare_run_folder

# --- 1. --style-lora FILE[:WEIGHT] ---------------------------------------------------------------------------------------


def test_a_style_lora_file_named_with_a_colon_is_that_file_at_weight_1(tmp_path):
    """Kept: the whole text names an existing file, so it is that file, though `s.safetensors` beside it would read as
    FILE:WEIGHT."""
    named = tmp_path / "s.safetensors:0.5"
    named.write_bytes(b"")
    (tmp_path / "s.safetensors").write_bytes(b"")
    assert parse_style_lora(str(named)) == (str(named), 1.0)
    assert parse_style_lora(f"{tmp_path / 's.safetensors'}:0.7") == (str(tmp_path / "s.safetensors"), 0.7)


def test_a_weight_without_a_lora_is_refused():
    """Was ("", 0.5): Path("") is the working directory, taken for the LoRA folder."""
    for text in (":0.5", "  :0.5"):
        with pytest.raises(UserError, match=f"--style-lora {text}: no LoRA before the colon"):
            parse_style_lora(text)


def test_a_windows_path_is_taken_whole_and_hub_ids_take_a_weight(tmp_path, monkeypatch):
    """A colon followed by a path is a drive letter's, not FILE:WEIGHT's, also where a folder named like the drive letter
    stands in the working directory (was: "'\\x.safetensors' after the colon is not a weight"); a weight after it is split
    off; hub ids take one with or without @rev."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "C").mkdir()
    assert parse_style_lora("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_style_lora("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)
    assert parse_style_lora("C:\\loras\\x.safetensors:0.5") == ("C:\\loras\\x.safetensors", 0.5)
    assert parse_style_lora("org/style") == ("org/style", 1.0)
    assert parse_style_lora("org/style@main:0.7") == ("org/style@main", 0.7)
    with pytest.raises(UserError, match="'heavy' after the colon is not a weight"):
        parse_style_lora("C:heavy")  # the folder C exists: a misspelt weight, said as such


# --- 2. lcm cache --out: an empty folder ---------------------------------------------------------------------------------


def test_cache_out_may_be_an_empty_folder_or_a_link_to_one_but_nothing_else_that_exists(tmp_path):
    """Was: "latent cache folder X already exists" for a folder the user made empty for the cache (mkdir)."""
    empty, link = tmp_path / "empty", tmp_path / "link"
    empty.mkdir()
    link.symlink_to(empty)
    for out in (empty, link, tmp_path / "new"):
        check_out(str(out))
    full, full_link, file = tmp_path / "full", tmp_path / "full-link", tmp_path / "file"
    full.mkdir()
    (full / "mine.txt").write_text("kept")
    full_link.symlink_to(full)
    file.write_text("kept")
    for out in (full, full_link, file):
        with pytest.raises(UserError, match="already exists"):
            check_out(str(out))
    assert (full / "mine.txt").read_text() == "kept" and file.read_text() == "kept"


# --- 3. config.json's out ------------------------------------------------------------------------------------------------


def test_out_is_recorded_absolute_and_resolved_as_data_and_teacher_are(tmp_path, monkeypatch):
    """Was "link/run/" as typed, beside absolute, resolved sources."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "teacher").mkdir()
    recorded = DistillConfig(teacher="link/../teacher", data="world:shapes", out="link/run/").to_dict()
    assert recorded["out"] == str(tmp_path.resolve() / "real" / "run")
    assert recorded["teacher"] == str(tmp_path.resolve() / "teacher")
    assert FinetuneConfig(model="m", data="d", out="").to_dict()["out"] == ""  # none given: not the working directory


def test_a_run_stopped_before_its_first_step_starts_over_with_out_spelled_from_another_folder(tmp_path, monkeypatch):
    """What a run writes before its first step (config.json) is cleared, and the run started again, when --out names the
    same folder another way: from another working directory, through a link. Was: "run folder X is not empty; pass
    --resume" (the record `link/run/`, typed in another folder, named another folder here)."""
    (tmp_path / "a" / "real").mkdir(parents=True)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "a" / "real")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    started = DistillConfig(teacher="t", data="d", out="link/run/")
    run = prepare_run_folder(started, resume=False)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(started.to_dict()))  # as `RunFolder` writes it before the first step
    monkeypatch.chdir(tmp_path / "b")
    again = DistillConfig(teacher="t", data="d", out="../a/real/run")
    assert prepare_run_folder(again, resume=False) == Path("../a/real/run")
    assert list((tmp_path / "a" / "real" / "run").iterdir()) == []


@pytest.mark.slow
def test_a_moved_run_resumes_with_a_relative_out_from_another_folder(tiny_sd, tmp_path, monkeypatch):
    """A run started with --out `link/run/` (relative, through a link, a trailing slash) records its resolved path; moved,
    it resumes from another working directory with a relative --out, and records where it is now."""
    from latent_consistency.cli import main
    from tiny_models import write_captioned_images

    images = write_captioned_images(tmp_path / "images", 4)
    (tmp_path / "a" / "real").mkdir(parents=True)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "a" / "real")
    flags = ["distill", "--preset", "tiny", "--teacher", str(tiny_sd), "--data", str(images), "--batch-size", "2",
             "--checkpoint-every", "1"]
    monkeypatch.chdir(tmp_path / "a")
    assert main([*flags, "--out", "link/run/", "--steps", "1"]) == 0
    record = json.loads((tmp_path / "a" / "real" / "run" / "config.json").read_text())
    assert record["out"] == str(tmp_path.resolve() / "a" / "real" / "run")

    shutil.move(tmp_path / "a" / "real" / "run", tmp_path / "moved")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main([*flags, "--out", "../moved", "--steps", "2", "--resume"]) == 0
    resumed = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert resumed == record | {"out": str(tmp_path.resolve() / "moved"), "steps": 2}


# --- 4. model cards of non-UTF-8 names -----------------------------------------------------------------------------------

NAME = os.fsdecode(b"caf\xe9")  # a Latin-1 file name on Linux: "caf\udce9"


def test_a_card_of_non_utf8_names_is_written_and_its_usage_lines_name_those_files(tmp_path):
    """Was UnicodeEncodeError ("surrogates not allowed") on writing README.md. The prose shows the name's bytes escaped;
    the Python snippet's literal and the shell line's word read back as the very names."""
    teacher, data, out = (os.path.join(str(tmp_path), part, NAME) for part in ("teacher", "data", "out"))
    config = DistillConfig(teacher=teacher, data=data, out=out, steps=3, method="lcd")
    staged = tmp_path / "staged"
    staged.mkdir()
    base = SimpleNamespace(guidance_record=None, time_cond_proj_dim=None, native_size=16)
    card = write_model_card(staged, Path(out) / "lcm", config, GuidanceRecord(1.0, 4.0, 2.0, {}), base, [NAME]).read_text("utf-8")
    assert f"# LCM of {tmp_path}/teacher/caf\\xe9" in card and f"- Data: `{tmp_path}/data/caf\\xe9`" in card
    python = card.split("```python\n", 1)[1].split("```", 1)[0]
    literals = [ast.literal_eval(node) for node in ast.walk(ast.parse(python)) if isinstance(node, ast.Constant)]
    assert os.path.join(out, "lcm") in literals and NAME in literals  # the model folder and the prompt, as given
    line = card.split("```sh\n", 1)[1].split("```", 1)[0].strip()
    words = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert words[:5] == [b"lcm", b"generate", b"caf\xe9", b"--model", os.fsencode(out) + b"/lcm"]


def test_ordinary_names_are_written_as_before():
    """Byte for byte: the escapes touch only what no UTF-8 file holds (an emoji and a quote stay as they were)."""
    for text in ("/runs/x y/lcm", "a photo of a cat", "café 🎉 \"quoted\" it's", "-starts with a dash", ""):
        assert _shown(text) == text
        assert _literal(text) == json.dumps(text, ensure_ascii=False)
        assert _shell_word(text) == shlex.quote(text)
