"""`lcm evaluate` rerun into its --out with another model's rows added. was: the fingerprint digested every model, so
`--teacher` added to an LCM-only evaluation was refused as "another evaluation" (the LCM's rows sampled again from
scratch in another folder), a teacher left out likewise, and an LCM distilled again into its folder too; and a rerun
said nothing of the rows it took from results.json. Now the fingerprint is what every row shares (prompts, noise,
reference images, metrics) and each row records the models it was sampled with (`table.row_models`): a model added samples
its rows alone, a model whose files changed has its rows scored again, a model elsewhere is still another evaluation
(named), a results.json of format 3 is taken up, and the rerun says "reused N row(s) from .../results.json, scored M"."""

import json
import os
import shutil

import pytest
import torch

from latent_consistency.cli import main
from test_evaluate_inputs import Linear  # the FID Inception stand-in

TEACHER_ROWS = ["ddim|1|8", "dpm|1|8", "dpm++|1|8", "dpm++|25|8", "dpm++|50|8"]


@pytest.fixture(scope="module")
def data(tiny_lcm, tiny_sd, tmp_path_factory):
    """The tiny LCM and teacher, a copy of the teacher elsewhere, two prompts, real images and an Inception stand-in."""
    from tiny_models import write_captioned_images

    folder = tmp_path_factory.mktemp("extend")
    (folder / "prompts.txt").write_text("a red star\na blue ring\n")
    torch.manual_seed(0)
    torch.jit.script(Linear()).save(str(folder / "inception.pt"))
    return dict(lcm=tiny_lcm, sd=tiny_sd, other_sd=shutil.copytree(tiny_sd, folder / "other-sd"), prompts=folder / "prompts.txt",
                images=write_captioned_images(folder / "images", 4), inception=folder / "inception.pt")


def evaluate(data, out, **changed) -> list[str]:
    """`lcm evaluate` of the LCM and its teacher at 1 step on the two prompts, with the options in `changed` given other
    values (None: left out)."""
    options = {"--lcm": data["lcm"], "--teacher": data["sd"], "--prompts": data["prompts"], "--reference": data["images"],
               "--inception": data["inception"], "--steps": 1, "--out": out, "--device": "cpu"}
    options |= {f"--{key.replace('_', '-')}": value for key, value in changed.items()}
    return ["evaluate", *(str(part) for option, value in options.items() if value is not None for part in (option, value))]


def rows(out) -> dict[str, dict]:
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture
def scored(monkeypatch) -> list[str]:
    """The keys of the rows sampled and scored (`table.score_row`), in order."""
    from latent_consistency.evaluation import table

    keys, score_row = [], table.score_row
    monkeypatch.setattr(table, "score_row", lambda row, *a, **k: keys.append(row.key) or score_row(row, *a, **k))
    return keys


@pytest.fixture(scope="module")
def lcm_only(data, tmp_path_factory):
    """A finished evaluation of the LCM alone."""
    out = tmp_path_factory.mktemp("lcm-only") / "eval"
    assert main(evaluate(data, out, teacher=None)) == 0
    return out


def test_a_teacher_added_samples_its_rows_alone_and_left_out_keeps_them(data, lcm_only, tmp_path, scored, run_error, capsys):
    """The teacher's rows sampled alone, the rerun saying so, each row recording its models; then the teacher left out: its
    rows stay in results.json (a note says so) and are reused when it is given again; a teacher at another path would take
    their place, and is refused naming it, the folder untouched."""
    from latent_consistency.evaluation.table import model_identity

    out = shutil.copytree(lcm_only, tmp_path / "eval")
    capsys.readouterr()
    assert main(evaluate(data, out)) == 0
    assert scored == TEACHER_ROWS  # not the LCM's row again
    after = rows(out)
    assert after["lcm|1|8"] == rows(lcm_only)["lcm|1|8"] and set(after) == {"lcm|1|8", *TEACHER_ROWS}
    assert after["lcm|1|8"]["models"] == {"lcm": model_identity(str(data["lcm"])), "lora": None, "style_loras": []}
    assert all(after[key]["models"] == {"teacher": model_identity(str(data["sd"]))} for key in TEACHER_ROWS)
    assert "| DDIM (CFG) |" in (out / "report.md").read_text()
    assert f"reused 1 row(s) from {out / 'results.json'}, scored 5\n" in capsys.readouterr().out

    scored.clear()
    code, err = run_error(evaluate(data, out, teacher=None))
    assert code == 0 and scored == [] and "also keeps 5 row(s) of earlier runs here (other --steps, scales or models)" in err
    assert "DDIM" not in (out / "report.md").read_text() and rows(out) == after
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    code, err = run_error(evaluate(data, out, teacher=data["other_sd"]))
    lines = [line for line in err.splitlines() if "note:" not in line]
    said = f"--teacher {data['other_sd'].resolve().as_posix()} (this folder was made with {data['sd'].resolve().as_posix()})"
    assert code == 2 and len(lines) == 1 and f"another evaluation: {said}; " in lines[0], err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before and scored == []
    assert run_error(evaluate(data, out))[0] == 0 and scored == [] and rows(out) == after


