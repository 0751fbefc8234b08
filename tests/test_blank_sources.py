"""A blank model, LoRA, preview decoder, teacher or init image (`--lora "$LORA"` with LORA unset) is refused in one line
before anything loads (`cli.arguments.source`): every loader took "" as the current folder, and `--lora ""` in a folder
holding a .pt file was refused as that file, a pickle; a folder that held a model would have been loaded."""

import pytest

COMMANDS = {
    "generate --model": ["generate", "x", "--model", "", "--out", "o"],
    "generate --lora": ["generate", "x", "--model", "m", "--lora", "", "--out", "o"],
    "generate --preview-decoder": ["generate", "x", "--model", "m", "--preview-decoder", " ", "--out", "o"],
    "generate --init-image": ["generate", "x", "--model", "m", "--init-image", "", "--out", "o"],
    "serve --model": ["serve", "--model", ""],
    "serve --lora": ["serve", "--model", "m", "--lora", ""],
    "serve --preview-decoder": ["serve", "--model", "m", "--preview-decoder", ""],
    "cache --model": ["cache", "--model", "", "--data", "d", "--out", "o"],
    "evaluate --lcm": ["evaluate", "--lcm", "", "--prompts", "p", "--out", "o"],
    "evaluate --lora": ["evaluate", "--lcm", "m", "--lora", "", "--prompts", "p", "--out", "o"],
    "evaluate --teacher": ["evaluate", "--lcm", "m", "--teacher", "\t", "--prompts", "p", "--out", "o"],
}


@pytest.mark.parametrize("case", COMMANDS)
def test_a_blank_source_is_refused_in_one_line(case, tmp_path, monkeypatch, run_error):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.pt").write_bytes(b"")  # what the blank name found before
    code, err = run_error(COMMANDS[case])
    flag = case.split()[1]
    assert code == 2 and len(err.splitlines()) == 1 and f"argument {flag}: is empty" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]
