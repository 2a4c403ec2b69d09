"""End-to-end comparison: train every run of a preset with ``mohge-train`` once per seed
(same data, token budget and held-out set; each run in its own process tree, ``torchrun``
when the preset uses several ranks), run the layer microbenchmark, and assemble
``results.json``.

``results.json`` (the contract users rely on) has ``seeds`` and ``runs``: run name ->
``total_params``, ``routed_expert_params``, ``activated_params_per_token`` (non-routed params
+ routed params activated per token, measured from the routing of the held-out batches),
``heldout_loss``, ``heldout_ppl``, ``train_tokens_per_s``, ``peak_mem_bytes``,
``group_token_share``, ``expert_load_cv``, ``expert_load_max_over_mean``, and with EP>1
``rank_flops_max_over_mean`` (all-size allocation; the contiguous layout side by side in
``rank_flops``) -- each the mean over seeds, with ``<field>_per_seed`` lists (seed order) for
the :data:`SEED_FIELDS` and every seed's full figures in ``per_seed``. ``comparisons``
holds, per ``<run>_vs_<baseline>``, the paired per-seed ratios of the :data:`COMPARED`
figures with their mean and Student-t 95% interval (:mod:`megatron_mohge.bench.stats`);
``layer_bench`` has ``median_s`` per layer kind; ``study`` (scaling-study presets) the
loss-vs-params fits (:mod:`megatron_mohge.bench.study`).

The trainings run through :mod:`.runner`; the per-run figures and targets are
:mod:`.figures`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional

from megatron_mohge.bench import budget
from megatron_mohge.bench.aggregate import aggregate_runs, compare_runs
from megatron_mohge.bench.arms import DEFAULT_SHAPE
from megatron_mohge.bench.environment import environment
from megatron_mohge.bench.figures import run_figures, target_checks
from megatron_mohge.bench.presets import Preset
from megatron_mohge.bench.progress import Progress
from megatron_mohge.bench.resume import (
    check_data_fingerprint,
    data_fingerprint,
    load_sources,
    reusable_figures,
)
from megatron_mohge.bench.runner import run_layer_bench_subprocess, train_runs
from megatron_mohge.config import ConfigError
from megatron_mohge.config.run import RunConfig, normalize_run_dict
from megatron_mohge.training.health import dumps


def resolve_data(data: list[str], tokenizer: str, out_dir: Path, log=print, *,
                 split_documents: Optional[str] = None,
                 json_keys: Optional[list[str]] = None,
                 splits: Iterable[tuple[str, int]] = ()) -> list[str]:
    """Dataset prefixes for ``--data``: indexed-dataset prefixes are used as they are; text /
    JSON lines / Parquet files and folders are tokenized once into ``out_dir/data/corpus``
    (``mohge-prepare-data``'s document rules; several JSON keys: one dataset each).

    ``splits``: the runs' ``(data.split, seq_length)``. Plain text cut at blank lines (the
    default rule) into too few documents for one of them -- typically one sentence per line
    and no blank lines, i.e. one document -- is cut by line instead, said in one line."""
    from megatron_mohge.data import check_dataset, load_tokenizer
    from megatron_mohge.data.formats import DEFAULT_JSON_KEYS, DEFAULT_SPLIT
    from megatron_mohge.data.prepare import prepare_datasets

    if not data:
        return []
    prefixes, texts = [], []
    for item in data:
        base = item[:-4] if item.endswith((".bin", ".idx")) else item
        if Path(base + ".bin").is_file() and Path(base + ".idx").is_file():
            check_dataset(base, tokenizer)
            prefixes.append(str(Path(base).resolve()))
        else:
            texts.append(item)
    if texts:
        prefix = out_dir / "data" / "corpus"
        prefix.parent.mkdir(parents=True, exist_ok=True)

        def prepare(split: str) -> dict:
            return prepare_datasets(texts, prefix, load_tokenizer(tokenizer), progress=True,
                                    split=split, json_keys=tuple(json_keys or DEFAULT_JSON_KEYS))

        metas = prepare(split_documents or DEFAULT_SPLIT)
        if split_documents is None and not _splits_fit(metas, splits):
            docs = min(m["num_documents"] for m in metas.values())
            log(f"note: --data {' '.join(texts)} cut at blank lines is {docs} document(s), too "
                f"few for the train/validation split: cut by line instead (--split-documents "
                f"line)")
            metas = prepare("line")
        for out, meta in metas.items():
            log(f"tokenized {meta['num_documents']} documents, {meta['num_tokens']:,} tokens "
                f"-> {out}")
            prefixes.append(str(Path(out).resolve()))
    return prefixes


#: The most seeds ``--seeds N`` counts; a larger N is far more likely a seed (``--seeds 1234``
#: meant as ``--seed 1234``) than days of training asked for on purpose.
MAX_SEED_COUNT = 20


def _splits_fit(metas: dict, splits: Iterable[tuple[str, int]]) -> bool:
    """Whether datasets with plain text in them fill every ``(split, seq_length)``."""
    from megatron_mohge.data.datasets import check_split_sizes

    if not any("text" in m["documents"]["formats"] for m in metas.values()):
        return True  # JSON / Parquet: one document per record, no rule to change
    try:
        for prefix in metas:
            for split, seq_length in splits:
                check_split_sizes(prefix, split, seq_length)
    except ConfigError:
        return False
    return True


def resolve_seeds(preset: Preset, seeds: Optional[list[int]] = None,
                  seed: Optional[int] = None) -> list[int]:
    """The seeds to train: ``--seeds N`` (one value: N seeds from ``--seed``/the preset's
    first seed on, N <= :data:`MAX_SEED_COUNT`) or an explicit list; else ``--seed`` alone;
    else the preset's."""
    first = preset.seeds[0] if seed is None else seed
    if seeds is None:
        return [first] if seed is not None else list(preset.seeds)
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ConfigError(f"--seeds {seeds[0]}: give a number of seeds >= 1 or a list of "
                              "two or more seeds")
        if seeds[0] > MAX_SEED_COUNT:
            raise ConfigError(
                f"--seeds {seeds[0]} asks for {seeds[0]} seeds (one number is a count, at most "
                f"{MAX_SEED_COUNT}); for the one seed {seeds[0]} use --seed {seeds[0]}, for "
                f"several list them: --seeds {seeds[0]} {seeds[0] + 1}")
        return [first + i for i in range(seeds[0])]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: seeds repeat; give distinct "
                          "seeds")
    return list(seeds)


