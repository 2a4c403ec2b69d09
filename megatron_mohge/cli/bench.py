"""``mohge-bench``: is MoHGE worth it for my model? One command, one comparison.

Trains the preset's runs (stock Megatron MoE baseline, MoHGE; optionally MoHGE with the
paper's expert weighting and dense) on the same data and token budget, once per seed (the
same seed gives every run the same data order; all seeds share one held-out set), runs the
layer microbenchmark, and writes ``DIR/results.json``, ``DIR/results.md`` and PNG plots,
with seed means and paired 95% intervals of every ratio to the baseline.

The presets (``--preset``) are listed at the end of ``--help``, from the preset table. Study
and screen also take the paper's layer shape (``--shape paper``), the control arms and a
token budget (``--tokens-per-param``): docs/decision-study.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from megatron_mohge.cli import common
from megatron_mohge.config import ConfigError
from megatron_mohge.data.formats import SPLIT_RULES

PROG = "mohge-bench"


def parse_args(argv=None):
    from megatron_mohge.bench.arms import ARMS, SHAPES
    from megatron_mohge.bench.presets import PRESETS

    p = common.parser(PROG, __doc__)
    p.epilog = presets_help()
    p.add_argument("--preset", default="default", choices=list(PRESETS), metavar="NAME",
                   help=f"which comparison to run: {', '.join(PRESETS)} (default: default; "
                        "each described below)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="text / JSON lines (.jsonl) / Parquet files or folders (tokenized "
                        "once, as mohge-prepare-data) or indexed dataset prefixes; default: "
                        "the Python stdlib corpus")
    p.add_argument("--json-keys", nargs="+", default=None, metavar="KEY",
                   help="--data JSON lines / Parquet: the text field(s) (default: text)")
    p.add_argument("--split-documents", choices=SPLIT_RULES, default=None,
                   help="--data plain text: a document is a paragraph (blank-line, the "
                        "default), a line, or a whole file")
    p.add_argument("--tokenizer", default=None, help="byte (default) or a tokenizer.json path")
    p.add_argument("--out", default=None, help="output directory (default runs/bench-<preset>)")
    p.add_argument("--seed", type=int, default=None,
                   help="the (first) seed; alone: train every run once with this seed")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="one number N: N seeds (--seed, --seed+1, ...); several: these seeds. "
                        "Default: the preset's (default preset: 3)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once (default: the preset's; study: 2)")
    p.add_argument("--runs", default=None,
                   help="comma-separated subset of the preset's runs; study / screen also have "
                        f"the arms {', '.join(ARMS)} (study: <arm>_h<size>, e.g. "
                        "moe_equal_total_h48)")
    p.add_argument("--sizes", default=None,
                   help="study / screen: comma-separated hidden sizes (multiples of 16), e.g. "
                        "32,48,80 (default: the preset's)")
    p.add_argument("--shape", choices=SHAPES, default=None,
                   help="study / screen: the MoE layer shape; tiny (default: 4x4 experts, Kg=2, "
                        "K=2) or paper (MoHGE-3B's 8x8 experts, Kg=4, K=6, 2 shared experts, "
                        "widths scaled to hidden); docs/decision-study.md")
    p.add_argument("--order", choices=("seed", "run"), default="seed",
                   help="training order: seed (default: each seed's runs together, so every "
                        "finished seed is a paired comparison) or run (each run's seeds "
                        "together, in --runs order: a long screen stopped early keeps whole "
                        "arms)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the trainings results.json in --out already holds with the same "
                        "run config (a stopped bench continues; more --runs or --seeds extend "
                        "it); another experiment there is still refused")
    p.add_argument("--reuse-from", nargs="+", default=(), metavar="DIR",
                   help="also reuse the trainings of these bench folders (the same experiment, "
                        "e.g. arms trained on other machines) where --out lacks them")
    p.add_argument("--no-train", action="store_true",
                   help="with --resume / --reuse-from: assemble results.json from the reused "
                        "trainings only, listing the missing ones (nothing is trained)")
    p.add_argument("--with-dense", action="store_true", help="add the dense baseline run")
    p.add_argument("--iters", type=int, default=None,
                   help="override the step budget of every run (quick checks)")
    p.add_argument("--tokens-per-param", type=float, default=None, metavar="X",
                   help="instead of --iters: train every run X tokens per total parameter of "
                        "the stock baseline of its size (all arms of a size see the same "
                        "tokens; Chinchilla: 20)")
    p.add_argument("--no-layer-bench", action="store_true", help="skip the layer microbenchmark")
    p.add_argument("--dry-run", action="store_true",
                   help="write the run configs and print the commands without running them")
    return p.parse_args(argv)


def presets_help(width: int = 100) -> str:
    """``--help``'s list of the presets: name and description of each entry of ``PRESETS``."""
    import textwrap

    from megatron_mohge.bench.presets import PRESETS, get_preset

    pad = max(map(len, PRESETS)) + 4
    lines = ["presets:"]
    for name in PRESETS:
        lines += textwrap.wrap(get_preset(name).description, width,
                               initial_indent=f"  {name:<{pad - 2}}", subsequent_indent=" " * pad)
    return "\n".join(lines)


