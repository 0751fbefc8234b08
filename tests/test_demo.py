"""The README's main job end to end, on the tiny plumbing world (quality is not the point here)."""

import json

from latent_consistency.demo import main


def test_demo_end_to_end_on_the_tiny_world(tmp_path):
    """`--world-preset tiny` builds that world even though the default one is shipped."""
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--world-preset", "tiny", "--distill-steps", "3", "--eval-samples", "8", "--device", "cpu"]) == 0
    assert (out / "world-tiny" / "world.json").is_file()
    assert (out / "distill" / "lcm" / "model_index.json").is_file()
    assert (out / "grid.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert len(report["results"]) == 7 and all(r["fid"] >= 0 for r in report["results"].values())
    # A rerun reuses every finished part.
    assert main(["--out", str(out), "--world-preset", "tiny", "--distill-steps", "3", "--eval-samples", "8", "--device", "cpu"]) == 0
