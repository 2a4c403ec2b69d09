"""The README's "Plugging MoHGE into your own pretrain_gpt.py" checklist names things that exist:
every dotted name it cites resolves (from ``megatron_mohge``), its aux-loss names are the ones
the routers record, and the Megatron-LM flag is the one the flag renderer emits."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import megatron_mohge
from megatron_mohge.integration.flags import OPTIM_FULLY_RESHARDABLE
from megatron_mohge.integration.megatron_lm.hooks import mohge_aux_loss_names
from megatron_mohge.config import MoHGEConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def checklist() -> str:
    text = README.read_text()
    return text.split("## Plugging MoHGE into your own `pretrain_gpt.py`", 1)[1].split("\n## ", 1)[0]


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(["megatron_mohge", *parts[:cut]]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    obj = megatron_mohge
    for attr in parts:
        obj = getattr(obj, attr)
    return obj


def test_every_cited_name_resolves():
    names = set()
    pattern = (r"(?<![\w.])(?:megatron_mohge\.)?((?:integration|compat|routing|hooks)\.[\w.]*\w|"
               r"set_training_progress|wrap_finalize_model_grads|end_of_step|"
               r"get_mohge_decoder_block_spec)")
    for span in re.findall(r"`([^`]+)`", checklist()):
        for m in re.finditer(pattern, span):
            name = m.group(1)
            names.add("integration.megatron_lm." + name if name.startswith("hooks.") else name)
    assert len(names) >= 8, names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except AttributeError:
            missing.append(name)
    assert not missing


def test_the_aux_loss_names_are_the_recorded_ones():
    text = checklist()
    two_level = mohge_aux_loss_names(MoHGEConfig.from_dict(dict(
        widths=[8, 16], experts_per_group=2, group_topk=1, topk=1,
        losses=dict(intra_group_coeff=0.1))))
    noisy = mohge_aux_loss_names(MoHGEConfig.from_dict(dict(
        widths=[8, 16], experts_per_group=2, group_topk=1, topk=1,
        router=dict(type="noisy_topk", group_gradient="none"),
        losses=dict(group_balance_coeff=0.0, expert_bias_update_rate=0.0))))
    assert len(two_level) == 3 and len(noisy) == 2
    for name in (*two_level, *noisy):
        assert f"`{name}`" in text, name


def test_the_resharding_flag_is_the_emitted_one():
    assert f"`{OPTIM_FULLY_RESHARDABLE}`" in checklist()
