"""Default dataset + GPTDataset built under torch.distributed, each rank reading its DP slice.

Every rank calls ``ensure_default_dataset`` (rank 0 prepares, the others wait) and
``build_gpt_datasets`` (rank 0 writes the sample-index cache first). Rank 0 reports each
rank's tokens of one global batch and the same batch read with ``dp_size=1``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402


def main():
    from megatron_mohge.data import build_gpt_datasets, ensure_default_dataset, get_micro_batches

    args = C.parse_args()
    world = C.init_distributed()
    rank = dist.get_rank()
    prefix = ensure_default_dataset(os.path.join(args.tmp, "data"), "byte", max_bytes=120_000,
                                    progress=False)
    train, _ = build_gpt_datasets(prefix, "byte", seq_length=32, seed=7, train_samples=64,
                                  valid_samples=4, cache_dir=os.path.join(args.tmp, "idx"))
    mine = get_micro_batches(train, iteration=2, global_batch_size=8, micro_batch_size=2,
                             dp_rank=rank, dp_size=world)
    tokens = torch.cat([mb["tokens"] for mb in mine])
    gathered = [None] * world
    dist.all_gather_object(gathered, tokens.tolist())
    full = get_micro_batches(train, iteration=2, global_batch_size=8, micro_batch_size=2,
                             dp_rank=0, dp_size=1)
    C.write_result(args, {
        "world": world, "prefix": prefix, "per_rank": gathered,
        "full": torch.cat([mb["tokens"] for mb in full]).tolist(),
        # the index cache sits in a sub-folder named by the dataset's contents
        "cache_files": sorted(os.path.relpath(os.path.join(d, f), os.path.join(args.tmp, "idx"))
                              for d, _, files in os.walk(os.path.join(args.tmp, "idx"))
                              for f in files),
    })
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
