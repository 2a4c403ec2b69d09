"""Torch grouped-GEMM experts: one ``torch._grouped_mm`` for fc1 and one for fc2 per width.

``TorchGroupedMLP`` is a drop-in for Megatron's ``SequentialMLP`` (same constructor and
``forward(x, tokens_per_expert, probs) -> (out, None)``) that needs neither Transformer
Engine nor a CUDA-only extension: the ``num_local_experts`` experts of one width are stacked
into 3-D parameters and each linear is one grouped GEMM over the dispatcher's token blocks.

Layout and math follow Megatron's expert ``MLP`` exactly (so weights, gradients and
checkpoints move between this backend and ``local``):

* ``linear_fc1.weight`` ``[n, out1, hidden]``: expert ``k``'s ``ColumnParallelLinear`` weight
  (``out1 = 2 * width / etp`` when gated: this expert-TP rank's gate rows then its up rows,
  Megatron's stride-2 SwiGLU layout); ``linear_fc2.weight`` ``[n, hidden, width / etp]``:
  expert ``k``'s ``RowParallelLinear`` weight. Biases ``[n, out1]`` / ``[n, hidden]``.
* expert linears do no TP communication (the token dispatcher reduces over expert-TP, as
  for Megatron's experts); ``probs`` scale the activation as ``MLP(per_token_scale=...)``.
* ``sharded_state_dict`` writes, per expert, exactly the tensors and objects the ``local``
  path writes (same keys, shapes, offsets, SwiGLU split, replica ids) through one
  ``ShardedTensorFactory`` per stacked parameter; ``init`` reproduces the ``local``
  initialisation draw for draw (same seed, same weights). The distributed optimizer's
  model-space states (``fully_reshardable``) are built by the same factories.

The grouped GEMM (torch >= 2.8; ``aten/src/ATen/native/GroupedMMUtils.h`` and
``cuda/GroupedBlas.cpp``) needs: fp32/bf16/fp16 operands of one dtype, int32 cumulative
``offs``, and both matrices row- or column-major with the leading stride a multiple of 16
bytes (and 16-byte aligned data on CUDA). The CUTLASS kernel runs for bf16 on sm90/sm100;
other dtypes/devices take torch's per-group ``mm`` fallback (correct, slower, one
device-to-host copy of ``offs``). We therefore pad, per forward, only where a stride would
break that rule:

* hidden size not a multiple of ``16 / itemsize`` (8 in bf16, 4 in fp32): the tokens, fc1's
  input and fc2's output dimension are zero-padded (the output is cut back);
* this rank's width shard (``width / etp``) not a multiple of it: each SwiGLU half of fc1's
  output and fc2's input dimension are zero-padded.

Gradients flow through the same padded operands (``F.pad``'s backward drops the padding).

Zero columns add nothing to the products, so results are unchanged; the cost is a copy of
the affected weights per step (a one-time warning names it). On CUDA each expert's token
group is also padded to a multiple of those 16 bytes' rows (8 in bf16) with zero rows, as
torchtitan does for ``torch._grouped_mm``: the weight-gradient GEMM groups along the token
dimension. Padded rows have zero input and zero prob and are dropped from the output, so they
contribute nothing. On CPU (torch's per-group fallback) no token padding is done. FP8/FP4 is
not supported here (use ``te``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_object_for_checkpoint,
    make_sharded_tensors_for_checkpoint,
)

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available() -> bool:
    """This torch has a grouped GEMM (``torch._grouped_mm``, torch >= 2.8)."""
    return _grouped_mm is not None


@functools.lru_cache(maxsize=None)
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """A tiny grouped GEMM runs here for this device type and dtype (probed once).

    Older torch builds only accept bf16 on sm90 GPUs; probing is the one check that holds
    across versions."""
    if _grouped_mm is None:
        return False
    try:
        dev = torch.device(device_type, torch.cuda.current_device()) \
            if device_type == "cuda" else torch.device(device_type)
        a = torch.ones(4, 16, dtype=dtype, device=dev)
        b = torch.ones(2, 8, 16, dtype=dtype, device=dev).transpose(-2, -1)
        out = _grouped_mm(a, b, offs=torch.tensor([1, 4], dtype=torch.int32, device=dev))
        return bool(out.shape == (4, 8) and float(out[0, 0]) == 16.0)
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def stride_alignment(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: the grouped GEMM's leading-stride granularity."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def _pad_last(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def token_group_padding(counts: Sequence[int], align: int) -> tuple[list[int], torch.Tensor]:
    """Group sizes rounded up to ``align`` rows, and each token's row in the padded layout."""
    padded = [_round_up(c, align) for c in counts]
    c = torch.tensor(counts, dtype=torch.long)
    start = torch.cumsum(c, 0) - c
    p = torch.tensor(padded, dtype=torch.long)
    start_pad = torch.cumsum(p, 0) - p
    dest = torch.arange(int(c.sum())) + torch.repeat_interleave(start_pad - start, c)
    return padded, dest


