"""`lcm evaluate --out FOLDER` rerun with other settings than the evaluation there was made with. was: refused with "another
evaluation (other models or LoRAs, prompts, seed, ...)", not saying which setting; now the one line names the first that
differs, with its value then and now, as `lcm generate --skip-existing` does, and still touches nothing in the folder. A
record of an earlier version, which lacks the settings, is said to be one, not claimed to differ. And `--samples N` over a
prompt file of fewer prompts says in a note how many are used (was: silently fewer)."""

import json
import shutil

import pytest
import torch

from test_evaluate_inputs import Linear  # the FID Inception stand-in


@pytest.fixture(scope="module")
def data(tiny_lcm, tiny_sd, tmp_path_factory):
    """The tiny LCM and teacher and a copy of each at another path, three prompts and two others, two folders of real images
    of other pixels, and two Inception stand-ins."""
    from tiny_models import write_captioned_images

    folder = tmp_path_factory.mktemp("rerun")
    (folder / "prompts.txt").write_text("a red star\na blue ring\na red ring\n")
    (folder / "other.txt").write_text("a blue star\na red ring\n")
    for name, seed in (("inception.pt", 0), ("other-inception.pt", 1)):
        torch.manual_seed(seed)
        torch.jit.script(Linear()).save(str(folder / name))
    return dict(lcm=tiny_lcm, sd=tiny_sd, other_lcm=shutil.copytree(tiny_lcm, folder / "other-lcm"),
                other_sd=shutil.copytree(tiny_sd, folder / "other-sd"), prompts=folder / "prompts.txt", other_prompts=folder / "other.txt",
                images=write_captioned_images(folder / "images", 4), other_images=write_captioned_images(folder / "other-images", 4, size=(20, 20)),
                inception=folder / "inception.pt", other_inception=folder / "other-inception.pt")


def evaluate(data, out, **changed) -> list[str]:
    """`lcm evaluate` of the LCM and its teacher on two of the prompts, with the options in `changed` given other values
    (None: left out)."""
    options = {"--lcm": data["lcm"], "--teacher": data["sd"], "--prompts": data["prompts"], "--samples": 2, "--reference": data["images"],
               "--inception": data["inception"], "--steps": 1, "--seed": 0, "--out": out, "--device": "cpu"}
    options |= {f"--{key.replace('_', '-')}": value for key, value in changed.items()}
    return ["evaluate", *(str(part) for option, value in options.items() if value is not None for part in (option, value))]


