"""``mohge-export-hf CHECKPOINT --out DIR``: a Megatron checkpoint as a Hugging Face model.

``CHECKPOINT``: a run's output folder or checkpoint folder (its newest complete checkpoint)
or one ``iter_XXXXXXX`` folder, saved by ``mohge-train`` (its ``run.yaml`` beside it) or by
``mohge-pretrain`` (pass the run file with ``--config``), at any TP / EP / PP layout. ``DIR``
gets ``config.json`` (with ``auto_map``), ``configuration_mohge.py``, ``modeling_mohge.py``,
``model.safetensors`` (sharded above ``--max-shard-size``) and the tokenizer::

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

Needs neither Megatron nor a GPU. Exit codes: 0 written; 2 bad input (one line naming the
file or field; nothing is written to ``DIR``).
"""

from __future__ import annotations

import sys

from megatron_mohge.cli import common

PROG = "mohge-export-hf"


def parse_args(argv=None):
    p = common.parser(PROG, __doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run folder, checkpoint folder or "
                   "iter_XXXXXXX folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face model folder")
    p.add_argument("--iteration", type=int, default=None,
                   help="export this iteration instead of the newest")
    p.add_argument("--config", default=None, metavar="RUN.yaml",
                   help="the run file (default: run.yaml inside the checkpoint folder)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the run's tokenizer.json when it moved since training")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    return p.parse_args(argv)


def _export(args) -> int:
    from megatron_mohge.export import export_hf

    export_hf(args.checkpoint, args.out, iteration=args.iteration, run_file=args.config,
              tokenizer=args.tokenizer, max_shard_size=args.max_shard_size, force=args.force,
              log=lambda msg: print(f"{PROG}: {msg}", flush=True))
    return 0


@common.entry
def main(argv=None) -> int:
    return common.run_cli(PROG, _export, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
