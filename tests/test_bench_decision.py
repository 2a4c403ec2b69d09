"""Issue 22's decision from study results: verdicts, seeds to decide, paired control ratios,
tokens per parameter, and the table script."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mohge.bench.aggregate import aggregate_runs
from megatron_mohge.bench.decision import (decide, loss_ratio, markdown, seeds_to_decide,
                                           tokens_per_param, verdict)
from megatron_mohge.bench.presets import get_preset
from megatron_mohge.bench.study import analyze

ROOT = Path(__file__).resolve().parents[1]
# arm -> (params / stock's, effective-params factor: its loss is stock's loss at factor * N)
ARMS = {"moe": (1.0, 1.0), "mohge": (0.8125, 1.3), "moe_equal_total": (0.8125, 1.0)}


def _results(seeds, arms=ARMS, noise=0.0, sizes=("h32", "h48", "h80"), iters=1500):
    """A study results.json whose losses lie on stock's ``6 - 0.3 ln N`` curve at a known
    efficiency factor per arm (plus seed noise shared by the arms of a seed)."""
    spec = get_preset("study").study
    rng = random.Random(0)
    offsets = {s: noise * rng.gauss(0, 1) for s in seeds}
    per_seed, configs = {}, {}
    for name, m in spec["runs"].items():
        if m["kind"] not in arms or m["size"] not in sizes:
            continue
        frac, factor = arms[m["kind"]]
        h = int(m["size"][1:])
        n = 52 * h * h * frac
        loss = 6.0 - 0.3 * math.log(n * factor)
        per_seed[name] = [{"seed": s, "heldout_loss": loss + offsets[s], "total_params": n,
                           "activated_params_per_token": n / 8,
                           "curves": {"iteration": [10, 100], "train_loss": [9.0, loss]}}
                          for s in seeds]
        configs[name] = {"train": {"iters": iters, "global_batch_size": 16},
                         "model": {"seq_length": 64}}
    spec = dict(spec, sizes=list(sizes))
    res = {"seeds": list(seeds), "runs": aggregate_runs(per_seed), "config": {"runs": configs}}
    res["study"] = analyze(res, spec, bootstrap_samples=200)
    return res


def test_verdict_reads_the_interval_against_the_threshold():
    assert verdict([1.05, 1.3]) == "yes"
    assert verdict([0.6, 0.9]) == "no"
    assert verdict([0.9, 1.1]) == "undecided"
    assert verdict([1.1, 1.3], threshold=1.2) == "undecided"
    assert verdict(None) == verdict([None, None]) == "no interval"


def test_seeds_to_decide_scales_the_log_half_width():
    # mean 1.1, interval [0.9, 1.3] at 3 seeds: half-width 0.184 in log, gap ln 1.1 = 0.0953
    half, gap = (math.log(1.3) - math.log(0.9)) / 2, math.log(1.1)
    assert seeds_to_decide(1.1, [0.9, 1.3], 3) == math.ceil(3 * (half / gap) ** 2) == 12
    assert seeds_to_decide(1.2, [1.05, 1.3], 3) is None    # already decided
    assert seeds_to_decide(1.0, [0.9, 1.1], 3) is None     # on the threshold: never
    assert seeds_to_decide(1.001, [0.5, 2.0], 3) is None   # beyond any seed budget


def test_decide_recovers_known_ratios_and_pairs_the_control():
    res = _results([1, 2, 3])
    d = decide(res)
    mohge = d["efficiency"]["mohge"]["total_params"]
    assert mohge["ratio"] == pytest.approx(1.3) and mohge["verdict"] == "yes"
    assert mohge["meets_goal"] == "yes" and mohge["seeds"] == 3
    equal = d["efficiency"]["moe_equal_total"]["total_params"]
    assert equal["ratio"] == pytest.approx(1.0)
    assert list(d["sizes"]) == ["h32", "h48", "h80"]
    cell = d["sizes"]["h32"]["moe_equal_total"]
    # MoHGE's loss at h32 is stock's at 1.3x its params; the control's is stock's at 1x
    want = (6 - 0.3 * math.log(52 * 32 * 32 * 0.8125 * 1.3)) / \
        (6 - 0.3 * math.log(52 * 32 * 32 * 0.8125))
    assert cell["mohge_vs_arm"]["mean"] == pytest.approx(want)
    assert cell["mohge_vs_arm"]["seeds"] == [1, 2, 3]
    assert "mohge_vs_arm" not in d["sizes"]["h32"]["mohge"]
    assert d["sizes"]["h32"]["moe"]["tokens_per_param"] == pytest.approx(
        1500 * 16 * 64 / (52 * 32 * 32))


def test_noise_makes_an_undecided_answer_with_the_seeds_that_would_decide_it():
    arms = dict(ARMS, mohge=(0.8125, 1.02))
    res = _results([1, 2, 3], arms=arms)
    # independent noise per arm and seed: re-draw MoHGE's seeds around its curve
    rng = random.Random(7)
    for name, run in res["runs"].items():
        if name.startswith("mohge"):
            for f in run["per_seed"]:
                f["heldout_loss"] += 0.1 * rng.gauss(0, 1)
            run["heldout_loss_per_seed"] = [f["heldout_loss"] for f in run["per_seed"]]
    res["study"] = analyze(res, dict(get_preset("study").study), bootstrap_samples=400)
    e = decide(res)["efficiency"]["mohge"]["total_params"]
    lo, hi = e["ci"]
    assert lo < 1.0 < hi and e["verdict"] == "undecided"
    assert e["seeds_to_decide"] is None or e["seeds_to_decide"] > 3
    assert "undecided" in markdown({"tiny / fake": decide(res)})


def test_loss_ratio_pairs_only_common_seeds():
    def run(*pairs):
        return {"per_seed": [{"seed": s, "heldout_loss": x} for s, x in pairs]}

    runs = {"a": run((1, 2.0), (2, 3.0)), "b": run((2, 2.0), (3, 1.0))}
    r = loss_ratio(runs, "a", "b")
    assert r["seeds"] == [2] and r["mean"] == pytest.approx(1.5) and r["ci"] is None
    assert loss_ratio(runs, "a", "missing") is None


def test_tokens_per_param_needs_the_run_config():
    res = _results([1, 2])
    assert tokens_per_param(res, "moe_h48") == pytest.approx(1500 * 1024 / (52 * 48 * 48))
    res["config"]["runs"].pop("moe_h48")
    assert tokens_per_param(res, "moe_h48") is None


def test_decision_table_script(tmp_path):
    res = _results([1, 2, 3])
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(res))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "decision_table.py"),
                          f"paper / stdlib={tmp_path / 'a'}"], capture_output=True, text=True,
                         check=True).stdout
    first = out.splitlines()[2]  # the answer row of the first table
    assert first.startswith("| paper / stdlib | 3 | 4.6-28.8 | 1.30 [1.30, 1.30]")
    assert "| yes |" in first
    assert "| paper / stdlib | h80 | `moe_equal_total` | 1.0" in out
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "decision_table.py"),
                          f"x={tmp_path / 'none'}"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not found" in bad.stderr
