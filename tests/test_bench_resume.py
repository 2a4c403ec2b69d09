"""``mohge-bench --resume``: a stopped or extended bench trains only what --out lacks."""

import json

import pytest

from megatron_mohge.bench import e2e
from megatron_mohge.bench.resume import check_data_fingerprint, reusable_figures
from megatron_mohge.config import ConfigError
from tests.test_bench import tiny_preset


def _identity(preset, names, seeds, iters=None):
    return e2e.bench_identity(preset, names, data=None, tokenizer=None, seeds=seeds,
                              iters=iters, layer_bench=False)


def _write(out, identity, per_seed):
    (out / "results.json").write_text(json.dumps(
        {"config": identity, "runs": {n: {"per_seed": figs} for n, figs in per_seed.items()}}))


def test_reuse_needs_the_same_run_config_and_experiment(tmp_path):
    preset = tiny_preset()
    old = _identity(preset, ["moe", "mohge"], [1, 2])
    _write(tmp_path, old, {"moe": [{"seed": 1, "heldout_loss": 3.0}, {"seed": 2}],
                           "mohge": [{"seed": 1, "heldout_loss": 3.1}]})
    # more seeds and the same runs: seed 3 is not there, the rest is reused
    new = _identity(preset, ["moe", "mohge"], [1, 2, 3])
    got = reusable_figures([tmp_path], new, e2e._comparable)
    assert {n: sorted(f) for n, f in got.items()} == {"moe": [1, 2], "mohge": [1]}
    assert got["mohge"][1]["heldout_loss"] == 3.1
    # a run whose config changed under the same name is trained again
    changed = tiny_preset()
    changed.runs["mohge"]["moe"]["mohge"]["losses"]["group_balance_coeff"] = 0.5
    got = reusable_figures([tmp_path], _identity(changed, ["moe", "mohge"], [1]), e2e._comparable)
    assert list(got) == ["moe"]
    # another experiment (token budget) is refused, naming what differs
    with pytest.raises(ConfigError, match=r"--resume: .*another experiment \(iters"):
        reusable_figures([tmp_path], _identity(preset, ["moe"], [1], iters=9), e2e._comparable)


def test_other_bench_folders_fill_what_out_lacks(tmp_path):
    """--reuse-from: arms trained elsewhere join --out; --out's own trainings come first."""
    preset = tiny_preset()
    ident = _identity(preset, ["moe", "mohge"], [1, 2])
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir(), other.mkdir()
    _write(out, ident, {"moe": [{"seed": 1, "heldout_loss": 3.0}]})
    _write(other, ident, {"moe": [{"seed": 1, "heldout_loss": 9.0}, {"seed": 2}],
                          "mohge": [{"seed": 2, "heldout_loss": 3.2}]})
    got = reusable_figures([out, other], ident, e2e._comparable)
    assert got["moe"][1]["heldout_loss"] == 3.0 and sorted(got["moe"]) == [1, 2]
    assert got["mohge"][2]["heldout_loss"] == 3.2


def test_resumed_bench_trains_only_the_missing_run_and_keeps_the_rest(tmp_path):
    preset = tiny_preset()
    e2e.run_bench(preset, tmp_path, names=["moe"], seed=11, jobs=1, layer_bench=False)
    first = json.loads((tmp_path / "results.json").read_text())
    lines = []
    second = e2e.run_bench(tiny_preset(), tmp_path, names=["moe", "mohge"], seed=11, jobs=1,
                           layer_bench=False, resume=True, log=lines.append)
    trained = [ln for ln in lines if ln.startswith("[bench] ") and ": held-out loss" in ln]
    assert [ln.split()[1] for ln in trained] == ["mohge"]
    assert any("1 trainings reused" in ln for ln in lines)
    # the reused figures are the first bench's, wall time included (not a second training)
    assert second["runs"]["moe"]["per_seed"] == first["runs"]["moe"]["per_seed"]
    assert "mohge_vs_moe" in second["comparisons"]
    # figures trained now are in the reused ones' JSON form (one key type when averaged)
    fig = second["runs"]["mohge"]["per_seed"][0]
    assert fig == json.loads(json.dumps(fig))
    assert fig["commit"] == second["env"]["commit"]  # the code that trained it
    assert second["data_fingerprint"] == first["data_fingerprint"] is not None
    # without --resume, the extended bench is another experiment and is refused
    with pytest.raises(ConfigError, match="already holds results.json of another bench"):
        e2e.run_bench(tiny_preset(), tmp_path, names=["moe"], seeds=[11, 12], jobs=1,
                      layer_bench=False)


def test_resume_over_other_text_at_the_same_path_is_refused(tmp_path):
    """--data is recorded as a path; the corpus's content decides whether figures pair."""
    (tmp_path / "results.json").write_text(json.dumps({"data_fingerprint": "aaaa"}))
    check_data_fingerprint(tmp_path, "aaaa")  # the same text: fine
    with pytest.raises(ConfigError, match=r"other text \(data fingerprint aaaa, now bbbb\)"):
        check_data_fingerprint(tmp_path, "bbbb")
    (tmp_path / "results.json").write_text(json.dumps({}))  # written before fingerprints
    lines = []
    check_data_fingerprint(tmp_path, "bbbb", log=lines.append)
    assert "records no data fingerprint" in lines[0]


def test_no_train_assembles_from_reused_trainings_only(tmp_path):
    """--no-train: results.json from the reused trainings; the missing ones are listed and
    nothing is trained (a training would write run folders into --out)."""
    preset = tiny_preset()
    other, out = tmp_path / "other", tmp_path / "out"
    other.mkdir()
    _write(other, _identity(preset, ["moe", "mohge"], [11, 12]),
           {"moe": [{"seed": 11, "heldout_loss": 3.0, "kind": "moe"}]})
    lines = []
    res = e2e.run_bench(preset, out, names=["moe", "mohge"], seeds=[11, 12], jobs=1,
                        layer_bench=False, reuse_from=[other], train=False, log=lines.append)
    assert [f["seed"] for f in res["runs"]["moe"]["per_seed"]] == [11]
    missing = [ln for ln in lines if ln.startswith("[bench] not trained (--no-train): ")]
    assert len(missing) == 1 and all(
        t in missing[0] for t in ("mohge seed 11", "moe seed 12", "mohge seed 12"))
    assert not (out / "runs").exists()
