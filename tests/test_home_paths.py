"""A quoted `~` in a path flag is the home folder, in every command, as the shell expands it unquoted; prompts keep theirs."""

from __future__ import annotations

import pytest

from test_review_inputs_round2 import value_flags

PATH_FLAGS = {("generate",): ["--model", "--out", "--lora", "--init-image", "--prompt-file", "--preview-decoder"],
              ("distill",): ["--teacher", "--data", "--eval-data", "--out", "--config", "--student-init"],
              ("finetune",): ["--model", "--data", "--out"], ("cache",): ["--model", "--data", "--out"],
              ("evaluate",): ["--lcm", "--teacher", "--prompts", "--out"], ("serve",): ["--model"]}


@pytest.fixture
def parser(monkeypatch, tmp_path):
    from latent_consistency.cli import build_parser

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    parser = build_parser()
    for _, _, action in value_flags(parser):
        action.required = False  # each flag alone
    return parser


def test_path_flags_expand_the_home_folder(parser, tmp_path):
    # was: `--out "~/run"` wrote into ./~/run (a later `rm -rf ~` of it takes the home folder), `--model "~/lcm"` did not
    # exist, while `--data "~/images"` read the home folder's
    home = tmp_path / "home"
    for words, flags in PATH_FLAGS.items():
        for flag in flags:
            value = getattr(parser.parse_args([*words, flag, "~/x y"]), flag[2:].replace("-", "_"))
            assert value in (f"{home}/x y", [f"{home}/x y"]), (words, flag, value)
    args = parser.parse_args(["generate", "--style-lora", "~/s.safetensors:0.5"])
    assert args.style_lora == [f"{home}/s.safetensors:0.5"]


def test_prompts_keep_their_tilde(parser):
    args = parser.parse_args(["generate", "~/not a path", "--prompt", "~x", "--negative-prompt", "~y"])
    assert (args.prompts, args.prompt, args.negative_prompt) == (["~/not a path"], ["~x"], "~y")
    assert parser.parse_args(["distill", "--validation-prompts", "~a", "b"]).validation_prompts == ["~a", "b"]
