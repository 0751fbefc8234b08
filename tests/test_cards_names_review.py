"""What a review with awkward paths found: a model card's Python snippet that did not load its model (a relative folder, an
emoji as two lone surrogates), image names in another Unicode normalisation than their metadata's (a folder made on
macOS) skipped as uncaptioned, a sweep's run named after a symbolic link's target, suggested commands that could not be
pasted where a path starts with "-", and a --config file with a byte-order mark refused."""

from __future__ import annotations

import ast
import json
import shlex
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from latent_consistency.cli import build_parser, main
from latent_consistency.data.imagefolder import ImageFolderDataset
from latent_consistency.errors import UserError
from latent_consistency.guidance_record import GuidanceRecord
from latent_consistency.training.config import DistillConfig, FinetuneConfig, resolve_config
from latent_consistency.training.model_card import model_card
from test_file_inputs import assert_one_line
from tiny_models import write_captioned_images, write_run

AWKWARD = "it's \"🎉\" here"  # a quote of each kind and a character beyond the Basic Multilingual Plane
PROMPT = "a 🐱 on a 'mat'"


def snippets(card: str) -> tuple[str, list[str]]:
    """The card's Python snippet and its `lcm generate` line, split as a shell would."""
    text = ModelCard(card).text
    return text.split("```python\n", 1)[1].split("```", 1)[0], shlex.split(text.split("```sh\n", 1)[1].split("```", 1)[0])


def calls(python: str, name: str) -> list[list]:
    """The evaluated arguments of each call of `name` (an attribute, `pipe.load_lora_weights`) in `python`, which compiles."""
    compile(python, "<card>", "exec")
    return [[ast.literal_eval(arg) for arg in node.args] for node in ast.walk(ast.parse(python))
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == name]


def test_an_lcm_cards_snippet_names_its_folder_absolute_and_as_spelled(tmp_path, monkeypatch):
    """Its folder was json.dumps of the folder as the run was given it: relative (the snippet loaded nothing from any
    other working directory) and with the emoji as "\\ud83c\\udf89", which Python reads as two lone surrogates."""
    monkeypatch.chdir(tmp_path)
    config = DistillConfig(teacher="t", data="d", out=AWKWARD)
    python, _ = snippets(model_card(Path(AWKWARD) / "lcm", config, GuidanceRecord(1.0, 2.0, 2.0, None), prompt=PROMPT))
    assert calls(python, "from_pretrained") == [[str(tmp_path / AWKWARD / "lcm")]]
    assert calls(python, "pipe") == [[PROMPT]]


