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

    # Quality over training of that run: every checkpoint scored at the run's validation guidance scale
    from latent_consistency.evaluation import over_training

    assert over_training.main(["--run", str(out / "distill"), "--world", str(out / "world-tiny"), "--samples", "4", "--device", "cpu"]) == 0
    rows = json.loads((out / "distill" / "over_training.json").read_text())
    assert [r["step"] for r in rows] == [3]
    assert all(r[f"fid_{n}"] >= 0 and 0 <= r[f"alignment_{n}"] <= 1 for r in rows for n in (1, 2, 4))
    errors = {k: v for k, v in rows[0].items() if k.startswith("ode_error_")}
    assert len(errors) >= 4 and all(0 <= v < float("inf") for v in errors.values()), errors
    # the guidance response between the ends of the trained range (g ∈ [1, 2] in the world preset), at the same timesteps
    responses = {k.removeprefix("omega_response_"): v for k, v in rows[0].items() if k.startswith("omega_response_")}
    assert responses.keys() == {k.removeprefix("ode_error_") for k in errors} and all(abs(v) < float("inf") for v in responses.values())
    assert "ω response t=999" in (out / "distill" / "over_training.md").read_text()
    assert (out / "distill" / "over_training.png").is_file()

    # ... and of an LCM-LoRA run on the same world (no ω input: its response is 0 at every t)
    from latent_consistency.cli import main as lcm

    lora = out / "lora"
    assert lcm(["distill", "--preset", "tiny", "--adapter", "lora", "--lora-rank", "4", "--teacher", str(out / "world-tiny"),
                "--data", str(out / "latents"), "--out", str(lora), "--guidance-scale-min", "1", "--guidance-scale-max", "3"]) == 0
    assert over_training.main(["--run", str(lora), "--world", str(out / "world-tiny"), "--samples", "4", "--device", "cpu"]) == 0
    rows = json.loads((lora / "over_training.json").read_text())
    assert [r["step"] for r in rows] == [2, 4] and all(r[f"fid_{n}"] >= 0 for r in rows for n in (1, 2, 4))
    assert all(v == 0 for r in rows for k, v in r.items() if k.startswith("omega_response_"))
