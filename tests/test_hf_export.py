"""mohge-export-hf: the exported Hugging Face model computes what the plugin's model computes.

One 2-rank job saves mohge-train checkpoints (model + optimizer, run.yaml beside) of tiny
models at EP1 and EP2, with the plugin model's fp32 logits and a 32-token greedy
continuation; each is exported and loaded with ``AutoModelForCausalLM(trust_remote_code)``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests._launch import REPO, run_workers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("transformers")

BACKBONE = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64}
CASES = {
    # sigmoid group score, renorm weights, loss-free bias, shared expert, GQA, a dense layer
    "mohge_sigmoid_renorm": {
        "model": {**BACKBONE, "num_query_groups": 2, "moe_layer_freq": [1, 0],
                  "ffn_hidden_size": 48},
        "moe": {"kind": "mohge", "mohge": {
            "widths": [16, 32], "experts_per_group": [2, 4], "group_topk": 2, "topk": 3,
            "num_shared_experts": 1, "shared_expert_width": 24,
            "losses": {"expert_bias_update_rate": 0.01}}}},
    # softmax group score, paper weights, loss-free bias; LayerNorm, GELU, biases, untied
    # output layer, learned absolute positions, three groups with Kg=2
    "mohge_softmax_paper": {
        "model": {**BACKBONE, "normalization": "LayerNorm", "swiglu": False,
                  "add_bias_linear": True, "untie_embeddings_and_output_weights": True,
                  "position_embedding_type": "learned_absolute"},
        "moe": {"kind": "mohge", "mohge": {
            "widths": [8, 16, 24], "experts_per_group": [2, 2, 4], "group_topk": 2, "topk": 2,
            "router": {"group_score": "softmax", "expert_weighting": "paper"},
            "losses": {"expert_bias_update_rate": 0.01}}}},
    # Megatron's stock MoE (TopKRouter) with a shared expert: the same code, one group
    "stock": {"model": dict(BACKBONE),
              "moe": {"kind": "stock", "num_experts": 4, "expert_hidden_size": 24, "topk": 2,
                      "num_shared_experts": 1, "shared_expert_width": 16}},
}
EP = {"mohge_sigmoid_renorm": 1, "mohge_softmax_paper": 1, "stock": 1,
      "mohge_sigmoid_renorm_ep2": 2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-export")
    cases = [{"name": n, "ep": EP[n], "run": CASES[n.replace("_ep2", "")]} for n in EP]
    (root / "cases.json").write_text(json.dumps(cases))
    result = run_workers("export_worker.py", 2, "--cases", str(root / "cases.json"),
                         "--root", str(root))
    return root, result


def load_export(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True,
                                                dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(EP))
def test_export_matches_plugin_logits_and_greedy_generation(saved, case, tmp_path):
    from megatron_mohge.export import export_hf

    root, result = saved
    assert result[case]["layout"]["ep"] == EP[case]
    # the run folder (newest checkpoint); the stock case in small shards
    out = export_hf(root / case, tmp_path / "hf",
                    max_shard_size="20KB" if case == "stock" else "5GB")
    assert (out / "model.safetensors.index.json").is_file() == (case == "stock")
    ref = torch.load(result[case]["ref"])
    model = load_export(out)
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    diff = float((logits - ref["logits"]).abs().max())
    scale = float(ref["logits"].abs().max())
    print(f"PARITY {case}: max |logit diff| = {diff:.3g} (logit scale {scale:.3g})")
    assert diff <= 1e-4 * scale
    prompt = ref["greedy"][:, :8]
    out_ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                             do_sample=False)
    assert torch.equal(out_ids, ref["greedy"])


def test_export_layout_and_tokenizer(saved, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from megatron_mohge.data.tokenizers import ByteTokenizer
    from megatron_mohge.export import export_hf

    root, _ = saved
    out = export_hf(root / "mohge_softmax_paper", tmp_path / "hf")
    cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert cfg.auto_map["AutoModelForCausalLM"] == "modeling_mohge.MohgeForCausalLM"
    assert cfg.expert_group_widths == [8, 16, 24] and cfg.experts_per_group == [2, 2, 4]
    assert cfg.router["selection_bias"] and cfg.vocab_size == 384  # padded as trained
    assert not cfg.tie_word_embeddings
    model = load_export(out)
    names = dict(model.named_parameters())
    assert names["model.layers.0.mlp.groups.2.fc1_weight"].shape == (4, 24, 32)  # one block
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "naïve café ✓ <|endoftext|>"
    assert tok(text).input_ids == ByteTokenizer().tokenize(text.replace(" <|endoftext|>", " ")) \
        + [256]
    assert tok.eos_token_id == 256 and tok.decode(tok("héllo").input_ids) == "héllo"


def _cli(args):
    from megatron_mohge.cli.export_hf import main

    return main([str(a) for a in args])


def _iter_dir(root, case):
    return root / case / "checkpoints" / "iter_0000003"


def test_bad_input_one_line_exit_2_nothing_written(saved, tmp_path, capsys):
    root, _ = saved
    src = tmp_path / "ckpt"
    shutil.copytree(_iter_dir(root, "stock"), src)
    out = tmp_path / "out"

    def fails(args, *needles):
        capsys.readouterr()
        assert _cli([*args, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mohge-export-hf: "), err
        for n in needles:
            assert str(n) in err, err
        assert not out.exists() and not list(tmp_path.glob(".out.*"))

    fails([root / "stock", "--iteration", "7"], "iter_0000007", "does not exist")
    fails([tmp_path / "nowhere"], "does not exist")
    (src / "run.yaml").rename(tmp_path / "run.yaml")
    fails([src], "run.yaml", "--config")
    # the run file given with --config (a mohge-pretrain checkpoint has none beside it)
    assert _cli([src, "--out", tmp_path / "ok", "--config", tmp_path / "run.yaml"]) == 0
    shard = sorted(src.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    fails([src, "--config", tmp_path / "run.yaml"], shard)
    shard.unlink()
    fails([src, "--config", tmp_path / "run.yaml"], shard, "missing")
    # a router option the modeling code does not implement
    bad = tmp_path / "bad"
    shutil.copytree(_iter_dir(root, "mohge_sigmoid_renorm"), bad)
    run = yaml.safe_load((bad / "run.yaml").read_text())
    run["moe"]["mohge"]["router"]["type"] = "noisy_topk"
    run["moe"]["mohge"]["losses"]["expert_bias_update_rate"] = 0.0
    (tmp_path / "noisy.yaml").write_text(yaml.safe_dump(run))
    fails([bad, "--config", tmp_path / "noisy.yaml"], "moe.mohge.router.type")
    # an edited run.yaml no longer matches the size its save recorded: named, not trusted
    (bad / "run.yaml").write_text(yaml.safe_dump(run))
    fails([bad], bad / "run.yaml", "truncated")
    # an existing, non-empty --out is left alone
    out.mkdir()
    (out / "keep").write_text("x")
    capsys.readouterr()
    assert _cli([root / "stock", "--out", out]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep").is_file()


def test_modeling_code_refuses_unknown_router_option(saved, tmp_path):
    from megatron_mohge.export import export_hf

    root, _ = saved
    out = export_hf(root / "stock", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    for key, value in (("expert_weighting", "unnormalized"), ("straight_through_group", True)):
        bad = dict(cfg, router={**cfg["router"], key: value})
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"router.{key}"):
            load_export(out)


def test_export_and_exported_model_need_no_megatron(saved, tmp_path):
    """In a process where importing megatron or transformer_engine fails: export, load, run."""
    root, result = saved
    code = f"""
