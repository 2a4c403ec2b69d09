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
(:func:`check_data_fingerprint`). The content decides, not the path: the same text prepared
from another ``--data`` path (a corpus moved or copied to another machine) is reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_mohge.config.errors import ConfigError
from megatron_mohge.data.integrity import file_sha256

# Identity keys that may differ between the bench in --out and the resumed one.
EXTENDABLE = ("runs", "seeds")
# Identity keys the data fingerprint decides (check_data_fingerprint), not the spelling.
DATA_KEYS = ("data",)


@dataclass(frozen=True)
class Source:
    """One bench folder whose trainings may be reused: its ``results.json``, read once."""
    path: Path  # the results.json
    flag: str  # the option that named the folder (--resume, --reuse-from), for messages
    results: dict


def load_sources(out_dir: Path, resume: bool, reuse_from=()) -> list[Source]:
    """The bench folders to reuse trainings from, in priority order: ``out_dir`` (with
    ``resume``), then ``reuse_from``. A folder without a results.json contributes nothing."""
    folders = ([(Path(out_dir), "--resume")] if resume else []) + [
        (Path(d), "--reuse-from") for d in reuse_from]
    sources = []
    for folder, flag in folders:
        path = folder / "results.json"
        if not path.is_file():
            if flag == "--reuse-from":
                raise ConfigError(f"--reuse-from: {folder} holds no results.json; name a "
                                  "mohge-bench --out folder.")
            continue
        try:
            results = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{flag}: {path} is not valid JSON ({exc}); move it away to "
                              "start this bench afresh.") from None
        sources.append(Source(path, flag, results))
    return sources


def reusable_figures(sources: list[Source], identity: dict, comparable
                     ) -> dict[str, dict[int, dict]]:
    """``{run name: {seed: figures}}`` of ``sources`` (the first holding a training wins)
    that the bench of ``identity`` can reuse (``comparable``: results.json's identity as
    today's spelling)."""
    reuse: dict[str, dict[int, dict]] = {}
    for source in sources:
        for name, figs in _reusable(source, identity, comparable).items():
            for seed, fig in figs.items():
                reuse.setdefault(name, {}).setdefault(seed, fig)
    return reuse


def _reusable(source: Source, identity: dict, comparable) -> dict[str, dict[int, dict]]:
    old = comparable(source.results.get("config"))
    new = comparable(identity)
    if not isinstance(old, dict):
        raise ConfigError(f"{source.flag}: {source.path} has no record of its configuration; "
                          "move it away to start this bench afresh.")
    diff = [k for k in new if k not in EXTENDABLE + DATA_KEYS and old.get(k) != new[k]]
    if diff:
        what = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in diff)
        raise ConfigError(f"{source.flag}: {source.path} is another experiment ({what}); use "
                          "another --out, or drop the option and move that results.json away.")
    seeds = set(new.get("seeds") or [])
    reuse: dict[str, dict[int, dict]] = {}
    for name, run in (new.get("runs") or {}).items():
        if (old.get("runs") or {}).get(name) != run:
            continue  # not there, or a different config under the same name: train it
        for fig in source.results.get("runs", {}).get(name, {}).get("per_seed", []):
            seed = fig.get("seed")
            if seed is not None and int(seed) in seeds:
                reuse.setdefault(name, {})[int(seed)] = fig
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


def check_data_fingerprint(sources: list[Source], fingerprint: str, identity: dict,
                           comparable, log=print) -> None:
    """Refuse to reuse trainings of ``sources`` that read other text than ``fingerprint``'s.
    A source from before fingerprints were recorded is trusted only at the same ``--data``."""
    data = {k: comparable(identity).get(k) for k in DATA_KEYS}
    for source in sources:
        old_data = {k: (comparable(source.results.get("config")) or {}).get(k) for k in DATA_KEYS}
        old = source.results.get("data_fingerprint")
        if old is None and old_data != data:
            raise ConfigError(f"{source.flag}: {source.path} read other data ({old_data} -> "
                              f"{data}) and records no data fingerprint to show it is the same "
                              "text; use the same --data, or drop the option.")
        if old is None:
            log(f"[bench] {source.flag}: {source.path} records no data fingerprint (written "
                "before benches recorded one); its trainings are reused on the assumption "
                "that --data is the same text")
        elif old != fingerprint:
            raise ConfigError(f"{source.flag}: {source.path} was trained on other text (data "
                              f"fingerprint {old}, now {fingerprint}); use another --out, or "
                              "drop the option to train everything again.")
