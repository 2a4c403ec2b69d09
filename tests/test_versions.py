"""One package for both megatron-core lines: version facts, shape adapters, refused options."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest

from megatron_mohge import ConfigError
from megatron_mohge.compat import mcore, versions
from tests._launch import REPO


def test_install_range_and_scripts_agree_with_version_facts():
    from packaging.specifiers import SpecifierSet

    project = (REPO / "pyproject.toml").read_text()
    pinned = re.search(r'"megatron-core([^"]+)"', project).group(1)
    assert SpecifierSet(pinned) == versions.MCORE_RANGE
    script = (REPO / "scripts" / "setup_env.sh").read_text()
    for line, release in versions.TESTED_MCORE_RELEASES.items():
        assert f"megatron-core=={release}" in script, line
        assert release in versions.TESTED_MCORE_LINES[line]
        assert versions.Version(release) in versions.MCORE_RANGE


def test_installed_release_is_a_tested_line():
    assert versions.is_tested_mcore() and versions.mcore_line() in versions.TESTED_MCORE_LINES
    assert versions.Version("0.18.0") not in versions.TESTED_MCORE
    assert versions.Version("0.18.0") in versions.MCORE_RANGE


def test_builder_parts_and_rebuild_like_keep_the_shape():
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    sub = MLPSubmodules(linear_fc1=None, linear_fc2=None)  # any value: only passed through
    spec = ModuleSpec(module=SequentialMLP, params={"a": 1}, submodules=sub)
    part = functools.partial(SequentialMLP, submodules=sub, a=1)
    for builder in (spec, part):
        parts = mcore.builder_parts(builder)
        assert parts == (SequentialMLP, sub, {"a": 1})
        again = mcore.rebuild_like(builder, dict, sub, {"b": 2})
        assert type(again) is type(builder)
        assert mcore.builder_parts(again) == (dict, sub, {"b": 2})
        assert mcore.builds_subclass_of(builder, SequentialMLP)
    assert mcore.builder_parts(SequentialMLP) == (SequentialMLP, None, {})
    with pytest.raises(TypeError, match="positional"):
        mcore.builder_parts(functools.partial(SequentialMLP, 4))


def test_supported_kwargs_follows_the_signature():
    def old(config, pg_collection=None):
        pass

    def new(config, pg_collection=None, is_mtp_layer=False):
        pass

    assert mcore.supported_kwargs(old, is_mtp_layer=True) == {}
    assert mcore.supported_kwargs(new, is_mtp_layer=True) == {"is_mtp_layer": True}
    assert mcore.supported_kwargs(lambda **kw: None, name="x") == {"name": "x"}


@pytest.mark.parametrize("field,value", [
    ("moe_single_grouped_weight", True), ("moe_single_grouped_bias", True),
    ("moe_paged_stash", True), ("moe_ncclep_zero_copy", True),
    ("moe_router_load_balancing_type", "quantile_balancing"),
])
def test_uniform_only_options_are_refused(field, value):
    """0.19 options that assume one expert width (or Megatron's router): one-line errors,
    checked on a stand-in config so the test runs on both lines."""
    from megatron_mohge import MoHGEConfig

    @dataclasses.dataclass
    class TC:
        num_moe_experts: int = 8
        moe_router_topk: int = 2

    tc = TC()
    setattr(tc, field, value)
    mc = MoHGEConfig(widths=[16, 32], experts_per_group=4, group_topk=1, topk=2)
    with pytest.raises(ConfigError, match=f"TransformerConfig.{field}") as err:
        mc.apply_to(tc)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=f"TransformerConfig.{field}"):
        mc.check_transformer_config(tc)