import sys
for name in ("megatron", "transformer_engine"):
    sys.modules[name] = None  # any import of them raises ImportError
from megatron_mohge.cli.export_hf import main
assert main([{str(root / 'mohge_sigmoid_renorm')!r}, "--out", {str(tmp_path / 'hf')!r}]) == 0
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'hf')!r}, trust_remote_code=True)
ref = torch.load({result['mohge_sigmoid_renorm']['ref']!r})
assert (m(ref["tokens"]).logits - ref["logits"]).abs().max() < 1e-4 * ref["logits"].abs().max()
assert not any(k.startswith(("megatron.", "transformer_engine.")) for k in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


HELD_OUT = ["The quick brown fox jumps over the lazy dog. " * 3,
            "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
            "def f(x):\n    return x * 2\n" * 5, "a"]


def _held_out(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD_OUT))
    return path


def _mohge_eval(*args):
    from megatron_mohge.cli import eval as cli

    return cli.evaluate(cli.parse_args([str(a) for a in (*args, "--no-progress")]))


def test_mohge_eval_checkpoint_and_export_agree(saved, tmp_path):
    """Bits per byte of the plugin model (checkpoint) and of its export on the same text."""
    import torch.distributed as dist

    from megatron_mohge.export import export_hf
    from megatron_mohge.training import mcore_plumbing as M

    root, _ = saved
    data = _held_out(tmp_path)
    out = export_hf(root / "mohge_sigmoid_renorm_ep2", tmp_path / "hf")
    hf = _mohge_eval(out, data)
    try:
        mg = _mohge_eval(root / "mohge_sigmoid_renorm_ep2", data)
    finally:
        M.destroy_layout()
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"BPB checkpoint {mg['bits_per_byte']:.6f} export {hf['bits_per_byte']:.6f}")
    assert mg["tokens"] == hf["tokens"] == sum(len(t.encode()) for t in HELD_OUT)  # bytes
    assert mg["bytes"] == hf["bytes"] == hf["tokens"] and hf["documents"] == len(HELD_OUT)
    assert abs(mg["bits_per_byte"] - hf["bits_per_byte"]) <= 1e-3
    assert hf["loss"] == pytest.approx(mg["loss"], abs=1e-4)
    assert hf["perplexity"] == pytest.approx(torch.tensor(hf["loss"]).exp().item(), rel=1e-6)


