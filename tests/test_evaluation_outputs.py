"""What `lcm evaluate` and `lcm evaluate sweep` write for a reader: plots whose lines read apart, with labelled axes and
legends off the data, and reports that say what they measured. Tiny hand-made results, no models."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from latent_consistency.evaluation import table
from latent_consistency.evaluation.table import REFERENCE_STEPS, Row, table_rows
from latent_consistency.world import over_training

METHODS = {"lcm": "LCM", "ddim": "DDIM (CFG)", "dpm": "DPM-Solver (CFG)", "dpm++": "DPM-Solver++ (CFG)"}


def fake_results(steps=(1, 2, 4), scales=(1.0, 2.0)) -> dict[str, dict]:
    """results.json rows as `run_table` makes them, with numbers that tell the rows apart."""
    results = {}
    for i, row in enumerate(table_rows(list(steps), list(scales), teacher=True)):
        passes = 1 if row.sampler == "lcm" else 2
        results[row.key] = {"sampler": row.sampler, "steps": row.steps, "guidance_scale": row.guidance_scale,
                            "method": METHODS[row.sampler], "network_evaluations": passes * row.steps, "ms_per_image": 1.0 + i,
                            "peak_memory_mb": None, "images": 4, "judge_fid": 10.0 + 7 * i, "judge_kid": 0.01,
                            "judge_alignment": 0.5 + 0.01 * i}
    return results


def lines_of(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_steps_plot_keeps_references_apart_and_lines_distinguishable():
    """steps.png: the 25/50-step DPM-Solver++ references are their own dashed series (not joined to the few-step
    curve), every method has its own colour and marker (DPM-Solver and DPM-Solver++ overlap at few steps), ticks are
    the step counts in plain numbers, axes say what they measure, one legend sits outside the panels, and the plotted
    numbers are results.json's."""
    results = fake_results()
    fig = table.steps_figure(results)
    try:
        axes = fig.axes
        assert len(axes) == 4 and all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
        fid_ax, follow_ax = axes[0], axes[1]
        lines = lines_of(fid_ax)
        assert list(lines[METHODS["dpm++"]].get_xdata()) == [1, 2, 4]
        reference = lines[f"{METHODS['dpm++']}, reference"]
        assert list(reference.get_xdata()) == list(REFERENCE_STEPS) and reference.get_linestyle() == "--"
        assert list(reference.get_ydata()) == [results[f"dpm++|{n}|1"]["judge_fid"] for n in REFERENCE_STEPS]
        assert list(lines["LCM"].get_ydata()) == [results[f"lcm|{n}|1"]["judge_fid"] for n in (1, 2, 4)]
        assert list(lines_of(follow_ax)["LCM"].get_ydata()) == [results[f"lcm|{n}|1"]["judge_alignment"] for n in (1, 2, 4)]
        few_step = [line for label, line in lines.items() if not label.endswith("reference")]
        assert len({(line.get_color(), line.get_marker()) for line in few_step}) == len(few_step) == 4
        fig.canvas.draw()
        assert [t.get_text() for t in fid_ax.get_xticklabels()] == ["1", "2", "4", "25", "50"]
        assert "lower is better" in fid_ax.get_ylabel() and "higher is better" in follow_ax.get_ylabel()
        assert fid_ax.get_xlabel() == "sampling steps" and fid_ax.get_title() == "g = 1 (ω = 0)"
        assert not any("^" in t.get_text() or "times" in t.get_text() for t in fid_ax.get_yticklabels(which="both"))
    finally:
        plt.close(fig)


def test_guidance_plot_gives_every_line_its_own_style_and_a_legend_off_the_data():
    """guidance.png (Figures 4-5): 4 methods × 3 step counts are more lines than matplotlib's ten colours; colour and
    marker say the method, line style the step count, so no two lines look alike; the legend is outside the panels."""
    results = fake_results(scales=(1.0, 1.5, 2.0))
    fig = table.guidance_figure(results)
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert len(lines) == 12 and len(fig.legends) == 1 and all(a.get_legend() is None for a in fig.axes)
        assert len({(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}) == 12
        assert all(len(line.get_xdata()) == 3 for line in lines)  # one point per ω; the 25/50-step references are left out
        assert "LCM, 1 step" in lines_of(ax) and "DDIM (CFG), 4 steps" in lines_of(ax)
        assert ax.get_yscale() == "log" and "ω" in ax.get_xlabel() and "lower is better" in ax.get_ylabel()
    finally:
        plt.close(fig)


def test_write_plots_leaves_no_figure_open(tmp_path):
    before = set(plt.get_fignums())
    written = table.write_plots(fake_results(), tmp_path)
    assert [p.name for p in written] == ["steps.png", "guidance.png"] and set(plt.get_fignums()) == before


def test_report_says_what_it_measured_and_orders_costs_by_scale():
    """report.md: a line saying what FID and alignment are (and which way is better), what a network evaluation and
    the ms are; the cost table by guidance scale, as the tables above it; cells equal results.json rounded."""
    results = fake_results()
    text = table.write_report(results, [1, 2, 4], None, "Evaluation", ["notes"])
    assert "FID is the Fréchet distance" in text and "world judge's features (lower is better)" in text
    assert "alignment is the fraction" in text and "network passes per image" in text
    cost = text.split("## Cost per image")[1].splitlines()
    scales = [float(line.split("|")[3]) for line in cost if line.startswith("| ") and "method" not in line]
    assert scales == sorted(scales) and len(scales) == len(results)
    r = results["dpm|2|2"]
    assert f"| DPM-Solver (CFG) | {results['dpm|1|2']['judge_fid']:.2f} | {r['judge_fid']:.2f} |" in text


def test_the_cost_table_orders_step_counts_as_the_tables_above():
    """--steps 8,1,4: the FID columns read 1, 4, 8 and the cost table's rows 8, 1, 4 (the order given); within a scale
    and a method they are by step count now."""
    results = dict(reversed(list(fake_results().items())))  # rows made in another order
    cost = table.write_report(results, [1, 2, 4], None, "Evaluation", ["notes"]).split("## Cost per image")[1].splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:4]] for line in cost if line.startswith("| ") and "method" not in line]
    for g in {row[2] for row in rows}:
        for method in {row[0] for row in rows}:
            steps = [int(row[1]) for row in rows if row[0] == method and row[2] == g]
            assert steps == sorted(steps), (method, g, steps)