def _per_token(bias_n: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Row ``k`` of ``bias_n [n, d]`` repeated for each of expert ``k``'s tokens."""
    rep = torch.tensor(counts, device=bias_n.device)
    return torch.repeat_interleave(bias_n, rep, dim=0, output_size=int(sum(counts)))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _GroupedLinear(torch.nn.Module):
    """``n`` expert linears of one shape as ``weight [n, out, in]`` (+ ``bias [n, out]``).

    Per-expert ``_extra_state`` objects are written to checkpoints (the ``local`` linears
    write them); on load they carry nothing and are dropped."""

    def __init__(self, n: int, out_features: int, in_features: int, bias: bool, *, dtype,
                 device, partition_dim: int, is_expert_parallel: bool, sequence_parallel: bool):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.weight = torch.nn.Parameter(torch.empty(n, out_features, in_features, dtype=dtype,
                                                     device=device))
        # Megatron's expert-linear attributes: TP-sharded (grad-norm counts it once per TP
        # rank), and reduced over expert-DP instead of DP when EP > 1 (DDP reads `allreduce`).
        set_tensor_model_parallel_attributes(self.weight, True, partition_dim, 1)
        self.weight.allreduce = not is_expert_parallel
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(n, out_features, dtype=dtype,
                                                       device=device))
            # As Megatron: fc1's bias is TP-sharded with its rows; fc2's is replicated over TP
            # and, like a RowParallelLinear bias, marked for sequence-parallel grad reduction.
            if partition_dim == 1:
                set_tensor_model_parallel_attributes(self.bias, True, 1, 1)
            else:
                self.bias.sequence_parallel = sequence_parallel
            self.bias.allreduce = not is_expert_parallel
        else:
            self.register_parameter("bias", None)
        self._register_load_state_dict_pre_hook(self._drop_extra_states)

    @staticmethod
    def _drop_extra_states(state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(f"{prefix}_extra_state")]:
            del state_dict[key]



