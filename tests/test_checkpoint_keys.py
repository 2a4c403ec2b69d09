"""Checkpoint compatibility, pinned: the sharded-state-dict keys and global shapes of the
shipped tiny MoHGE and stock models. ``tests/data/sharded_keys_tiny.json`` was written by
main at 555f6a1 (before the stock router became ``CountedTopKRouter``); a checkpoint stays
loadable exactly while this set is unchanged."""

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "data" / "sharded_keys_tiny.json"

pytestmark = pytest.mark.usefixtures("mcore_world1")


def sharded_keys(tree, out: dict) -> dict:
    """``{key: global shape}`` of every sharded entry in a ``sharded_state_dict`` tree."""
    if isinstance(tree, dict):
        for v in tree.values():
            sharded_keys(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            sharded_keys(v, out)
    elif hasattr(tree, "key"):
        out[tree.key] = list(getattr(tree, "global_shape", ()) or ())
    return out


@pytest.mark.parametrize("name", sorted(json.loads(GOLDEN.read_text())))
def test_sharded_keys_of_the_tiny_models_are_unchanged(name):
    from megatron_mohge.resources import config_path
    from megatron_mohge.config.run import RunConfig
    from megatron_mohge.training import mcore_plumbing as M
    from megatron_mohge.training.model_builder import decoder_spec, transformer_config

    run = RunConfig.from_yaml(config_path(name))
    tc = transformer_config(run)
    gpt = M.build_gpt(tc, decoder_spec(run, tc), vocab_size=run.padded_vocab_size(256),
                      seq_length=run.model.seq_length)
    assert sharded_keys(gpt.sharded_state_dict(), {}) == json.loads(GOLDEN.read_text())[name]