def resolve_jobs(preset: Preset, jobs: Optional[int] = None) -> int:
    """Runs trained at once: ``--jobs`` (>= 1), else the preset's."""
    jobs = preset.jobs if jobs is None else jobs  # not `jobs or`: --jobs 0 is an error
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least one job at a time")
    return jobs


def run_configs(preset: Preset, out_dir: Path, *, names: Optional[list[str]] = None,
                data: Optional[list[str]] = None, tokenizer: Optional[str] = None,
                seed: Optional[int] = None, iters: Optional[int] = None,
                tokens_per_param: Optional[float] = None) -> dict[str, RunConfig]:
    """Validated RunConfigs of the preset's runs for one seed, with the command-line choices
    applied; each writes to ``out_dir/runs/<name>/seed<seed>``. ``tokens_per_param``: the
    steps of each run from its size's token budget (:mod:`.budget`), instead of ``iters``."""
    budget.check_budget_options(iters, tokens_per_param)
    dicts = preset.run_dicts(names)
    steps = ({} if tokens_per_param is None else
             budget.budget_iters(preset, list(dicts), tokens_per_param, tokenizer))
    runs = {}
    for name, d in dicts.items():
        if seed is not None:
            d["train"]["seed"] = seed
        d["output_dir"] = str(out_dir / "runs" / name / f"seed{d['train'].get('seed', 1234)}")
        d.setdefault("data", {})
        d["data"]["cache_dir"] = str(out_dir / "data")
        if data:
            d["data"]["path"] = list(data)
        if tokenizer:
            d["data"]["tokenizer"] = tokenizer
        if iters is not None:
            d["train"]["iters"] = iters
            d["train"]["lr_warmup_iters"] = min(d["train"]["lr_warmup_iters"], max(iters // 10, 1))
            d["eval"]["interval"] = 0
            d["logging"]["interval"] = max(1, min(d["logging"]["interval"], iters // 4 or 1))
        if name in steps:
            budget.apply(d, steps[name]["iters"])
        try:
            runs[name] = RunConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"preset {preset.name}, run {name}: {exc}") from exc
    return runs


def run_bench(preset: Preset, out_dir: Path, *, names=None, data=None, tokenizer=None,
              seed=None, seeds=None, iters=None, jobs=None, layer_bench: bool = True,
              log=print, split_documents=None, json_keys=None, order: str = "seed",
              resume: bool = False, reuse_from: Iterable[Path] = (),
              train: bool = True, tokens_per_param=None) -> dict:
    """Train the preset's runs once per seed and write ``results.json`` after each run.

    ``order="seed"``: seed-major, so every finished seed is a complete paired comparison;
    ``"run"``: run-major in ``names`` order, so the first runs have all their seeds first
    (a long screen stopped early still has complete arms). ``resume``: the trainings that
    ``out_dir/results.json`` already holds with the same run config are reused, and those
    of the bench folders ``reuse_from`` (:mod:`.resume`); ``train=False`` assembles
    results from those alone and lists what is missing. ``tokens_per_param``: the steps
    from a token budget (:mod:`.budget`)."""
    budget.check_budget_options(iters, tokens_per_param)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_list = resolve_seeds(preset, seeds, seed)
    jobs = resolve_jobs(preset, jobs)
    identity = bench_identity(preset, names, data=data, tokenizer=tokenizer, seeds=seed_list,
                              iters=iters, layer_bench=layer_bench,
                              split_documents=split_documents, json_keys=json_keys,
                              tokens_per_param=tokens_per_param)
    sources = load_sources(out_dir, resume, reuse_from)
    if not resume:
        check_out_dir(out_dir, identity)  # before anything is written into --out
    # each source must be this experiment but for its runs and seeds
    reused = reusable_figures(sources, identity, _comparable)
    tok = tokenizer or preset.base.get("data", {}).get("tokenizer", "byte")
    splits = {(r.data.split, r.model.seq_length)
              for r in run_configs(preset, out_dir, names=names, iters=iters,
                                   tokens_per_param=tokens_per_param).values()}
    prefixes = resolve_data(list(data or []), tok, out_dir, log, split_documents=split_documents,
                            json_keys=json_keys, splits=splits)
    by_seed = {s: run_configs(preset, out_dir, names=names, data=prefixes or None,
                              tokenizer=tokenizer, seed=s, iters=iters,
                              tokens_per_param=tokens_per_param) for s in seed_list}
    first = next(iter(by_seed[seed_list[0]].values()))
    if not prefixes:  # prepare the default corpus once, before the runs race for it
        from megatron_mohge.data import ensure_default_dataset, load_tokenizer

        default = ensure_default_dataset(first.data.cache_dir,
                                         load_tokenizer(first.data.tokenizer),
                                         max_bytes=first.data.default_corpus_bytes)
    fingerprint = data_fingerprint([str(p) for p in prefixes] if prefixes else [str(default)])
    check_data_fingerprint(sources, fingerprint, identity, _comparable, log)
    results = {"preset": preset.name, "description": preset.description,
               "seed": seed_list[0], "seeds": seed_list, "valid_seed": first.data.valid_seed,
               "baseline": preset.baseline, "kind": preset.kind, "nproc": preset.nproc,
               "jobs": jobs, "shape": preset.shape, "env": environment(),
               "data_fingerprint": fingerprint, "runs": {}}
    results["config"] = identity
    if tokens_per_param is not None:  # each run's steps and tokens, and the params they are per
        results["budget"] = budget.budget_iters(preset, list(by_seed[seed_list[0]]),
                                                tokens_per_param, tokenizer)
    names = list(by_seed[seed_list[0]])
    per_seed: dict[str, list[dict]] = {n: [] for n in names}
    queue = training_queue(by_seed, names, seed_list, order)
    if reused:
        for n in names:
            per_seed[n] = [reused[n][s] for s in seed_list if s in reused.get(n, {})]
        queue = [q for q in queue if q[0] not in reused.get(q[1], {})]
        log(f"[bench] {sum(map(len, per_seed.values()))} trainings reused from "
            f"{', '.join(str(src.path) for src in sources)}, {len(queue)} to "
            "train")
        results["runs"] = aggregate_runs(per_seed)
        results["comparisons"] = compare_runs(per_seed, preset.comparison_pairs(names))
        _write(out_dir, results)

    def nproc_of(run: RunConfig) -> int:
        return preset.nproc if run.parallel.expert_parallel > 1 or preset.nproc > 1 else 1

    if not train:
        if queue:
            log("[bench] not trained (--no-train): "
                + ", ".join(f"{n} seed {s}" for s, n, _ in queue))
        queue, layer_bench = [], False
    t0 = time.perf_counter()
    progress = Progress(len(queue), jobs)
    for s, name, run, summary in train_runs(queue, nproc_of, out_dir, jobs, log, progress):
        fig = run_figures(summary, run)
        fig["nproc"] = nproc_of(run)
        # the code that trained it: reused figures keep their own (results from --resume)
        fig["commit"] = results["env"].get("commit")
        if reused:  # as results.json holds them (str keys, lists), like the reused figures
            fig = json.loads(dumps(fig))
        bpb = fig.get("heldout_bits_per_byte")
        log(f"[bench] {name} seed {s}: held-out loss {fig['heldout_loss']:.4f}"
            + (f", {bpb:.4f} bits/byte" if bpb is not None else "")
            + f" ({fig['wall_s']:.0f} s; {progress.finish(fig['wall_s'])})")
        per_seed[name].append(fig)
        per_seed[name].sort(key=lambda f: seed_list.index(f["seed"]))
        results["runs"] = aggregate_runs(per_seed)
        results["comparisons"] = compare_runs(per_seed, preset.comparison_pairs(names))
        _write(out_dir, results)
    if preset.study:
        from megatron_mohge.bench.study import analyze

        results["study"] = analyze(results, preset.study)
    if layer_bench and preset.layer_bench:
        mohge = next((r.moe.mohge for r in by_seed[seed_list[0]].values()
                      if r.moe.kind == "mohge"), None)
        if mohge is not None:
            results["layer_bench"] = run_layer_bench_subprocess(preset, mohge.to_dict(), out_dir,
                                                                log)
            rep = preset.layer_bench_representative
            if rep:  # {backend: result} at the representative shape
                results["layer_bench_representative"] = {
                    b: run_layer_bench_subprocess(preset, mohge.to_dict(), out_dir, log, lb=rep,
                                                  backend=b, tag=f"_representative_{b}")
                    for b in rep["backends"]}
    results["targets"] = target_checks(results)
    results["wall_s"] = time.perf_counter() - t0
    _write(out_dir, results)
    return results


def training_queue(by_seed: dict, names: list[str], seeds: list[int], order: str) -> list:
    """``(seed, name, RunConfig)`` in training order: ``seed``-major or ``run``-major."""
    if order == "seed":
        return [(s, n, by_seed[s][n]) for s in seeds for n in names]
    if order == "run":
        return [(s, n, by_seed[s][n]) for n in names for s in seeds]
    raise ConfigError(f"--order {order}: choose seed or run")


def _write(out_dir: Path, results: dict) -> None:
    from megatron_mohge.training.checkpoint import atomic_write

    atomic_write(out_dir / "results.json", dumps(results, indent=1))


# ------------------------------------------------------------------ one bench per --out
def bench_identity(preset: Preset, names, *, data, tokenizer, seeds, iters,
                   layer_bench: bool, split_documents=None, json_keys=None,
                   tokens_per_param=None) -> dict:
    """What makes two benches the same experiment, recorded in results.json["config"]: the
    command-line choices (None: the preset's default) and the preset's run configs.
    ``tokens_per_param`` and a non-default ``shape`` are recorded only when chosen, so the
    identity of every bench without them stays what its results.json holds (comparisons read
    an absent key as its default: ``_comparable``)."""
    ident = {"preset": preset.name, "seeds": list(seeds), "iters": iters,
             "tokenizer": tokenizer, "data": [str(Path(d).resolve()) for d in data or []],
             "split_documents": split_documents, "json_keys": json_keys,
             "layer_bench": bool(layer_bench), "runs": preset.run_dicts(names)}
    if tokens_per_param is not None:
        ident["tokens_per_param"] = float(tokens_per_param)
    if preset.shape != DEFAULT_SHAPE:
        ident["shape"] = preset.shape
    return ident


def check_out_dir(out_dir: Path, identity: dict) -> None:
    """Refuse to mix results: an --out holding results.json of another bench (other seed,
    preset, runs, data or budget) stays as it is. Re-running the same bench replaces them."""
    path = out_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = _comparable(json.loads(path.read_text()).get("config"))
    except ValueError:
        old = None
    new = _comparable(identity)
    if old == new:
        return
    if old is None:
        diff = "it has no record of its configuration"
    else:
        keys = [k for k in new if k != "runs" and old.get(k) != new[k]]
        diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys)
        if old.get("runs") != new["runs"]:
            diff += (", " if diff else "") + "run configs differ"
    raise ConfigError(f"--out {out_dir} already holds results.json of another bench ({diff}); "
                      "use another --out, or move that results.json away to replace it.")


#: Identity keys recorded only when chosen (``bench_identity``): absent means this default.
IDENTITY_DEFAULTS = {"tokens_per_param": None, "shape": DEFAULT_SHAPE}


def _comparable(identity):
    """``identity`` as results.json holds it, its run dicts' former spellings (``kind: moe``)
    read as today's (``normalize_run_dict``) and the keys of :data:`IDENTITY_DEFAULTS` filled
    in, so both sides of a comparison have them."""
    d = json.loads(json.dumps(identity))
    if isinstance(d, dict) and isinstance(d.get("runs"), dict):
        d["runs"] = {n: normalize_run_dict(r) for n, r in d["runs"].items()}
    if isinstance(d, dict):
        for key, default in IDENTITY_DEFAULTS.items():
            d.setdefault(key, default)
    return d