def files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished evaluation: the LCM's row and the teacher's six."""
    from latent_consistency.cli import main

    out = tmp_path_factory.mktemp("finished") / "eval"
    assert main(evaluate(data, out)) == 0
    return out


def refusal(run_error, argv) -> str:
    """The one line of a rerun refused (exit 2), less the notes printed before it."""
    code, err = run_error(argv)
    lines = [line for line in err.splitlines() if "note:" not in line]
    assert code == 2 and len(lines) == 1 and "another evaluation" in lines[0], err
    return lines[0]


@pytest.mark.parametrize("case", ["more samples", "another seed", "more images per prompt", "another teacher", "another lcm",
                                  "other prompts", "another reference", "another inception"])
def test_a_rerun_with_another_setting_is_refused_naming_it(case, data, finished, tmp_path, run_error):
    def path(key):
        return data[key].resolve().as_posix()

    changed, said = {
        "more samples": ({"samples": 3}, "--samples 3 (this folder was made with 2)"),
        "another seed": ({"seed": 5}, "--seed 5 (this folder was made with 0)"),
        "more images per prompt": ({"images_per_prompt": 2}, "--images-per-prompt 2 (this folder was made with 1)"),
        "another teacher": ({"teacher": data["other_sd"]}, f"--teacher {path('other_sd')} (this folder was made with {path('sd')})"),
        "another lcm": ({"lcm": data["other_lcm"]}, f"--lcm {path('other_lcm')} (this folder was made with {path('lcm')})"),
        "other prompts": ({"prompts": data["other_prompts"]}, f"--prompts {path('other_prompts')} (this folder was made with {path('prompts')})"),
        "another reference": ({"reference": data["other_images"]}, f"--reference {path('other_images')} (this folder was made with {path('images')})"),
        "another inception": ({"inception": data["other_inception"]},
                              f"--inception {path('other_inception')} (this folder was made with {path('inception')})"),
    }[case]
    before = files(finished)
    line = refusal(run_error, evaluate(data, finished, **changed))
    assert f"another evaluation: {said}; " in line, line
    assert files(finished) == before


@pytest.mark.parametrize("case", ["prompts edited", "reference images replaced"])
def test_a_rerun_after_its_files_changed_on_disk_says_which(case, data, tmp_path, run_error):
    """The same paths, other contents: a prompt file or reference image edited (a model distilled again into its folder
    has its rows scored again: test_evaluate_extend)."""
    lcm, prompts, images = (shutil.copytree(data["lcm"], tmp_path / "lcm"), shutil.copy(data["prompts"], tmp_path / "prompts.txt"),
                            shutil.copytree(data["images"], tmp_path / "images"))
    argv = evaluate(data, tmp_path / "out", lcm=lcm, prompts=prompts, reference=images, teacher=None)
    assert run_error(argv)[0] == 0
    if case == "prompts edited":
        prompts.write_text("a red star\na green ring\na red ring\n")
        said = f"the prompts of --prompts {prompts.resolve().as_posix()} changed since this folder was made"
    else:
        shutil.copy(data["other_images"] / "0.png", images / "0.png")
        said = f"the reference images (--reference {images.resolve().as_posix()}) changed since this folder was made"
    before = files(tmp_path / "out")
    assert f"another evaluation: {said}; " in refusal(run_error, argv)
    assert files(tmp_path / "out") == before


@pytest.mark.parametrize("record", ["no settings", "no seed"])
def test_a_record_of_an_earlier_version_is_not_claimed_to_differ(record, data, finished, tmp_path, run_error):
    """results.json of an earlier version holds no settings, or (a later setting) lacks one: the refusal says it cannot
    tell, rather than naming a setting as changed."""
    out = shutil.copytree(finished, tmp_path / "eval")
    results = json.loads((out / "results.json").read_text())
    if record == "no settings":
        results.pop("settings", None)  # as an earlier version wrote it
        said = "other models or LoRAs, prompts, seed, reference images or metrics (its results.json, written by an earlier version"
    else:
        del results["settings"]["seed"]
        said = "this folder's record, from an earlier version of lcm evaluate, does not say which --seed it was made with"
    (out / "results.json").write_text(json.dumps(results))
    before = files(out)
    line = refusal(run_error, evaluate(data, out, seed=5))
    assert f"another evaluation: {said}" in line and "was made with 0" not in line, line
    assert files(out) == before


def test_more_samples_than_prompts_says_how_many_are_used_and_still_continues(data, tmp_path, capsys):
    """--samples 5 over a file of 3 prompts: a note says the evaluation uses those 3 (and, with --images-per-prompt 2, 6
    images a row), as report.md counts them. It is the evaluation made with --samples 3, continued (a step count added,
    listed first), not another; without --samples (its default is a cap) no note."""
    from latent_consistency.cli import main

    out = tmp_path / "out"
    assert main(evaluate(data, out, samples=3, teacher=None)) == 0
    assert "note:" not in capsys.readouterr().err
    first = json.loads((out / "results.json").read_text())["rows"]
    assert main(evaluate(data, out, samples=5, teacher=None, steps="2,1")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [f"lcm evaluate: note: --prompts {data['prompts']} holds 3 prompt(s), fewer than --samples 5: the evaluation uses those 3"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"lcm|1|8", "lcm|2|8"} and rows["lcm|1|8"] == first["lcm|1|8"]

    assert main(evaluate(data, tmp_path / "pairs", samples=5, images_per_prompt=2, teacher=None)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 2 and notes[0].endswith("the evaluation uses those 3, 6 images a row at --images-per-prompt 2"), notes
    assert "the reference holds 4 usable image(s), fewer than the 6 each row generates" in notes[1]  # --reference: 4 images
    assert "3 prompts of" in (tmp_path / "pairs" / "report.md").read_text()
    assert json.loads((tmp_path / "pairs" / "results.json").read_text())["rows"]["lcm|1|8"]["images"] == 6
