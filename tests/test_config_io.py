"""One mapping -> dataclass builder (``config.io.build_dataclass``) for the layer and the run
config: the same error texts at every nesting level, sections found from the type hints, and
parsing + dumping unchanged (a checkpoint's run.yaml is ``to_yaml`` of the parsed file)."""

import ast
import dataclasses
from pathlib import Path

import pytest

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.config.io import build_dataclass, nested_dataclasses
from megatron_mohge.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
GOLDEN = Path(__file__).resolve().parent / "golden" / "config_yaml"
LAYER = {"widths": [8, 16], "experts_per_group": 2, "group_topk": 1, "topk": 2}


def _run(**sections):
    return {"moe": {"kind": "mohge", "mohge": dict(LAYER)}, **sections}


@pytest.mark.parametrize("build, path, cls", [
    (lambda: MoHGEConfig.from_dict({**LAYER, "router": {"tpye": "mohge"}}), "router.tpye",
     "RouterConfig"),
    (lambda: MoHGEConfig.from_dict({**LAYER, "losses": {"group_coef": 1}}), "losses.group_coef",
     "LossConfig"),
    (lambda: MoHGEConfig.from_dict({"mohge": {**LAYER, "topK": 2}}), "topK", "MoHGEConfig"),
    (lambda: RunConfig.from_dict({"moe": {"noisy_gating": {"nois": 1}}}),
     "moe.noisy_gating.nois", "NoisyGatingConfig"),
    (lambda: RunConfig.from_dict(_run(moe={"kind": "mohge", "mohge": {**LAYER, "router": {
        "tpye": 1}}})), "moe.mohge.router.tpye", "RouterConfig"),
    (lambda: RunConfig.from_dict(_run(moe={"kind": "mohge", "mohge": {**LAYER, "noisy_gating": {
        "nois": 1}}})), "moe.mohge.noisy_gating.nois", "NoisyGatingConfig"),
    (lambda: RunConfig.from_dict({"moe": {"kind": "mohge", "mohge": {**LAYER, "topK": 2}}}),
     "moe.mohge.topK", "MoHGEConfig"),
    (lambda: RunConfig.from_dict({"launch": {"nodse": 1}}), "launch.nodse", "LaunchConfig"),
    (lambda: RunConfig.from_dict({"trian": {}}), "trian", "RunConfig"),
])
def test_unknown_keys_name_the_full_path_and_the_class(build, path, cls):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(f"{path}: unknown key in {cls}. Did you mean '")


def test_missing_fields_and_non_mappings_name_the_path_and_the_class():
    with pytest.raises(ConfigError, match=r"^moe\.mohge \(MoHGEConfig\): missing required "
                                          r"field\(s\): group_topk, topk$"):
        RunConfig.from_dict({"moe": {"kind": "mohge", "mohge": {"widths": [8], "experts_per_group": 2}}})
    with pytest.raises(ConfigError, match=r"^model \(ModelConfig\): expected a mapping, got int 3$"):
        RunConfig.from_dict({"model": 3})
    # was an AttributeError ('NoneType' object has no attribute 'num_layers') in validate()
    with pytest.raises(ConfigError, match=r"^model \(ModelConfig\): expected a mapping"):
        RunConfig.from_dict({"model": None})
    with pytest.raises(ConfigError, match=r"^RunConfig: expected a mapping, got list"):
        RunConfig.from_dict([1])
    # an Optional section may be null: moe.mohge of a stock run
    assert RunConfig.from_dict({"moe": {"mohge": None}}).moe.mohge is None


def test_nested_validation_errors_keep_their_section_prefix():
    with pytest.raises(ConfigError, match=r"^moe\.mohge: MoHGEConfig\.topk: K=9 exceeds"):
        RunConfig.from_dict({"moe": {"kind": "mohge", "mohge": {**LAYER, "topk": 9}}})