def test_more_steps_add_their_rows_and_a_rerun_of_the_same_reuses_every_one(data, lcm_only, tmp_path, scored, capsys):
    out = shutil.copytree(lcm_only, tmp_path / "eval")
    capsys.readouterr()
    assert main(evaluate(data, out, teacher=None, steps="1,2")) == 0
    assert scored == ["lcm|2|8"]
    assert f"reused 1 row(s) from {out / 'results.json'}, scored 1\n" in capsys.readouterr().out
    assert main(evaluate(data, out, teacher=None, steps="1,2")) == 0
    assert scored == ["lcm|2|8"]
    assert f"reused 2 row(s) from {out / 'results.json'}, scored 0\n" in capsys.readouterr().out


def test_a_fresh_evaluation_says_nothing_of_rows_reused(data, tmp_path, capsys):
    assert main(evaluate(data, tmp_path / "eval", teacher=None)) == 0
    assert "reused" not in capsys.readouterr().out


def test_an_lcm_distilled_again_into_its_folder_has_its_rows_scored_again_the_teachers_kept(data, tmp_path, scored, capsys):
    lcm = shutil.copytree(data["lcm"], tmp_path / "lcm")
    out = tmp_path / "eval"
    assert main(evaluate(data, out, lcm=lcm)) == 0
    before = rows(out)
    weights = next((lcm / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    scored.clear()
    capsys.readouterr()
    assert main(evaluate(data, out, lcm=lcm)) == 0
    assert scored == ["lcm|1|8"]
    after = rows(out)
    assert all(after[key] == before[key] for key in TEACHER_ROWS)
    assert after["lcm|1|8"]["models"] != before["lcm|1|8"]["models"]
    assert (f"reused 5 row(s) from {out / 'results.json'}, scored 1 (1 of them again: their models changed since they were "
            "scored)") in capsys.readouterr().out


def as_format_3(out, fingerprint: str) -> None:
    """results.json of `out` as lcm evaluate wrote it before (format 3): the fingerprint of every model, no models per row."""
    saved = json.loads((out / "results.json").read_text())
    saved |= {"format": 3, "fingerprint": fingerprint, "rows": {key: {k: v for k, v in row.items() if k != "models"}
                                                                 for key, row in saved["rows"].items()}}
    (out / "results.json").write_text(json.dumps(saved))


@pytest.mark.parametrize("rerun", ["the same", "a teacher added", "another lcm"])
def test_results_of_format_3_are_taken_up_with_the_models_given_now(rerun, data, tmp_path, scored, monkeypatch, run_error):
    """Format 3's fingerprint digested [prompts, images per prompt, seed, *models, *metrics] and the reference images:
    a file of it whose fingerprint is this evaluation's with the models given now (or before the teacher was added) has
    its rows reused, each given its models when results.json is next written; one of other models is refused, as before."""
    from latent_consistency.evaluation.table import EvalSet, model_identity

    calls, fingerprints = [], EvalSet.fingerprints
    monkeypatch.setattr(EvalSet, "fingerprints", lambda self, *lists: calls.append((self, lists)) or fingerprints(self, *lists))
    out = tmp_path / "eval"
    assert main(evaluate(data, out, teacher=None)) == 0
    eval_set, (metrics,) = calls[0]  # no results.json yet: this version's fingerprint alone
    lcm = "/elsewhere/lcm 0123456789abcdef" if rerun == "another lcm" else model_identity(str(data["lcm"]))
    first = rows(out)
    as_format_3(out, eval_set.fingerprint(lcm, *metrics))
    scored.clear()
    code, err = run_error(evaluate(data, out, teacher=data["sd"] if rerun == "a teacher added" else None, steps="1"))
    if rerun == "another lcm":
        assert code == 2 and "another evaluation" in err.splitlines()[-1] and scored == [], err
        return
    assert code == 0, err
    saved = json.loads((out / "results.json").read_text())
    if rerun == "the same":
        assert scored == [] and saved["format"] == 3  # nothing scored, nothing written
        return
    assert scored == TEACHER_ROWS and saved["format"] == 4
    assert saved["rows"]["lcm|1|8"] == first["lcm|1|8"]  # its models given it as this version records them


def test_the_exact_lcms_row_is_of_the_teacher_and_the_lcm_without_its_style_loras():
    """The exact LCM samples the teacher's ODE on the LCM's timesteps: a style LoRA changed does not make it another row."""
    from types import SimpleNamespace

    from latent_consistency.evaluation.table import EXACT, GUIDED_DISTILL, Row, row_models

    lcm, teacher, guided = SimpleNamespace(source="lcm"), SimpleNamespace(source="sd"), {0: SimpleNamespace(source="gd")}
    parts = {"lora": "lora", "style_loras": [["style", 0.5]]}
    assert row_models(Row(EXACT, 2, 8.0), lcm, teacher, guided, parts, str) == {"lcm": "lcm", "lora": "lora", "teacher": "sd"}
    assert row_models(Row("lcm", 2, 8.0), lcm, teacher, guided, parts, str) == {"lcm": "lcm"} | parts
    assert row_models(Row(GUIDED_DISTILL, 4, 8.0), lcm, teacher, guided, parts, str) == {"guided_distill": ["gd"]}
    assert row_models(Row("ddim", 2, 8.0), lcm, None, guided, parts, str) is None  # a teacher's row, no teacher given
