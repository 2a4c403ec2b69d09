"""The shipped run files' comments say what the code emits: the byte tokenizer's Megatron-LM
flags per tag, and Megatron-LM tags the launcher supports."""

from __future__ import annotations

import re

import pytest
from packaging.version import Version

from megatron_mohge.compat.versions import SUPPORTED_MEGATRON_LM_TAGS
from megatron_mohge.config.run import RunConfig
from megatron_mohge.integration.flags import tokenizer_flags
from megatron_mohge.resources import config_path, shipped_files

RUN_FILES = [f for f in shipped_files() if f.startswith("configs/")
             and "tokenizer:" in config_path(f.split("/", 1)[1]).read_text()]


def _flag_pairs(text: str) -> list[str]:
    return re.findall(r"--[a-z-]+ \d+", text)


@pytest.mark.parametrize("name", RUN_FILES)
def test_byte_tokenizer_comment_matches_the_flags(name, tmp_path):
    path = config_path(name.split("/", 1)[1])
    m = re.search(r"tokenizer: byte\s+# -> (.*)\n\s+#\s+\((core_v[\d.]+): (.*?);", path.read_text())
    if not re.search(r"tokenizer: byte\s+# ->", path.read_text()):
        pytest.skip("no comment on the byte tokenizer's flags")
    assert m, f"{name}: the byte tokenizer's comment names the flags of both tags"
    run = RunConfig.from_yaml(path, [f"output_dir={tmp_path}"])
    new = " ".join(tokenizer_flags(run, Version("0.19.0")))
    old = " ".join(tokenizer_flags(run, Version(m.group(2).removeprefix("core_v"))))
    assert m.group(1).split()[0] in new
    for pair in _flag_pairs(m.group(1)):
        assert pair in new, (name, pair, new)
    for pair in _flag_pairs(m.group(3)):
        assert pair in old, (name, pair, old)


def test_the_gpu_run_files_comment_on_the_byte_tokenizer():
    commented = [f for f in RUN_FILES if re.search(r"tokenizer: byte\s+# ->",
                                                   config_path(f.split("/", 1)[1]).read_text())]
    assert {"configs/small_mohge_1node.yaml", "configs/small_moe_1node.yaml"} <= set(commented)


@pytest.mark.parametrize("name", RUN_FILES)
def test_megatron_lm_tags_in_comments_are_supported(name):
    text = config_path(name.split("/", 1)[1]).read_text()
    tags = re.findall(r"core_v\d+\.\d+\.\d+", text)
    assert set(tags) <= set(SUPPORTED_MEGATRON_LM_TAGS), (name, tags)