def parse_sizes(text):
    """``--sizes 32,48`` -> [32, 48] (None: the preset's)."""
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--sizes {text}: give comma-separated integers, e.g. 32,48,80") from None


@common.entry
def main(argv=None) -> int:
    return common.run_cli(PROG, _bench, parse_args(argv))


def _bench(args) -> int:
    from megatron_mohge.bench import e2e, runner
    from megatron_mohge.bench.presets import get_preset

    from megatron_mohge.bench.arms import DEFAULT_SHAPE
    from megatron_mohge.bench.budget import check_budget_options

    check_budget_options(args.iters, args.tokens_per_param)
    preset = get_preset(args.preset, parse_sizes(args.sizes), args.shape)
    shape = "" if preset.shape == DEFAULT_SHAPE else f"-{preset.shape}"
    out = Path(args.out or f"runs/bench-{preset.name}{shape}")
    names = args.runs.split(",") if args.runs else list(preset.runs)
    if args.with_dense:
        names += [n for n in preset.optional_runs if n == "dense" and n not in names]
    e2e.resolve_jobs(preset, args.jobs)  # --jobs 0 refused before a dry run too
    if args.no_train and not (args.resume or args.reuse_from):
        raise ConfigError("--no-train assembles results from earlier trainings: add --resume "
                          "(this --out) and/or --reuse-from DIR ...")
    if args.dry_run or preset.needs_gpu:
        seeds = e2e.resolve_seeds(preset, args.seeds, args.seed)
        runs = {(s, n): r for s in seeds
                for n, r in e2e.run_configs(preset, out, names=names, data=args.data,
                                            tokenizer=args.tokenizer, seed=s,
                                            iters=args.iters,
                                            tokens_per_param=args.tokens_per_param).items()}
        if preset.needs_gpu and not args.dry_run:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    f"--preset {preset.name} is sized for GPU clusters (needs CUDA); run it "
                    "there, or add --dry-run to write its run configs and commands here")
        if args.dry_run:
            if args.tokens_per_param is not None:
                from megatron_mohge.bench.budget import budget_iters

                for name, b in budget_iters(preset, names, args.tokens_per_param,
                                            args.tokenizer).items():
                    print(f"# {name}: {b['iters']:,} steps = {b['tokens']:,} tokens = "
                          f"{args.tokens_per_param:g} x {b['budget_params']:,} params of "
                          f"{b['budget_run']}")
            for (_, name), run in runs.items():
                path = runner.config_path(out, name, run)
                path.parent.mkdir(parents=True, exist_ok=True)
                run.to_yaml(path)
                print(" ".join(runner.launch_command(path, preset.nproc)))
            return 0
    from megatron_mohge.training.lock import FolderLock

    try:
        with FolderLock(out, PROG) as lock:  # one bench per --out at a time
            if lock.stale:
                print(f"{PROG}: note: {lock.stale}", file=sys.stderr)
            results = e2e.run_bench(preset, out, names=names, data=args.data,
                                    tokenizer=args.tokenizer, seed=args.seed, seeds=args.seeds,
                                    iters=args.iters, jobs=args.jobs, order=args.order,
                                    layer_bench=not args.no_layer_bench,
                                    split_documents=args.split_documents,
                                    json_keys=args.json_keys, resume=args.resume,
                                    reuse_from=args.reuse_from, train=not args.no_train,
                                    tokens_per_param=args.tokens_per_param)
    except runner.RunFailedError as exc:  # the run's own traceback is above; no second one
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    from megatron_mohge.bench.report import markdown_report, write_report

    paths = write_report(results, out)
    print("\n" + markdown_report(results))
    targets = results.get("targets", {}).get("met", {})
    if targets:
        from megatron_mohge.bench.verdicts import verdict

        print("targets: " + ", ".join(f"{k} {verdict(v, shout=True)}" for k, v in targets.items()))
        if results["targets"].get("not_judged"):
            print(f"loss targets not judged: {results['targets']['not_judged']}")
    print(f"\nwrote {out / 'results.json'} and " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
