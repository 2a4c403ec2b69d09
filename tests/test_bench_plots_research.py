"""The research plots (bench/plots_research.py) and the run figures they read
(bench/plot_figures.py), on a small synthetic results dict and on committed results."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_mohge.bench import plot_figures, plots_research
from megatron_mohge.bench.plots import write_plots

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layers():
    """Two MoE layers whose hot rank differs: the layer-mean vector is flat, each layer not."""
    def entry(ep, hot):
        ranks = [1.0] * ep
        ranks[hot] += 0.2
        ranks[(hot + 1) % ep] -= 0.2
        return {"ep": ep, "all_size": ranks, "all_size_max_over_mean": 1.2,
                "contiguous": ranks[::-1], "contiguous_max_over_mean": 1.2}

    return [{"rank_flops": {str(ep): entry(ep, hot) for ep in (2, 4, 8)}} for hot in (0, 1)]


def _by_width(losses):
    return {"widths": [16, 32, 64], "mean_loss": losses, "token_share": [0.5, 0.3, 0.2],
            "layers": [{"layer_number": 1, "mean_loss": losses, "token_share": [0.5, 0.3, 0.2]},
                       {"layer_number": 3, "mean_loss": [losses[0], None, losses[2]],
                        "token_share": [0.6, 0.0, 0.4]}]}


def make_results():
    curves = {"iteration": [10, 20, 30, 40], "train_loss": [5.0, 4.0, 3.5, 3.2]}
    per_layer = plot_figures.rank_flops_per_layer(_layers())
    mohge = {"kind": "mohge", "activated_params_per_token": 1e5, "heldout_loss": 3.1,
             "tokens_per_step": 512, "group_loss_start_iteration": 20, "curves": curves,
             "rank_flops_per_layer": per_layer, "heldout_loss_by_width": _by_width([2.9, 3.1, 3.4]),
             "per_seed": [{"heldout_loss_by_width": _by_width([2.8, 3.0, 3.5])},
                          {"heldout_loss_by_width": _by_width([3.0, 3.2, 3.3])}]}
    moe = {"kind": "moe", "activated_params_per_token": 1.2e5, "heldout_loss": 3.12,
           "tokens_per_step": 512, "curves": dict(curves, train_loss=[5.0, 4.1, 3.6, 3.3])}
    comp = {"loss_ratio_per_seed": [0.99, 1.0, 0.995], "loss_ratio_mean": 0.995,
            "loss_ratio_ci95": [0.98, 1.01], "seeds": [1, 2, 3]}
    return {"baseline": "moe", "runs": {"moe": moe, "mohge": mohge},
            "comparisons": {"mohge_vs_moe": comp}}


def test_per_layer_rank_flops_keep_what_the_layer_mean_hides():
    per = plot_figures.rank_flops_per_layer(_layers())
    assert set(per) == {"2", "4", "8"} and set(per["4"]) == {"all_size", "contiguous"}
    assert per["2"]["all_size"]["ranks"] == [[1.2, 0.8], [0.8, 1.2]]
    assert per["2"]["all_size"]["max_over_mean"] == [1.2, 1.2]
    mean_vector = [sum(col) / 2 for col in zip(*per["2"]["all_size"]["ranks"])]
    assert max(mean_vector) == pytest.approx(1.0)  # what rank_load.png would show


def test_group_loss_start_is_the_fraction_of_the_run():
    def run(kind, fraction, coeff=0.01, iters=300):
        losses = SimpleNamespace(group_start_fraction=fraction, group_coeff=coeff)
        return SimpleNamespace(moe=SimpleNamespace(kind=kind, mohge=SimpleNamespace(
            losses=losses)), train=SimpleNamespace(iters=iters))

    assert plot_figures.group_loss_start(run("mohge", 0.5)) == 150
    assert plot_figures.group_loss_start(run("mohge", 0.0)) is None  # on from the start
    assert plot_figures.group_loss_start(run("mohge", 0.5, coeff=0.0)) is None  # no loss
    assert plot_figures.group_loss_start(run("moe", 0.5)) is None


@pytest.mark.parametrize("fn, arg, name", [
    (plots_research.plot_rank_load_per_layer, "runs", "rank_load_per_layer.png"),
    (plots_research.plot_loss_ratio, "results", "loss_ratio.png"),
    (plots_research.plot_loss_by_width, "runs", "loss_by_width.png"),
])
def test_each_research_plot_writes_a_png_from_a_small_results_dict(tmp_path, fn, arg, name):
    res = make_results()
    path = fn(res["runs"] if arg == "runs" else res, tmp_path / name)
    assert path == tmp_path / name and path.read_bytes()[:8] == PNG_MAGIC


def test_research_plots_are_skipped_without_their_data(tmp_path):
    res = {"runs": {"moe": {"kind": "moe", "curves": {"iteration": [1], "train_loss": [5.0]}}}}
    assert plots_research.write_research_plots(res, tmp_path) == []
    assert not list(tmp_path.glob("*.png"))


def test_write_plots_adds_the_research_plots_and_the_group_loss_marker(tmp_path):
    paths = [p.name for p in write_plots(make_results(), tmp_path)]
    assert set(plots_research.RESEARCH_PLOTS) <= set(paths) and "loss_curves.png" in paths


def test_group_loss_marker_is_drawn_once_per_start():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    runs = {"a": {"group_loss_start_iteration": 150}, "b": {"group_loss_start_iteration": 150},
            "c": {"group_loss_start_iteration": None}, "d": {}}
    plots_research.mark_group_loss_start(ax, runs)
    lines = [l for l in ax.get_lines() if l.get_label().startswith("group loss on")]
    assert len(lines) == 1 and lines[0].get_label() == "group loss on (a, b)"
    assert list(lines[0].get_xdata()) == [150, 150]


@pytest.mark.parametrize("name", ["screen-stdlib", "study-stdlib"])
def test_the_loss_ratio_plot_from_committed_results(tmp_path, name):
    """Benches that predate the per-layer and by-width fields (as committed study results
    do; dropped here, since a re-assembled screen has them): the loss-ratio plot comes from
    their comparisons, the FLOPs axis from the run configs they recorded."""
    res = json.loads((ROOT / "results" / name / "results.json").read_text())
    for run in res["runs"].values():
        for field in ("rank_flops_per_layer", "heldout_loss_by_width"):
            run.pop(field, None)
    paths = plots_research.write_research_plots(res, tmp_path)
    assert [p.name for p in paths] == ["loss_ratio.png"]
    assert paths[0].read_bytes()[:8] == PNG_MAGIC
    assert plots_research._tokens_per_step(res, "moe" if "moe" in res["runs"] else
                                           next(iter(res["runs"])), {}) is not None
