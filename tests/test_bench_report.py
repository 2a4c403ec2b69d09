"""Markdown report and plots from a hand-made results dict."""

import copy


from megatron_mohge.bench.fmt import fmt_delta
from megatron_mohge.bench.plots import PLOT_NAMES, write_plots
from megatron_mohge.bench.report import markdown_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(n, start, with_share=False, groups=3):
    c = {"iteration": list(range(1, n + 1)),
         "train_loss": [start - 0.1 * i for i in range(n)],
         "eval_iteration": [n // 2, n], "eval_loss": [start - 0.05 * n, start - 0.08 * n]}
    if with_share:
        c["group_share"] = [[(g + 1 + i % 2) / sum(h + 1 + i % 2 for h in range(groups))
                             for g in range(groups)] for i in range(n)]
        c["mean_chosen_width"] = [20.0 + i for i in range(n)]
    return c


def make_results(with_optional=True):
    runs = {
        "moe": {"kind": "moe", "total_params": 1_200_000, "routed_expert_params": 196_608,
                "activated_params_per_token": 400_000, "activated_routed_params_per_token": 24_576,
                "heldout_loss": 3.50, "heldout_ppl": 33.12, "train_tokens_per_s": 12_345.6,
                "peak_mem_bytes": 300 * 2 ** 20, "group_token_share": [1.0],
                "expert_load_cv": 0.25, "expert_load_max_over_mean": 1.6,
                "curves": _curves(6, 5.0)},
        "mohge": {"kind": "mohge", "total_params": 1_150_000, "routed_expert_params": 159_744,
                  "activated_params_per_token": 390_000,
                  "activated_routed_params_per_token": 20_000.0, "heldout_loss": 3.43,
                  "heldout_ppl": 30.9, "train_tokens_per_s": 11_000.0,
                  "peak_mem_bytes": 310 * 2 ** 20, "group_token_share": [0.5, 0.3, 0.2],
                  "expert_load_cv": 0.31, "expert_load_max_over_mean": 1.9,
                  "widths": [24, 48, 80], "curves": _curves(6, 5.1, with_share=True)},
        "dense": {"kind": "dense", "total_params": 900_000, "routed_expert_params": 0,
                  "activated_params_per_token": 900_000,
                  "activated_routed_params_per_token": 0.0, "heldout_loss": 3.8,
                  "heldout_ppl": 44.7, "train_tokens_per_s": 20_000.0,
                  "peak_mem_bytes": 200 * 2 ** 20, "group_token_share": [],
                  "expert_load_cv": 0.0, "expert_load_max_over_mean": 0.0},
    }
    res = {"preset": "tiny", "seed": 7, "runs": runs, "baseline": "moe"}
    if with_optional:
        runs["mohge"]["rank_flops_max_over_mean"] = 1.02
        runs["mohge"]["rank_flops"] = {"ep": 2, "all_size": [100.0, 104.0],
                                       "contiguous": [60.0, 144.0],
                                       "all_size_max_over_mean": 104 / 102,
                                       "contiguous_max_over_mean": 144 / 102}
        runs["mohge"]["chosen_width_hist"] = {"widths": [24, 48, 80], "fraction": [0.5, 0.3, 0.2]}
        for name, (cv, flops) in (("moe", (0.25, None)), ("mohge", (0.04, 1.02))):
            r = runs[name]
            r.update(group_load_cv=cv, train_group_load_cv=cv / 2, maxvio_micro=0.9,
                     train_maxvio_micro=0.7, train_maxvio_batch=0.5, train_expert_load_cv=0.2,
                     rank_flops_by_ep={"2": {"contiguous_max_over_mean": 1.4,
                                             **({"all_size_max_over_mean": flops} if flops
                                                else {})}},
                     train_rank_flops_by_ep={"2": {"contiguous_max_over_mean": 1.3}})
            r["curves"]["maxvio_batch"] = [None, 2.0, 1.5, 1.0, 0.8, 0.5]
            r["curves"]["rank_flops_ep2"] = [1.3, 1.2, 1.1, 1.05, flops or 1.4, flops or 1.4]
            r["curves"]["expert_load_cv"] = [0.9, 0.7, 0.5, 0.4, 0.3, cv]
        runs["mohge"]["curves"].update(
            diag_same_group_fraction=[0.8, 0.7, 0.7, 0.6, 0.6, 0.62],
            diag_group_gate_grad_norm=[0.01, 0.02, 0.05, 0.1, 0.1, 0.1],
            diag_expert_gate_grad_norm=[0.4] * 6, diag_max_group_share=[0.8, 0.6, 0.5, 0.4, 0.4, 0.4])
        runs["mohge"]["routing_diagnostics"] = {"mean": dict(
            same_group_fraction=0.62, ingroup_max_prob=0.41, weight_gap=0.12, gate_grad_ratio=0.25,
            max_group_share=0.4, group_assignment_share=[0.4, 0.35, 0.25],
            expert_load_cv_first_half=0.9, expert_load_cv_second_half=0.3)}
        res["layer_bench"] = {
            "config": {"hidden_size": 16, "tokens": 64, "repeats": 3, "warmup": 1,
                       "dispatcher": "allgather"},
            "kinds": {"mohge": {"num_experts": 6, "topk": 2, "widths": [24, 48, 80],
                                "median_s": 0.012, "p10_s": 0.011, "p90_s": 0.014,
                                "router_s": 0.0012, "router_share": 0.1,
                                "routed_expert_params": 7000,
                                "activated_routed_params_per_token": 2100.0},
                      "moe_baseline": {"num_experts": 8, "topk": 2, "width": 64,
                                       "median_s": 0.010, "p10_s": 0.009, "p90_s": 0.011,
                                       "router_s": 0.001, "router_share": 0.1,
                                       "routed_expert_params": 24576,
                                       "activated_routed_params_per_token": 6144.0}},
            "ratios": {"mohge_over_baseline": 1.2},
            "median_s": {"mohge": 0.012, "moe_baseline": 0.010}}
    return res


def _row(md, name):
    rows = [line for line in md.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().strip("*") == name]
    assert rows, f"no row for {name}"
    return rows[0]


def test_markdown_has_every_run_and_deltas_from_the_inputs():
    res = make_results()
    md = markdown_report(res)
    base = res["runs"][res["baseline"]]
    for name, run in res["runs"].items():
        row = _row(md, name)
        if name == res["baseline"]:
            assert "(base)" in row
            continue
        for key in ("routed_expert_params", "activated_params_per_token",
                    "activated_routed_params_per_token", "heldout_loss"):
            expected = f"{(run[key] / base[key] - 1) * 100:+.1f}%"
            assert expected in row, (name, key, expected, row)
    # A few exact values, computed from the inputs.
    mohge, moe = res["runs"]["mohge"], res["runs"]["moe"]
    assert fmt_delta(mohge["heldout_loss"], moe["heldout_loss"]) == "-2.0%"
    assert fmt_delta(mohge["routed_expert_params"], moe["routed_expert_params"]) == "-18.8%"
    row = _row(md, "mohge")
    assert "310.0" in row and "11,000" in row and "1.020" in row and "1.412" in row
    # Group-share table: MoHGE only, shares in %; layer bench section with ms and ratios.
    gs = md[md.index("## Group token share"):md.index("## Layer microbenchmark")]
    assert "50.0%" in gs and "24/48/80" in gs and "| moe |" not in gs
    rt = md[md.index("## Routing diagnostics"):md.index("## Group token share")]
    assert ("| mohge | 0.620 | 0.410 | 0.120 | 0.250 | 0.400 | 40% / 35% / 25% | 0.900 / 0.300 |"
            in rt) and "| moe |" not in rt
    lb = md[md.index("## Layer microbenchmark"):]
    assert "12.00" in lb and "11.00–14.00" in lb and "10.0%" in lb and "1.200" in lb


def test_markdown_without_optional_keys():
    res = make_results(with_optional=False)
    md = markdown_report(res)
    assert "rank FLOPs" not in md and "Layer microbenchmark" not in md
    for name in res["runs"]:
        _row(md, name)
    res["baseline"] = "missing"
    assert "(base)" not in markdown_report(res)
    res = {"runs": {"moe": {"kind": "moe", "total_params": 10}}, "baseline": "moe"}
    assert "| moe |" in markdown_report(res).replace("**moe**", "moe")


def _is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_write_plots_writes_pngs(tmp_path):
    paths = write_plots(make_results(), tmp_path)
    assert [p.name for p in paths] == list(PLOT_NAMES)
    assert all(_is_png(p) for p in paths)


def test_write_plots_skips_plots_without_data(tmp_path):
    res = make_results(with_optional=False)
    del res["runs"]["mohge"]["curves"]["group_share"]
    paths = write_plots(res, tmp_path)
    assert [p.name for p in paths] == ["loss_curves.png"]
    assert _is_png(paths[0])
    assert not (tmp_path / "rank_load.png").exists()
    assert not (tmp_path / "group_share.png").exists()
    empty = copy.deepcopy(res)
    for run in empty["runs"].values():
        run.pop("curves", None)
    assert write_plots(empty, tmp_path / "none") == []


def test_write_report(tmp_path):
    out = write_report(make_results(), tmp_path / "rep")
    assert out["results.md"].read_text().startswith("# MoHGE benchmark")
    assert set(out) == {"results.md", *PLOT_NAMES}


def test_plots_do_not_import_pyplot(tmp_path):
    """Figure + Agg canvas only: pyplot (and its global backend) stays untouched."""
    import subprocess
    import sys

    code = ("import sys, json; from megatron_mohge.bench.report import write_plots; "
            f"import tests.test_bench_report as t; write_plots(t.make_results(), {str(tmp_path)!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert (tmp_path / "loss_curves.png").exists()


def test_balance_table_and_plot(tmp_path):
    res = make_results()
    md = markdown_report(res)
    assert "## Balance" in md
    row = next(line for line in md.splitlines() if line.startswith("| mohge |") and "/" in line
               and "1.020 / 1.400" in line)
    assert "0.040 / 0.020" in row and "— / 1.300" in row
    moe_row = next(line for line in md.splitlines() if line.startswith("| moe |")
                   and "— / 1.400" in line)
    assert "0.250 / 0.125" in moe_row
    paths = write_plots(res, tmp_path)
    assert (tmp_path / "balance.png").read_bytes()[:8] == PNG_MAGIC
    assert tmp_path / "balance.png" in paths
    # no balance data (older results): no table, no plot
    old = make_results(with_optional=False)
    assert "## Balance" not in markdown_report(old)
    old_paths = write_plots(old, tmp_path / "old")
    assert old_paths and tmp_path / "old" / "balance.png" not in old_paths
    assert not (tmp_path / "old" / "balance.png").exists()


def test_layer_bench_text_and_markdown_tables_share_their_cells():
    """One source for the layer-bench columns (report.layer_bench_rows): the terminal table
    of ``python -m megatron_mohge.cli.layer_bench`` / gpu_check and the markdown table of
    results.md carry the same header and cells, in the same order."""
    import re

    from megatron_mohge.bench.layer_bench import format_table
    from megatron_mohge.bench.report import layer_bench_table

    bench = copy.deepcopy(make_results()["layer_bench"])
    bench["config"].update(backend="local", dtype="fp32", device="cpu", threads=1)
    bench["kinds"]["mohge"].update(expert_s=0.004, expert_gflops=1.5,
                                   expert_gflops_over_matmul=0.25)
    bench.update(matmul={"shape": [128, 16, 240], "gflops": 6.0, "median_s": 0.001},
                 router_share_points_over_equal_total=1.5)

    def md_cells(line):
        return [c.strip() for c in line.strip().strip("|").split("|")]

    md_lines = layer_bench_table(bench).splitlines()
    md = [l for l in md_lines if l.startswith("| ")]
    text = format_table(bench).splitlines()
    assert set(text[2]) == {"-"}  # the rule under the header
    text_cells = [re.split(r" {2,}", l.strip()) for l in [text[1]] + text[3:3 + len(md) - 1]]
    assert text_cells == [md_cells(l) for l in md]
    notes = md_lines[md_lines.index(md[-1]) + 1:]  # ratios and matmul, blank-line separated
    assert text[3 + len(md) - 1:] == [l for l in notes if l] and len(notes) == 4
    assert text_cells[0][:2] == ["layer kind", "E"] and "expert GFLOP/s" in text_cells[0]
    assert text_cells[1][0] == "mohge" and text_cells[2][-1] == "—"  # no GEMM figures: a dash
