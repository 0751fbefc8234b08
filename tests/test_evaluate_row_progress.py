"""`lcm evaluate` killed inside a row goes on from the row's last saved batch (`table.RowProgress`), not from the row's
start, and scores it as an unkilled run does."""

import json

import pytest
import torch

from latent_consistency.cli import main


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from tiny_models import write_captioned_images

    return write_captioned_images(tmp_path_factory.mktemp("images"), 8, size=(16, 16))


def scores(out):
    """Every row's numbers but its timings."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return {key: {k: v for k, v in row.items() if k not in ("ms_per_image", "peak_memory_mb")} for key, row in rows.items()}


@pytest.mark.parametrize("killed_at", [3, 7])  # the third batch of the first row (no results.json yet), of the second
def test_a_row_killed_inside_goes_on_from_its_last_saved_batch_to_the_same_scores(killed_at, tiny_lcm, image_folder, tmp_path, monkeypatch):
    from latent_consistency.evaluation import table
    from tiny_models import save_tiny_clip

    base = ["evaluate", "--lcm", str(tiny_lcm), "--prompts", str(image_folder), "--clip", str(save_tiny_clip(tmp_path / "clip")),
            "--steps", "1,2", "--guidance-scale", "2", "--samples", "8", "--batch-size", "2", "--device", "cpu"]
    real_generate, calls = table.generate, []
    monkeypatch.setattr(table, "generate", lambda *a, **k: calls.append(a[0].key) or real_generate(*a, **k))
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    whole = len(calls)  # 2 rows of 4 batches, then the grid's

    monkeypatch.setattr(table, "PROGRESS_SECONDS", 0.0)  # saved after every batch
    calls.clear()

    def dies(*a, **k):  # a row is 4 batches of 2
        calls.append(a[0].key)
        if len(calls) == killed_at:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(table, "generate", dies)
    out = tmp_path / "killed"
    assert main([*base, "--out", str(out)]) == 130
    rows = json.loads((out / "results.json").read_text())["rows"] if killed_at > 4 else {}
    assert len(rows) == killed_at // 4 and (out / table.PROGRESS_FILE).is_file()
    calls.clear()
    monkeypatch.setattr(table, "generate", lambda *a, **k: calls.append(a[0].key) or real_generate(*a, **k))
    assert main([*base, "--out", str(out)]) == 0
    assert len(calls) == whole - (killed_at - 1)  # not the batches scored before the kill (the killed one again)
    assert scores(out) == scores(tmp_path / "whole")
    assert not (out / table.PROGRESS_FILE).exists()


class Counting:
    """A scorer whose state is a count: what `RowProgress` saves and loads."""

    identity = "count"

    def __init__(self, n):
        self.n = n

    def state(self):
        return {"n": torch.tensor(self.n)}

    def load_state(self, state):
        self.n = int(state["n"])


def test_progress_of_another_row_evaluation_or_batch_size_is_not_taken_up(tmp_path):
    """Its scorers' states are loaded only for the same row, fingerprint, batch size and metrics; a file cut short is none."""
    from latent_consistency.evaluation.table import RowProgress

    path = tmp_path / "row-progress.pt"
    saved = RowProgress(path, "lcm|4|2", "abc", 8, saved_at=float("-inf"))
    saved.save([Counting(24)], 24, 1.5, [None, None, None])
    assert RowProgress(path, "lcm|4|2", "abc", 8).load([scorer := Counting(0)]) == (24, 1.5, [None, None, None]) and scorer.n == 24
    for other in (RowProgress(path, "lcm|2|2", "abc", 8), RowProgress(path, "lcm|4|2", "xyz", 8), RowProgress(path, "lcm|4|2", "abc", 4)):
        assert other.load([scorer := Counting(0)]) == (0, 0.0, []) and scorer.n == 0
    path.write_bytes(path.read_bytes()[:40])
    assert RowProgress(path, "lcm|4|2", "abc", 8).load([Counting(0)]) == (0, 0.0, [])


def test_the_judges_state_carries_its_counts_and_features(tmp_path):
    """A JudgeScorer resumed from its state computes what one given every batch computes (FID, KID and alignment)."""
    from latent_consistency.evaluation.table import EvalSet, JudgeScorer, ReferenceImages

    class Judge:
        def features(self, images):
            return images.flatten(1)[:, :6]

    def alignment(network, images, attributes):  # the fraction of images brighter than 0 in each channel, per "attribute"
        return {name: float((images[:, c].mean((1, 2)) > 0).float().mean()) for c, name in enumerate(("r", "g", "b"))} | {"mean": 0.0}

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 4, 4, generator=generator) * 2 - 1
    reference = ReferenceImages.of(torch.rand(12, 3, 4, 4, generator=generator) * 2 - 1)
    eval_set = EvalSet([f"p{i}" for i in range(12)], [None] * 12, reference, 1, 0)
    whole, resumed = JudgeScorer(Judge(), alignment), JudgeScorer(Judge(), alignment)
    for scorer in (whole, resumed):
        scorer.reset()
    parts = list(eval_set.parts(4))
    for part, batch in zip(parts, images.split(4)):
        whole.update(batch, part)
    for part, batch in zip(parts[:2], images.split(4)[:2]):
        resumed.update(batch, part)
    state = resumed.state()
    resumed = JudgeScorer(Judge(), alignment)
    resumed.reset()
    resumed.load_state(state)
    resumed.update(images[8:], parts[2])
    assert resumed.compute(eval_set) == whole.compute(eval_set)


def test_a_rows_progress_is_taken_up_only_for_the_models_it_was_sampled_with(tmp_path):
    """A row killed, its model distilled again, then rerun: its saved batches are the old model's images, not this one's."""
    from latent_consistency.evaluation.table import RowProgress

    path, models = tmp_path / "row-progress.pt", {"lcm": "/runs/lcm 0123456789abcdef", "lora": None, "style_loras": [["/s 0a", 0.5]]}
    RowProgress(path, "lcm|4|2", "abc", 8, models, saved_at=float("-inf")).save([Counting(16)], 16, 1.0, [None, None])
    assert RowProgress(path, "lcm|4|2", "abc", 8, models).load([scorer := Counting(0)]) == (16, 1.0, [None, None]) and scorer.n == 16
    again = models | {"lcm": "/runs/lcm fedcba9876543210"}
    assert RowProgress(path, "lcm|4|2", "abc", 8, again).load([scorer := Counting(0)]) == (0, 0.0, []) and scorer.n == 0
