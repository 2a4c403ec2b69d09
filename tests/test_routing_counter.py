"""One routing counter that routers own (issue 14): Megatron's stock router counts through
``CountedTopKRouter`` (a subclass swapped into the stock spec, not a hook bolted on after
DDP wrapping), and every reader goes through the counted-router interface."""

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("mcore_world1")

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mohge"


def stock_tc(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                num_moe_experts=6, moe_router_topk=2, moe_ffn_hidden_size=24,
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                add_bias_linear=False)
    base.update(kw)
    return TransformerConfig(**base)


def pgs():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def test_counted_router_routes_like_topk_router_and_counts_real_tokens():
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_mohge.routing.stock import CountedTopKRouter

    tc = stock_tc()
    torch.manual_seed(3)
    stock = TopKRouter(config=tc, pg_collection=pgs())
    torch.manual_seed(3)
    counted = CountedTopKRouter(config=tc, pg_collection=pgs())
    for r in (stock, counted):
        r.set_layer_number(1)
    # same parameters from the same RNG draws, same state-dict keys (checkpoints unchanged)
    assert stock.state_dict().keys() == counted.state_dict().keys()
    for k, v in stock.state_dict().items():
        assert not torch.is_tensor(v) or torch.equal(v, counted.state_dict()[k]), k
    want = torch.zeros(6, dtype=torch.float64)
    real = 0.0
    for call in range(2):
        x = torch.randn(5, 2, 16)  # [seq, batch, hidden]
        # [seq, batch] as MoELayer hands it to the router; True marks padding
        pad = torch.zeros(5, 2, dtype=torch.bool)
        pad[3:, call] = True
        p0, m0 = stock(x, padding_mask=pad)
        p1, m1 = counted(x, pad) if call else counted(x, padding_mask=pad)  # both call styles
        assert torch.equal(p0, p1) and torch.equal(m0, m1)
        keep = ~pad.reshape(-1)  # tokens in the router's [seq*batch] order
        want += m1.reshape(-1, 6)[keep].sum(0).double()
        real += float(keep.sum())
    c = counted.counter
    assert c.tokens_per_expert_E.tolist() == want.tolist()
    assert float(c.tokens_seen) == real == 16.0
    assert c.tokens_per_group_G.tolist() == [real]
    assert c.step_forwards == 2  # training mode, grad on
    fig = counted.routing_figures()
    assert fig.tokens_per_expert == want.tolist() and "importance_cv" not in fig.figures()
    c.reset()
    assert float(c.tokens_seen) == 0 and c.step_forwards == 2  # reset(): the window only


def test_stock_spec_swaps_only_the_router_and_keeps_checkpoint_keys():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_mohge.metrics import routers
    from megatron_mohge.routing.stock import CountedTopKRouter
    from megatron_mohge.specs import get_stock_decoder_block_spec
    from tests.workers import common as C

    tc = stock_tc(num_layers=3, moe_layer_freq=[1, 0, 1])
    models = {}
    for name, spec in (("stock", get_gpt_decoder_block_spec(tc, use_transformer_engine=False)),
                       ("counted", get_stock_decoder_block_spec(tc, use_te=False))):
        torch.manual_seed(0)
        models[name] = C.build_gpt(tc, spec)
    found = routers(models["counted"])
    assert len(found) == 2 and all(isinstance(r, CountedTopKRouter) for r in found)
    assert not any(isinstance(m, CountedTopKRouter) for m in models["stock"].modules())
    assert any(type(m) is TopKRouter for m in models["stock"].modules())
    sd = {k: v.state_dict() for k, v in models.items()}
    assert sd["stock"].keys() == sd["counted"].keys()
    assert all(torch.equal(v, sd["counted"][k]) for k, v in sd["stock"].items()
               if torch.is_tensor(v))
    sharded = {k: set(v.sharded_state_dict()) for k, v in models.items()}
    assert sharded["stock"] == sharded["counted"]


def test_training_model_uses_the_counted_stock_router():
    # the mohge-train builder: a stock run's routers count (no counters attached later)
    from megatron_mohge.compat.mcore import builder_parts
    from megatron_mohge.routing.stock import CountedTopKRouter
    from megatron_mohge.config.run import RunConfig
    from megatron_mohge.training.model_builder import decoder_spec, transformer_config
    from megatron_mohge.specs import is_moe_layer

    run = RunConfig.from_dict({"model": {"num_layers": 2, "hidden_size": 16,
                                         "num_attention_heads": 2, "seq_length": 16},
                               "moe": {"kind": "moe", "num_experts": 4, "topk": 2,
                                       "expert_hidden_size": 16}})
    block = decoder_spec(run, transformer_config(run))
    moe = [s.submodules.mlp for s in block.layer_specs if is_moe_layer(s)]
    assert moe and all(builder_parts(m).submodules.router is CountedTopKRouter for m in moe)


def test_router_hooks_replace_reaching_into_routers():
    from megatron_mohge.routing.noisy_topk import NoisyTopKRouter
    from megatron_mohge.routing.stock import CountedTopKRouter
    from tests.test_router import cfg_small, make_router

    bias = make_router(cfg_small(losses=dict(expert_bias_update_rate=0.1)))
    assert bias.extra_figures() == {"balance_bias": [0.0] * 14}
    assert make_router(cfg_small()).extra_figures() == {}
    assert CountedTopKRouter.extra_figures is NoisyTopKRouter.extra_figures  # the base no-op
    stock = CountedTopKRouter(config=stock_tc(), pg_collection=pgs())
    stock.end_step(torch.ones(6))  # the base no-op: nothing to balance
    assert stock.extra_figures() == {}
    assert stock.routed_layout().expert_widths == [24] * 6
    assert bias.routed_layout().expert_widths == bias.mohge.expert_widths


def test_noisy_importance_cv_comes_from_the_counter():
    from megatron_mohge.routing.counters import cv
    from tests.test_noisy_topk import randomize, router

    r = router(6, 2)
    randomize(r)
    r.train()
    r(torch.randn(8, 16))
    fig = r.routing_figures()
    assert fig.importance_cv == cv(r.counter.importance_E) > 0
    assert fig.figures()["importance_cv"] == fig.importance_cv


def test_update_training_progress_is_set_training_progress():
    from types import SimpleNamespace

    from megatron_mohge.integration.megatron_lm.hooks import update_training_progress
    from megatron_mohge.routing.base import find_routers, set_training_progress
    from tests.test_router import cfg_small, make_router

    model = torch.nn.ModuleList([make_router(cfg_small()), make_router(cfg_small())])
    update_training_progress(model, SimpleNamespace(mohge_config="x", train_iters=70,
                                                    curr_iteration=21))
    via_args = [r.training_progress for r in find_routers(model)]
    set_training_progress(model, 21, 70)
    assert [r.training_progress for r in find_routers(model)] == via_args == [0.3, 0.3]


# one interface: no reaching into router internals, no counters bolted on at run time
REACHING_IN = re.compile(r"(hasattr|getattr)\((r|router|rs\[0\])\b|attach_stock_counters|"
                         r"_stock_counter_hook|\.importance_E\b|\.balance_bias_E\b")


@pytest.mark.parametrize("where", ["training", "bench", "metrics.py", "routing/balance.py",
                                   "integration/megatron_lm/hooks.py"])
def test_readers_do_not_reach_into_routers(where):
    path = PACKAGE / where
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    hits = [f"{f.relative_to(PACKAGE)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if REACHING_IN.search(line)]
    assert not hits, "\n".join(hits)