@pytest.mark.parametrize("n,max_length", [(1, 4), (4, 4), (5, 4), (9, 4), (135, 64)])
def test_rolling_windows_are_lm_eval_harness_windows(n, max_length):
    lm_utils = pytest.importorskip("lm_eval.utils")
    from megatron_mohge.evaluation.rolling import window_targets

    tokens = list(range(100, 100 + n))
    theirs = []
    for pair in lm_utils.get_rolling_token_windows(tokens, 7, max_length, 1):
        context, target = lm_utils.make_disjoint_window(pair)
        theirs.append(((context + target)[-(max_length + 1):][:-1], target))
    assert list(window_targets(tokens, 7, max_length)) == theirs


@pytest.mark.slow
def test_lm_eval_harness_bits_per_byte_equals_mohge_eval(saved, tmp_path):
    """``lm_eval --model hf`` on the export, offline, with the shipped local task."""
    pytest.importorskip("lm_eval")
    from megatron_mohge.evaluation.lm_eval_task import TASK, write_task
    from megatron_mohge.export import export_hf

    root, _ = saved
    data = _held_out(tmp_path)
    out = export_hf(root / "mohge_softmax_paper", tmp_path / "hf")
    tasks = write_task(data, tmp_path / "tasks").parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "ds-cache"), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float32", "--include_path",
           str(tasks), "--tasks", TASK, "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "lm_eval_out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    print(proc.stdout[-1500:])
    results = json.loads(next((tmp_path / "lm_eval_out").rglob("results_*.json")).read_text())
    harness = results["results"][TASK]["bits_per_byte,none"]
    ours = _mohge_eval(out, data)["bits_per_byte"]
    print(f"BPB lm_eval {harness:.6f} mohge-eval {ours:.6f}")
    assert abs(harness - ours) <= 1e-3


def test_mohge_eval_cli_prints_one_json_object_and_one_line_errors(saved, tmp_path, capsys):
    from megatron_mohge.cli.eval import main
    from megatron_mohge.export import export_hf

    root, _ = saved
    out = export_hf(root / "stock", tmp_path / "hf")
    data = _held_out(tmp_path)
    capsys.readouterr()
    assert main([str(out), str(data), "--json", "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip()
    result = json.loads(printed)  # the whole of stdout is one JSON object
    assert {"loss", "perplexity", "bits_per_byte", "tokens"} <= set(result)
    assert result["documents"] == len(HELD_OUT)
    for args, needle in (([str(out), str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                         ([str(tmp_path / "nowhere"), str(data)], "nowhere")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mohge-eval: ") and needle in err[0], err
