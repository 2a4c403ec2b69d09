"""Config input as users write it: scientific notation, odd encodings, missing extras."""

import sys

import pytest

from megatron_mohge.cli.train import main as train_main
from megatron_mohge.config import ConfigError, MoHGEConfig, load_yaml, read_yaml_file
from megatron_mohge.resources import config_path
from megatron_mohge.config.run import RunConfig

LAYER = "widths: [24, 40]\nexperts_per_group: 2\ngroup_topk: 1\ntopk: 2\n"


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    # Before: PyYAML (YAML 1.1) read 1e-3 as the string "1e-3": "expected a number".
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("train:\n  lr: 1e-3\n  min_lr: 1E-4\n  adam_eps: 1.0e-8\n"
                        "moe:\n  kind: moe\n  aux_loss_coeff: 5e-3\n")
    run = RunConfig.from_yaml(run_yaml, ["train.weight_decay=1e-1", "moe.z_loss_coeff=+1e-3"])
    assert (run.train.lr, run.train.min_lr, run.train.adam_eps) == (1e-3, 1e-4, 1e-8)
    assert (run.moe.aux_loss_coeff, run.train.weight_decay, run.moe.z_loss_coeff) == \
        (5e-3, 0.1, 1e-3)
    layer = MoHGEConfig.from_yaml(LAYER + "losses:\n  group_coeff: 1e-5\n")
    assert layer.losses.group_coeff == 1e-5
    assert load_yaml("[1e3, -2.5e-2, 1_0, 0x10, '1e-3', 1e, e5, 12]") == \
        [1000.0, -0.025, 10, 16, "1e-3", "1e", "e5", 12]  # ints and strings unchanged


@pytest.mark.parametrize("content, match", [
    (b"train:\n  lr: 0.1\n\x00\x01\x02", "not a text file .*NUL"),
    ("name: caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(invalid byte 0xe9 at offset 9\)"
                                            r"; save the file as UTF-8"),
])
def test_non_utf8_config_is_one_line(tmp_path, content, match, capsys):
    # Before: a UnicodeDecodeError traceback.
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        read_yaml_file(path, "run config")
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mohge-train: run config ")
    assert read_yaml_file(_bom(tmp_path), "x") == {"name": "bom"}  # a UTF-8 BOM is fine


def _bom(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(b"\xef\xbb\xbfname: bom\n")
    return p


def test_missing_tensorboard_is_a_warning(tmp_path, monkeypatch, capsys):
    # Before: the run failed (ConfigError) when the [train] extra was not installed.
    from megatron_mohge.training.run_log import tensorboard_writer

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    assert tensorboard_writer(tmp_path / "tb", "run1") is None
    err = capsys.readouterr().err
    assert err.startswith("[run1] warning: logging.tensorboard is on but the tensorboard "
                          "package is not installed") and err.count("\n") == 1
    assert not (tmp_path / "tb").exists()


def test_shipped_configs_still_validate():
    assert RunConfig.from_yaml(config_path("cpu_tiny_mohge.yaml")).moe.kind == "mohge"


@pytest.mark.parametrize("content", ["- train\n- model\n", "just a sentence\n"])
def test_a_run_file_that_is_not_a_mapping_is_one_line_with_overrides_too(tmp_path, content,
                                                                        capsys):
    # Issue 25.3: with an override, apply_overrides crashed on the list / string
    # ("AttributeError: 'list' object has no attribute 'get'").
    path = tmp_path / "run.yaml"
    path.write_text(content)
    for overrides in ([], ["train.iters=5"]):
        with pytest.raises(ConfigError, match=f"run config {path}: expected a mapping"):
            RunConfig.from_yaml(path, overrides)
        assert train_main(["--config", str(path), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mohge-train: run config ")


def test_a_relative_layer_path_is_read_from_the_run_files_folder(tmp_path, monkeypatch,
                                                                 capsys):
    # Issue 25.4: moe.mohge: layer.yaml was looked up in the current folder first, so the
    # same command read another layer depending on where it ran, silently.
    here, there = tmp_path / "here", tmp_path / "there"
    for folder, widths in ((here, "[24, 40]"), (there, "[32, 48]")):
        folder.mkdir()
        (folder / "layer.yaml").write_text(LAYER.replace("[24, 40]", widths))
    (there / "run.yaml").write_text("moe:\n  kind: mohge\n  mohge: layer.yaml\n")
    monkeypatch.chdir(here)
    run = RunConfig.from_yaml(there / "run.yaml")
    assert run.moe.mohge.widths == [32, 48] and run.layer_file == there / "layer.yaml"
    assert train_main(["--config", str(there / "run.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# moe.mohge read from {there / 'layer.yaml'}\n")
    # a path typed on the command line is relative to the current folder
    assert RunConfig.from_yaml(there / "run.yaml", ["moe.mohge=layer.yaml"]).moe.mohge.widths \
        == [24, 40]
    (there / "layer.yaml").unlink()  # not next to the run file: an error, not ./layer.yaml
    with pytest.raises(ConfigError, match=r"layer.yaml \(a relative path is read from the "
                                          r"run file's folder\)"):
        RunConfig.from_yaml(there / "run.yaml")