class TorchGroupedMLP(MegatronModule):
    """``num_local_experts`` experts of one width on grouped GEMMs (see module doc).

    Same constructor as Megatron's ``SequentialMLP`` (``submodules`` is accepted and
    unused: the linears are ours). Usable as ``MoESubmodules.experts`` of a stock
    ``MoELayer`` too (checkpoint keys then follow ``SequentialMLP``'s)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 **kwargs):  # kwargs: arguments newer Megatron versions pass (e.g. ``name``)
        super().__init__(config=config)
        if _grouped_mm is None:
            raise ImportError(f"the torch expert backend needs torch._grouped_mm (torch >= 2.8); "
                              f"this is torch {torch.__version__}. Use the local backend.")
        if getattr(config, "fp8", None) or getattr(config, "fp4", None):
            raise ValueError("the torch expert backend has no FP8/FP4 path; use the te backend "
                             "or turn off fp8/fp4.")
        if getattr(config, "use_te_activation_func", False):
            raise ValueError("use_te_activation_func needs TE experts; use the te backend.")
        if getattr(config, "moe_latent_size", None):
            raise ValueError("moe_latent_size is not supported by the torch expert backend.")
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        self.num_local_experts = num_local_experts
        etp = self.tp_group.size()
        width = config.moe_ffn_hidden_size
        if width % etp:
            raise ValueError(f"expert width {width} is not divisible by the expert tensor-parallel "
                             f"size {etp}")
        self.width_local = width // etp
        self.hidden = config.hidden_size
        self.gated = bool(config.gated_linear_unit)
        out1 = self.width_local * (2 if self.gated else 1)
        device = torch.device("cpu") if config.use_cpu_initialization else \
            torch.device("cuda", torch.cuda.current_device())
        ep_par = config.expert_model_parallel_size > 1
        kw = dict(dtype=config.params_dtype, device=device, is_expert_parallel=ep_par,
                  sequence_parallel=bool(config.sequence_parallel))
        if not grouped_mm_works(device.type, config.params_dtype):
            raise ValueError(f"torch._grouped_mm does not run for {config.params_dtype} on "
                             f"{device.type} with torch {torch.__version__} (older builds take "
                             "only bf16 on sm90 GPUs); use the local expert backend.")
        self.linear_fc1 = _GroupedLinear(num_local_experts, out1, self.hidden,
                                         config.add_bias_linear, partition_dim=1, **kw)
        self.linear_fc2 = _GroupedLinear(num_local_experts, self.hidden, self.width_local,
                                         config.add_bias_linear, partition_dim=2, **kw)
        if config.perform_initialization:
            self._init_weights(config, etp, self.tp_group.rank())
        align = stride_alignment(config.params_dtype)
        #: rows per token group on the device the experts run on (1: no token padding)
        self.token_group_align = align if device.type == "cuda" else 1
        self._hidden_pad = _round_up(self.hidden, align)
        self._width_pad = _round_up(self.width_local, align)
        if (self._hidden_pad, self._width_pad) != (self.hidden, self.width_local):
            warnings.warn(
                f"megatron-mohge torch experts: hidden {self.hidden} / width shard "
                f"{self.width_local} are not multiples of {align} elements (16 bytes in "
                f"{config.params_dtype}); the grouped GEMM operands are zero-padded to "
                f"{self._hidden_pad} / {self._width_pad} every step (a weight copy). Use "
                f"multiples of {align} for the fast path.", stacklevel=2)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_weights(self, config, etp: int, tp_rank: int) -> None:
        """Expert by expert, fc1 then fc2, with Megatron's own init helpers: the same draws
        as ``SequentialMLP`` of ``MLP(is_expert=True)`` linears (CPU and GPU init)."""
        from megatron.core.tensor_parallel.layers import (
            _initialize_affine_weight_cpu,
            _initialize_affine_weight_gpu,
        )

        width = config.moe_ffn_hidden_size
        out1_full = width * (2 if self.gated else 1)
        stride1 = 2 if self.gated else 1
        for k in range(self.num_local_experts):
            w1 = self.linear_fc1.weight.data[k]
            w2 = self.linear_fc2.weight.data[k]
            if config.use_cpu_initialization:
                _initialize_affine_weight_cpu(
                    w1, out1_full, self.hidden, w1.shape[0], 0, config.init_method,
                    stride=stride1, params_dtype=config.params_dtype, rank=tp_rank,
                    world_size=etp, skip_set_tensor_parallel_attributes=True)
                _initialize_affine_weight_cpu(
                    w2, self.hidden, width, self.width_local, 1, config.output_layer_init_method,
                    stride=1, params_dtype=config.params_dtype, rank=tp_rank, world_size=etp,
                    skip_set_tensor_parallel_attributes=True)
            else:
                _initialize_affine_weight_gpu(w1, config.init_method, 0, stride1, is_expert=True)
                _initialize_affine_weight_gpu(w2, config.output_layer_init_method, 1, 1,
                                              is_expert=True)

    # ------------------------------------------------------------------ forward
    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        act = self.config.activation_func
        if not self.gated:
            return act(h)
        x_glu, x_linear = torch.chunk(h, 2, dim=-1)
        clamp = getattr(self.config, "activation_func_clamp_value", None)
        if clamp is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return act(x_glu) * (x_linear + getattr(self.config, "glu_linear_offset", 0.0))

    @staticmethod
    def _aligned(t: torch.Tensor) -> torch.Tensor:
        # CUDA also needs a 16-byte aligned base pointer (a token slice may start anywhere).
        return t if (not t.is_cuda or t.data_ptr() % 16 == 0) else t.clone()

    def _padded_params(self):
        """fc1/fc2 weights and biases zero-padded to 16-byte strides (the stored ones when
        already aligned). fc1 pads each SwiGLU half, so the gate/up split stays at the middle;
        padded activation columns meet zero fc2 columns and add nothing."""
        w1, b1 = self.linear_fc1.weight, self.linear_fc1.bias
        w2, b2 = self.linear_fc2.weight, self.linear_fc2.bias
        hp, wp, w = self._hidden_pad, self._width_pad, self.width_local
        if (hp, wp) == (self.hidden, w):
            return w1, b1, w2, b2
        n, halves = w1.shape[0], 2 if self.gated else 1
        w1 = F.pad(w1.view(n, halves, w, self.hidden), (0, hp - self.hidden, 0, wp - w))
        w1 = w1.reshape(n, halves * wp, hp)
        if b1 is not None:
            b1 = F.pad(b1.view(n, halves, w), (0, wp - w)).reshape(n, halves * wp)
        w2 = F.pad(w2, (0, wp - w, 0, hp - self.hidden))
        if b2 is not None:
            b2 = F.pad(b2, (0, hp - self.hidden))
        return w1, b1, w2, b2

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert,
                permuted_probs: torch.Tensor):
        """``x [T, hidden]`` sorted by local expert, ``tokens_per_expert`` ``[n]`` (tensor
        or list), ``probs [T]`` -> ``(out [T, hidden], None)``."""
        x = permuted_local_hidden_states
        counts = tokens_per_expert.tolist() if torch.is_tensor(tokens_per_expert) \
            else list(tokens_per_expert)
        if self.config.moe_apply_probs_on_input:
            x = (permuted_probs.unsqueeze(-1) * x).to(permuted_local_hidden_states.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        align = self.token_group_align
        dest = None
        if align > 1 and any(c % align for c in counts):  # zero rows, see module doc
            counts, dest = token_group_padding(counts, align)
            dest = dest.to(x.device, non_blocking=True)
            x = x.new_zeros(sum(counts), x.shape[-1]).index_copy(0, dest, x)
            permuted_probs = permuted_probs.new_zeros(sum(counts)).index_copy(
                0, dest, permuted_probs)
        offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
        offs = offs.to(x.device, non_blocking=True)
        w1, b1, w2, b2 = self._padded_params()

        x = _pad_last(x, self._hidden_pad)
        h = _grouped_mm(self._aligned(x), w1.transpose(-2, -1), offs=offs)
        if b1 is not None:
            h = h + _per_token(b1, counts)
        h = self._activation(h)
        # As MLP(per_token_scale=probs): scale in the probs' dtype, back to the input's.
        h = (h * permuted_probs.unsqueeze(-1)).to(x.dtype)
        out = _grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        if b2 is not None:  # MLP adds an expert's fc2 bias scaled by the token's prob
            out = out + (_per_token(b2, counts) * permuted_probs.unsqueeze(-1)).to(out.dtype)
        # The grouped GEMM's backward needs a dense, aligned output gradient (a `.sum()` gives
        # a stride-0 one); padded hidden columns are cut here.
        out = _ContiguousGrad.apply(out)[:, : self.hidden]
        if dest is not None:
            out = out.index_select(0, dest)
        return out, None

    def backward_dw(self):
        """Weight gradients are not deferred in this backend."""

    # ------------------------------------------------------------------ checkpoints
    def expert_sharded_state_dict(self, module_prefix: str, key_prefix: str,
                                  expert_indices: Sequence[int], num_experts: int,
                                  sharded_offsets: tuple = (), metadata: Optional[dict] = None,
                                  singleton_key_prefix=None) -> dict:
        """Checkpoint entries of the local experts as the ``local`` path writes them.

        Expert ``k`` is entry ``expert_indices[k]`` of an expert axis of size
        ``num_experts`` under ``key_prefix`` (``...experts.`` for stock layers,
        ``...group_<g>.`` for MoHGE); with ``singleton_local_shards`` it gets its own key
        prefix ``singleton_key_prefix(index)`` instead. ``module_prefix`` is this module's
        state-dict prefix. Replica ids are the linears' (PP, TP, DP); callers adjust DP.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        if singleton and singleton_key_prefix is None:
            raise ValueError("singleton_local_shards needs singleton_key_prefix")
        out = {}
        for lin_name, linear, tp_axis in (("linear_fc1", self.linear_fc1, 0),
                                          ("linear_fc2", self.linear_fc2, 1)):
            for pname in ("weight", "bias"):
                param = getattr(linear, pname)
                if param is None:
                    continue
                axis_map = {pname: tp_axis} if (pname == "weight" or tp_axis == 0) else {}
                swiglu = self.gated and lin_name == "linear_fc1"
                out[f"{module_prefix}{lin_name}.{pname}"] = self._param_factory(
                    param, f"{key_prefix}{lin_name}.{pname}", f"{lin_name}.{pname}", axis_map,
                    swiglu, expert_indices, num_experts, sharded_offsets, metadata,
                    singleton_key_prefix)
            for k, index in enumerate(expert_indices):
                if singleton:
                    key, offsets = f"{singleton_key_prefix(index)}{lin_name}._extra_state", \
                        sharded_offsets
                else:
                    key = f"{key_prefix}{lin_name}._extra_state"
                    offsets = (*sharded_offsets, (len(sharded_offsets), index, num_experts))
                replica_id = (0, self.tp_group.rank(), metadata["dp_cp_group"].rank())
                out[f"{module_prefix}{lin_name}._extra_state{k}"] = \
                    make_sharded_object_for_checkpoint(None, key, offsets, replica_id=replica_id)
        return out

    def _param_factory(self, param, key, suffix, axis_map, swiglu, expert_indices, num_experts,
                       sharded_offsets, metadata, singleton_key_prefix):
        """One factory per stacked parameter: builds each expert's ShardedTensor(s) with the
        same Megatron helpers as the local linears, merges them back into ``[n, ...]``."""
        singleton = metadata.get("singleton_local_shards", False)
        tp_group, dp_cp_group = self.tp_group, metadata["dp_cp_group"]
        pname = suffix.rsplit(".", 1)[1]

        def per_expert(factory_key, data, k, index):
            # factory_key is `key`, or `<prefix>.key` for optimizer states: keep the prefix.
            head = factory_key[: len(factory_key) - len(key)]
            if singleton:  # the index sits before the linear name: ...group_0.<i>.linear_fc1
                full, offsets = f"{head}{singleton_key_prefix(index)}{suffix}", sharded_offsets
            else:
                full = factory_key
                offsets = (*sharded_offsets, (len(sharded_offsets), index, num_experts))
            sh = make_sharded_tensors_for_checkpoint(
                {pname: data[k]}, "", axis_map, offsets, tp_group=tp_group,
                dp_cp_group=dp_cp_group)[pname]
            sh.key = full
            if swiglu:
                return apply_swiglu_sharded_factory(sh, offsets, singleton).build()
            return [sh]

        def build(factory_key, data, replica_id, flattened_range):
            if flattened_range is not None:
                # Only the distributed optimizer's 'fully_sharded_model_space' format asks for
                # flattened shards, and megatron-core (0.16, 0.19) rejects them for every
                # ShardedTensor (ShardedTensor.validate_metadata_integrity), local experts too.
                raise ValueError(
                    "distrib_optim_sharding_type='fully_sharded_model_space' cannot be saved "
                    "or loaded by megatron-core (flattened ShardedTensors are rejected); pass "
                    "metadata distrib_optim_sharding_type='fully_reshardable' (reshards across "
                    "EP/TP and expert backends, mohge-train's choice) or 'dp_reshardable'.")
            shards = []
            for k, index in enumerate(expert_indices):
                parts = per_expert(factory_key, data, k, index)
                for sh in parts:
                    sh.replica_id = replica_id
                shards.append(parts)
            return shards

        def merge(loaded):
            with torch.no_grad():
                return torch.stack([torch.cat(parts) if len(parts) > 1 else parts[0]
                                    for parts in loaded])

        template = make_sharded_tensors_for_checkpoint(
            {pname: param[0]}, "", axis_map, (), tp_group=tp_group, dp_cp_group=dp_cp_group)[pname]
        return ShardedTensorFactory(key, param, build, merge, template.replica_id)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """As ``SequentialMLP``: global expert ``ep_rank * n + k`` under ``<prefix>experts.``."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        n = self.num_local_experts
        first = self.ep_group.rank() * n
        sd = self.expert_sharded_state_dict(
            prefix, f"{prefix}experts.", list(range(first, first + n)), self.ep_group.size() * n,
            sharded_offsets, metadata, singleton_key_prefix=lambda i: f"{prefix}experts.{i}.")
        for sh in sd.values():
            sh.replica_id = (*sh.replica_id[:2], self.dp_group.rank())
        return sd
