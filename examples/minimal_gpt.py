"""A GPTModel with MoHGE layers: build it, run one forward + backward, print the losses.

Runs on CPU in a few seconds (one process, gloo); on a GPU machine drop enable_cpu_mode()
and use NCCL. Run from the repository root:

    python examples/minimal_gpt.py

The README's "Minimal example" is the part after the imports between the two `# ---` lines
(tests/test_minimal_example.py keeps them equal and runs this file).
"""

from pathlib import Path

import torch
import torch.distributed as dist

CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_mohge.yaml"

# --- README: minimal example
import megatron_mohge
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from megatron.core.transformer import TransformerConfig
from megatron_mohge import MoHGEConfig, get_mohge_decoder_block_spec

megatron_mohge.compat.enable_cpu_mode()          # CPU only: stock megatron-core on gloo
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # one process
parallel_state.initialize_model_parallel()      # TP = PP = EP = 1
model_parallel_cuda_manual_seed(1234)

mohge = MoHGEConfig.from_yaml(CONFIG)            # 4 groups x 4 experts, widths 28..76, Kg=2, K=2
config = mohge.apply_to(TransformerConfig(       # sets num_moe_experts, moe_router_topk, ...
    num_layers=4, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
    gated_linear_unit=True, activation_func=torch.nn.functional.silu, add_bias_linear=False,
    moe_layer_freq=[0, 1, 1, 1], use_cpu_initialization=True))
spec = get_mohge_decoder_block_spec(config, mohge, use_te=False)  # None: TE when usable
model = GPTModel(config=config, transformer_layer_spec=spec,
                 vocab_size=257,                 # the byte tokenizer: 256 bytes + eod
                 max_sequence_length=64, position_embedding_type="rope")

tokens = torch.tensor([list(b"MoHGE routes easy tokens to narrow experts. " * 3)[:65]] * 2)
inputs, labels = tokens[:, :-1], tokens[:, 1:]
positions = torch.arange(64).expand(2, 64)
megatron_mohge.set_training_progress(model, 60, 100)  # once per step: group loss on at 50%
loss = model(inputs, positions, None, labels=labels).mean()  # per-token losses -> mean
loss.backward()                                  # aux losses backpropagate with it
print(f"lm loss {loss.item():.4f}")
# --- end of README excerpt

# The aux losses (mohge_group_loss, mohge_group_balance_loss, ...) sit in Megatron's MoE
# tracker, summed over layers: what Megatron-LM's training log reads.
try:  # megatron-core 0.18+
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracked = {n: e.values for n, e in get_moe_metrics_tracker().metrics.items()}
except ImportError:  # 0.16
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracked = {n: e["values"] for n, e in get_moe_layer_wise_logging_tracker().items()}
for name, values in sorted(tracked.items()):
    print(f"{name} {values.sum().item():.4g} (sum over {int((values != 0).sum())} MoE layers)")
grads = sum(p.grad is not None for p in model.parameters())
print(f"{grads} of {sum(1 for _ in model.parameters())} parameters have gradients")

parallel_state.destroy_model_parallel()
dist.destroy_process_group()