def test_sections_come_from_the_type_hints():
    """No hand-kept table of nested sections: every dataclass-typed field is one."""
    for cls in (MoHGEConfig, RunConfig):
        hinted = {f.name for f in dataclasses.fields(cls) if "Config" in str(f.type)}
        assert set(nested_dataclasses(cls)) == hinted
    assert set(nested_dataclasses(MoHGEConfig)) == {"router", "losses", "allocation",
                                                    "noisy_gating"}
    # the layer file's `mohge:` wrapper is accepted inside a run file as before
    run = RunConfig.from_dict({"moe": {"kind": "mohge", "mohge": {"mohge": dict(LAYER)}}})
    assert run.moe.mohge == MoHGEConfig.from_dict(LAYER)
    # built in code with a dict section
    assert MoHGEConfig(**LAYER, router={"group_score": "softmax"}).router.group_score == "softmax"


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("*.yaml")))
def test_shipped_configs_parse_and_dump_unchanged(name):
    """``to_yaml`` of every shipped config as the code before the one builder wrote it (the
    golden files): a checkpoint's run.yaml is this text."""
    path = CONFIGS / name
    try:
        text = RunConfig.from_yaml(path).to_yaml()
    except ConfigError:
        text = MoHGEConfig.from_yaml(path).to_yaml()
    assert text == (GOLDEN / name).read_text()
    assert {p.name for p in CONFIGS.glob("*.yaml")} == {p.name for p in GOLDEN.glob("*.yaml")}


def test_the_builder_is_written_once():
    """Only ``config/io.py`` builds dataclasses from mappings (suggests close keys); no module
    imports a private helper of the config package."""
    pkg = ROOT / "megatron_mohge"
    suggest = [p for p in pkg.rglob("*.py") if "get_close_matches" in p.read_text()]
    assert suggest == [pkg / "config" / "io.py"]
    private = []
    for p in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.startswith(("megatron_mohge.config",))
                    and node.module != "megatron_mohge.config.megatron"):
                private += [f"{p}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_build_dataclass_on_a_plain_dataclass():
    @dataclasses.dataclass
    class Inner:
        a: int = 1

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        b: int = 0

    assert build_dataclass(Outer, {"inner": {"a": 2}}) == Outer(Inner(2))
    with pytest.raises(ConfigError, match=r"^x\.inner\.c: unknown key in Inner\."):
        build_dataclass(Outer, {"inner": {"c": 2}}, "x")


def test_cli_override_paths_are_real_fields():
    """``--mohge-*`` overrides name a section and a field of ``MoHGEConfig``; checked against
    ``dataclasses.fields`` so a renamed field cannot leave a flag pointing nowhere."""
    from megatron_mohge.integration.megatron_lm.args import CLI_OVERRIDES

    sections = {name: cls for name, (cls, _) in nested_dataclasses(MoHGEConfig).items()}
    for dest, (section, name) in CLI_OVERRIDES.items():
        owner = MoHGEConfig if section is None else sections[section]
        assert name in {f.name for f in dataclasses.fields(owner)}, (dest, section, name)


def test_every_cli_override_flag_parses_and_reaches_the_config(tmp_path):
    """Each ``--mohge-<field>`` flag of ``CLI_OVERRIDE_FIELDS`` sets that field of the config
    Megatron-LM builds (a non-default value per flag, so a flag wired to nothing fails)."""
    import argparse

    from megatron_mohge.integration.megatron_lm.args import (
        CLI_OVERRIDE_FIELDS,
        add_mohge_args,
        mohge_config_from_args,
    )
    from megatron_mohge.resources import config_path

    parser = add_mohge_args(argparse.ArgumentParser())
    base = MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml"))
    argv, want = ["--mohge-config", str(config_path("tiny_mohge.yaml"))], {}
    for section, name, kind, _ in CLI_OVERRIDE_FIELDS:
        owner = base if section is None else getattr(base, section)
        have = getattr(owner, name)
        value = (next(c for c in kind if c != have) if isinstance(kind, tuple)
                 else (have or 0.0) + 0.125)
        argv += ["--mohge-" + name.replace("_", "-"), str(value)]
        want[(section, name)] = value
    args = parser.parse_args(argv)
    args.expert_model_parallel_size = 1
    cfg = mohge_config_from_args(args)
    for (section, name), value in want.items():
        owner = cfg if section is None else getattr(cfg, section)
        assert getattr(owner, name) == value, (section, name)