def test_a_lora_cards_snippet_names_its_adapters_and_base_model_absolute(tmp_path, monkeypatch):
    """The base model was written as typed (relative), while the card's `lcm generate` line beside it named it absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"base {AWKWARD}").mkdir()
    config = FinetuneConfig(model=f"base {AWKWARD}", data="d", out=AWKWARD, adapter="lora")
    python, command = snippets(model_card(Path(AWKWARD) / "lora", config, None))
    base, lora = str(tmp_path / f"base {AWKWARD}"), str(tmp_path / AWKWARD / "lora")
    assert calls(python, "from_pretrained") == [[base], [lora]] and calls(python, "load_lora_weights") == [[lora]]
    assert command[command.index("--model") + 1] == base


def test_a_hub_base_model_stays_a_hub_id_with_its_revision():
    config = FinetuneConfig(model="org/sd-model@v2", data="d", out="o", adapter="lora")
    python, _ = snippets(model_card(Path("o") / "lora", config, None))
    assert 'DiffusionPipeline.from_pretrained("org/sd-model", revision="v2")' in python


def test_a_prompt_starting_with_a_dash_is_one_prompt_of_the_cards_command(tmp_path):
    """`lcm generate -cat --model ...` read the prompt as a flag: argparse refused the line as the card wrote it (a word
    with a space in it argparse takes as a value, whatever it starts with)."""
    config = DistillConfig(teacher="t", data="d", out=str(tmp_path))
    _, command = snippets(model_card(tmp_path / "lcm", config, GuidanceRecord(1.0, 2.0, 2.0, None), prompt="-cat"))
    args = build_parser().parse_args(command[1:])
    assert args.prompts + args.prompt == ["-cat"] and args.steps == 4


# --- image names in another Unicode normalisation ------------------------------------------------------------------------

NFC, NFD = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")


def folder_of(tmp_path: Path, on_disk: list[str], named: list[str]) -> Path:
    """An image folder of the files `on_disk` (copies of one PNG) and a metadata.jsonl line naming each of `named`."""
    write_captioned_images(tmp_path, 1)
    for name in on_disk:
        (tmp_path / name).write_bytes((tmp_path / "0.png").read_bytes())
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": f"caption {i}"}) + "\n"
                                                     for i, name in enumerate(["0.png", *named])), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(("on_disk", "named"), [(NFD, NFC), (NFC, NFD)], ids=["nfd-on-disk", "nfd-in-metadata"])
def test_an_image_named_in_another_normalisation_is_captioned(tmp_path, on_disk, named):
    """Skipped twice over, as "missing_file" for its line and as "not in metadata.jsonl" for its file (two names that
    print alike); now the line captions the file, by the name the disk spells it with."""
    dataset = ImageFolderDataset(folder_of(tmp_path, [on_disk], [named]), 8)
    assert list(dataset.samples) == [("0.png", "caption 0"), (on_disk, "caption 1")] and not dataset.skipped.counts
    assert dataset.read(1)["caption"] == "caption 1"


def test_files_that_differ_only_in_normalisation_are_each_named_only_exactly(tmp_path):
    """Not merged: a line that spells one of them names that one, and a line that spells none of them (another
    normalisation of the same text) is skipped, naming the files it could mean."""
    mixed, other = "\u00e9e\u0301.png", "e\u0301\u00e9.png"  # "éé.png" in neither NFC nor NFD, two ways
    dataset = ImageFolderDataset(folder_of(tmp_path, [NFC, NFD, mixed, other], [NFD, "\u00e9\u00e9.png"]), 8)
    assert sorted(dataset.samples.files) == sorted(["0.png", NFD])
    assert dataset.skipped.counts == {"ambiguous_name": 1, "no_caption": 3}  # NFC, `mixed` and `other` not in metadata.jsonl
    (detail,) = [detail for reason, detail in dataset.skipped.seen if reason == "ambiguous_name"]
    assert detail.startswith("{}:3 names \u00e9\u00e9.png, spelled as none of the files ".format(tmp_path / "metadata.jsonl"))
    assert mixed in detail and other in detail


# --- a sweep's run names --------------------------------------------------------------------------------------------------


def sweep(runs: list[Path], out: Path) -> list[str]:
    return ["evaluate", "sweep", "--runs", *map(str, runs), "--out", str(out), "--samples", "2", "--device", "cpu"]


def scored_without_a_world(monkeypatch):
    from latent_consistency.world import artifact, over_training

    monkeypatch.setattr(artifact, "load_world", lambda *args, **kwargs: None)
    monkeypatch.setattr(over_training, "evaluate_run", lambda *args, **kwargs: [
        {"step": 2} | {f"{metric}_{n}": 1.0 for metric in ("fid", "alignment") for n in (1, 2, 4)}])


def test_a_run_given_by_a_symbolic_link_is_named_as_given(tmp_path, run_error, monkeypatch):
    """sweep.json, sweep.md and the plot's legend named it after the folder the link points to."""
    scored_without_a_world(monkeypatch)
    (tmp_path / "run link").symlink_to(write_run(tmp_path / "abc123"))
    code, err = run_error(sweep([tmp_path / "run link"], tmp_path / "sweep"))
    assert code == 0, err
    assert list(json.loads((tmp_path / "sweep" / "sweep.json").read_text())) == ["run link"]
    assert "| run link |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_one_run_given_by_two_links_is_refused_in_one_line(tmp_path, run_error, monkeypatch):
    """Named by its target, it was refused as two runs of one name; named as given, it must still not be scored twice."""
    scored_without_a_world(monkeypatch)
    run = write_run(tmp_path / "run")
    (tmp_path / "a").symlink_to(run)
    code, err = run_error(sweep([tmp_path / "a", run], tmp_path / "sweep"))
    assert_one_line(code, err, f"--runs {tmp_path / 'a'} and {run} are one run folder; give it once")
    assert not (tmp_path / "sweep").exists()


def test_runs_named_alike_in_other_folders_are_still_refused_and_dots_name_the_folder(tmp_path, monkeypatch):
    from latent_consistency.world.over_training import run_names

    with pytest.raises(UserError, match="two --runs are folders named run:"):
        run_names([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")])
    (tmp_path / "here" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert run_names(["."]) == run_names(["sub/.."]) == ["here"]


# --- commands to paste ----------------------------------------------------------------------------------------------------


def distill_data(words: list[str]) -> str:
    """What `lcm distill` reads as --data from `words` pasted after its other flags."""
    return build_parser().parse_args(["distill", "--teacher", "t", "--out", "o", *words]).data


def test_lcm_caches_suggestion_for_a_cache_named_with_a_dash_pastes(tiny_sd, tmp_path, capsys, monkeypatch):
    """It printed `--data -c1`, which argparse refuses ("expected one argument")."""
    monkeypatch.chdir(tmp_path)
    data = write_captioned_images(tmp_path / "images", 2)
    assert main(["cache", "--model", str(tiny_sd), "--data", str(data), "--out=-c1", "--batch-size", "2"]) == 0
    line = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert distill_data(shlex.split(line.split("train on it with ", 1)[1])) == "-c1"


def test_the_encoding_notes_commands_paste_for_paths_starting_with_a_dash():
    """`lcm cache --model -t --data -d ...` and `train with --data -o-latents`: each value was taken for a flag."""
    from latent_consistency.training.loop import encoding_note

    config = DistillConfig(teacher="-t x", data="-d", out="-o")
    note = encoding_note(config, SimpleNamespace(native_size=16), SimpleNamespace(encodes_images=True))
    cache = build_parser().parse_args(shlex.split(note.split("`")[1])[1:])
    assert (cache.model, cache.data, cache.out) == ("-t x", "-d", "-o-latents")
    assert distill_data(shlex.split(note.split("train with ", 1)[1].removesuffix(" for faster steps"))) == "-o-latents"


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path):
    """Refused, "Unexpected UTF-8 BOM", while captions and prompt files with one are read."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"steps": 3, "lr": 2e-5}), encoding="utf-8-sig")
    config = resolve_config(DistillConfig, "tiny", str(path), {"teacher": "t", "data": "d", "out": "o"})
    assert (config.steps, config.lr) == (3, 2e-5)