def test_grid_rows_say_steps_and_labels_fit(tmp_path, monkeypatch):
    """grid.png: a row label says "4 steps, g = 1.5" (not "4 g=1.5"), and the label column is wide enough for the
    longest label, so that it does not run under the first image."""
    assert table.grid_label(Row("lcm", 1, 2.0)) == "LCM, 1 step, g = 2"
    long_row = Row(table.EXACT, 4, 1.5)
    label = table.grid_label(long_row)
    assert label == "exact LCM (teacher ODE), 4 steps, g = 1.5"
    monkeypatch.setattr(table, "generate", lambda row, lcm, teacher, few, device, guided=None, batch=None: torch.zeros(len(few.prompts), 3, 8, 8))
    eval_set = table.EvalSet(["a", "b"], None, torch.zeros(2, 3, 8, 8))
    path = table.write_grid([Row("lcm", 1, 1.5), long_row], None, None, eval_set, tmp_path, "cpu", columns=2)
    width = Image.open(path).width
    tile = 8 * (96 // 8)
    assert width - 2 * tile >= 6 * len(label)


@pytest.fixture
def run_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / over_training.CACHE_FILE).write_text(json.dumps({"settings": {"world": "/w", "samples": 3, "guidance_scale": 2.0}, "rows": {}}))
    rows = [{"step": s, "fid_4": 30.0 - s / 100, "alignment_4": 0.9, "ode_error_999": 0.5, "ode_error_99": 0.01,
             "omega_response_999": -0.0001, "omega_response_99": 0.25} for s in (250, 500)]
    return run, rows


def test_over_training_report_states_settings_and_has_no_negative_zero(run_rows, monkeypatch):
    """over_training.md says what its rows measured (g, prompts, world) and prints a response of -0.0001 as 0.000;
    over_training.png has one legend for the t lines outside the panels and its figure is closed."""
    run, rows = run_rows
    figures = []
    monkeypatch.setattr(over_training, "savefig_atomic", lambda fig, path, **kw: figures.append(fig))
    before = set(plt.get_fignums())
    over_training.write_report(run, rows, (4,))
    text = (run / "over_training.md").read_text()
    assert "-0.000" not in text and "| 0.000 | 0.250 |" in text
    assert "g = 2" in text and "first 3 reference prompts" in text and "ω response" in text
    fig = figures[0]
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes[1:])
    assert set(plt.get_fignums()) == before


def test_sweep_plot_axis_names_its_metric(run_rows, tmp_path, monkeypatch):
    _, rows = run_rows
    figures = []
    monkeypatch.setattr(over_training, "savefig_atomic", lambda fig, path, **kw: figures.append(fig))
    over_training.write_sweep({"a": rows}, tmp_path, (4,))
    ax = figures[0].axes[0]
    assert "judge features" in ax.get_ylabel() and ax.get_title() == "4-step sampling"
    assert list(ax.get_lines()[0].get_ydata()) == [r["fid_4"] for r in rows]


def test_figure_2_is_drawn_at_the_lcms_own_guidance_scale_or_the_nearest_evaluated():
    """`grid.png` shows the LCM at the g it samples at by default, not at whichever scale was listed first: a sweep
    1,1.5,2 of an LCM recorded at g = 2 draws g = 2, not an unguided teacher."""
    from latent_consistency.cli.evaluate import grid_guidance_scale

    assert grid_guidance_scale([1.0, 1.5, 2.0], preferred=2.0) == 2.0
    assert grid_guidance_scale([2.0, 4.0, 8.0], preferred=7.5) == 8.0
    assert grid_guidance_scale([1.0, 3.0], preferred=2.0) == 3.0  # a tie goes to the larger
    assert grid_guidance_scale([4.0], preferred=1.0) == 4.0
