"""``mohge-bench --resume`` / ``--reuse-from``: continue or extend a bench in the same ``--out``
without training again what its ``results.json`` (or other bench folders' of the same
experiment: arms trained on several machines at once) already holds.

A long screen is stopped (or its machine taken back) part way; later, more arms or seeds are
asked for. Each training is one ``(run, seed)``; its figures (``runs.<name>.per_seed``) are
reused when the new bench would train exactly the same thing: the same experiment
(everything in the bench identity but the run list and the seeds) and the same run config
(compared as :func:`.e2e.bench_identity` records it). Anything else is trained again and
replaces the old figures; a different experiment in ``--out`` is refused, as without
``--resume``.

The run config says what a training did but not which text it read: ``--data`` is
recorded as a path, and a corpus rebuilt at the same path (another package version, another
file selection) is another experiment. ``results.json`` therefore records the content of the
prepared datasets (:func:`data_fingerprint`), and a resume over a different corpus is refused
(:func:`check_data_fingerprint`).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_mohge.config.errors import ConfigError
from megatron_mohge.data.integrity import file_sha256

# Identity keys that may differ between the bench in --out and the resumed one.
EXTENDABLE = ("runs", "seeds")


def reusable_figures(sources: list[Path], identity: dict, comparable) -> dict[str, dict[int, dict]]:
    """``{run name: {seed: figures}}`` of the bench folders ``sources`` (their
    ``results.json``; the first holding a training wins) that the bench of ``identity`` can
    reuse (``comparable``: results.json's identity as today's spelling)."""
    reuse: dict[str, dict[int, dict]] = {}
    for folder in sources:
        for name, figs in _reusable(Path(folder) / "results.json", identity, comparable).items():
            for seed, fig in figs.items():
                reuse.setdefault(name, {}).setdefault(seed, fig)
    return reuse


def _reusable(path: Path, identity: dict, comparable) -> dict[str, dict[int, dict]]:
    if not path.is_file():
        return {}
    try:
        old_results = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"--resume: {path} is not valid JSON ({exc}); move it away to start "
                          "this bench afresh.") from None
    old = comparable(old_results.get("config"))
    new = comparable(identity)
    if not isinstance(old, dict):
        raise ConfigError(f"--resume: {path} has no record of its configuration; move it away "
                          "to start this bench afresh.")
    diff = [k for k in new if k not in EXTENDABLE and old.get(k) != new[k]]
    if diff:
        what = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ConfigError(f"--resume: {path} is another experiment ({what}); use another --out, "
                          "or drop --resume and move that results.json away.")
    seeds = set(new.get("seeds") or [])
    reuse: dict[str, dict[int, dict]] = {}
    for name, run in (new.get("runs") or {}).items():
        if (old.get("runs") or {}).get(name) != run:
            continue  # not there, or a different config under the same name: train it
        for fig in old_results.get("runs", {}).get(name, {}).get("per_seed", []):
            seed = fig.get("seed")
            if seed is not None and int(seed) in seeds:
                reuse[name] = {**reuse.get(name, {}), int(seed): fig}
    return reuse


def data_fingerprint(prefixes: list[str]) -> str:
    """Short key of the datasets' contents: their ``.idx`` hashes (document lengths, the
    sidecar's ``idx_sha256`` where it has one) and ``.bin`` sizes, in order."""
    import hashlib

    from megatron_mohge.data.prepare import read_metadata

    h = hashlib.sha256()
    for prefix in prefixes:
        meta = read_metadata(prefix) or {}
        h.update(str(meta.get("idx_sha256") or file_sha256(f"{prefix}.idx")).encode())
        h.update(str(Path(f"{prefix}.bin").stat().st_size).encode())
    return h.hexdigest()[:16]


def check_data_fingerprint(folder: Path, fingerprint: str, log=print) -> None:
    """Refuse to reuse results of ``folder`` trained on other text than ``fingerprint``'s."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("data_fingerprint")
    if old is None:
        log(f"[bench] --resume: {path} records no data fingerprint (written before benches "
            "recorded one); its trainings are reused on the assumption that --data is the same "
            "text")
    elif old != fingerprint:
        raise ConfigError(f"--resume: {path} was trained on other text (data fingerprint {old}, "
                          f"now {fingerprint}): --data changed at the same path; use another "
                          "--out, or drop --resume to train everything again.")
