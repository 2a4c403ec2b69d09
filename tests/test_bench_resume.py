"""``mohge-bench --resume``: a stopped or extended bench trains only what --out lacks."""

import json

import pytest

from megatron_mohge.bench import e2e
from megatron_mohge.bench.resume import check_data_fingerprint, load_sources, reusable_figures
from megatron_mohge.config import ConfigError
from tests.test_bench import tiny_preset


def _identity(preset, names, seeds, iters=None):
    return e2e.bench_identity(preset, names, data=None, tokenizer=None, seeds=seeds,
                              iters=iters, layer_bench=False)


def _write(out, identity, per_seed, **extra):
    (out / "results.json").write_text(json.dumps(
        {"config": identity, "runs": {n: {"per_seed": figs} for n, figs in per_seed.items()},
         **extra}))


def _reuse(folders, identity):
    """--resume into the first folder, --reuse-from the others."""
    sources = load_sources(folders[0], True, folders[1:])
    return reusable_figures(sources, identity, e2e._comparable)


def test_reuse_needs_the_same_run_config_and_experiment(tmp_path):
    preset = tiny_preset()
    old = _identity(preset, ["moe", "mohge"], [1, 2])
    _write(tmp_path, old, {"moe": [{"seed": 1, "heldout_loss": 3.0}, {"seed": 2}],
                           "mohge": [{"seed": 1, "heldout_loss": 3.1}]})
    # more seeds and the same runs: seed 3 is not there, the rest is reused
    new = _identity(preset, ["moe", "mohge"], [1, 2, 3])
    got = _reuse([tmp_path], new)
    assert {n: sorted(f) for n, f in got.items()} == {"moe": [1, 2], "mohge": [1]}
    assert got["mohge"][1]["heldout_loss"] == 3.1
    # a run whose config changed under the same name is trained again
    changed = tiny_preset()
    changed.runs["mohge"]["moe"]["mohge"]["losses"]["group_balance_coeff"] = 0.5
    got = _reuse([tmp_path], _identity(changed, ["moe", "mohge"], [1]))
    assert list(got) == ["moe"]
    # another experiment (token budget) is refused, naming what differs
    with pytest.raises(ConfigError, match=r"--resume: .*another experiment \(iters"):
        _reuse([tmp_path], _identity(preset, ["moe"], [1], iters=9))


def test_other_bench_folders_fill_what_out_lacks(tmp_path):
    """--reuse-from: arms trained elsewhere join --out; --out's own trainings come first."""
    preset = tiny_preset()
    ident = _identity(preset, ["moe", "mohge"], [1, 2])
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir(), other.mkdir()
    _write(out, ident, {"moe": [{"seed": 1, "heldout_loss": 3.0}]})
    _write(other, ident, {"moe": [{"seed": 1, "heldout_loss": 9.0}, {"seed": 2}],
                          "mohge": [{"seed": 2, "heldout_loss": 3.2}]})
    got = _reuse([out, other], ident)
    assert got["moe"][1]["heldout_loss"] == 3.0 and sorted(got["moe"]) == [1, 2]
    assert got["mohge"][2]["heldout_loss"] == 3.2
    # errors name the option that named the folder
    _write(other, _identity(preset, ["moe"], [1], iters=9), {})
    with pytest.raises(ConfigError, match=r"^--reuse-from: .*other.*another experiment"):
        _reuse([out, other], ident)
    with pytest.raises(ConfigError, match=r"--reuse-from: .*missing holds no results.json"):
        _reuse([out, tmp_path / "missing"], ident)


@pytest.mark.pipeline
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


def test_the_data_fingerprint_decides_whether_figures_pair(tmp_path):
    """--data is recorded as a path; the corpus's content decides whether figures pair: other
    text at the same path is refused, the same text at another path is reused."""
    preset = tiny_preset()
    here = e2e.bench_identity(preset, ["moe"], data=["/corpus/a"], tokenizer=None, seeds=[1],
                              iters=None, layer_bench=False)
    moved = {**here, "data": ["/elsewhere/a"]}
    _write(tmp_path, here, {"moe": [{"seed": 1}]}, data_fingerprint="aaaa")

    def check(identity, fingerprint, log=print):
        sources = load_sources(tmp_path, True)
        reusable_figures(sources, identity, e2e._comparable)  # the identity check first
        check_data_fingerprint(sources, fingerprint, identity, e2e._comparable, log)

    check(here, "aaaa")  # the same text: fine
    check(moved, "aaaa")  # the same text copied to another path: fine
    with pytest.raises(ConfigError, match=r"other text \(data fingerprint aaaa, now bbbb\)"):
        check(here, "bbbb")
    _write(tmp_path, here, {}, data_fingerprint=None)  # written before fingerprints
    lines = []
    check(here, "bbbb", log=lines.append)
    assert "records no data fingerprint" in lines[0]
    with pytest.raises(ConfigError, match=r"^--resume: .*read other data.*no data fingerprint"):
        check(moved, "bbbb")  # another path and no fingerprint: nothing says it is the same


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
