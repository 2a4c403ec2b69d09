"""The MoHGE layer config: typed dataclasses, validated once at the edge.

``MoHGEConfig`` describes the routed experts of one MoHGE layer (groups, widths, routing,
losses, allocation). ``apply_to(transformer_config)`` returns a Megatron
``TransformerConfig`` consistent with it and checks everything that depends on both
(expert-TP, EP, FP8). All errors are ``ConfigError`` and name the offending field.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megatron_mohge.config.allocation import plan_allocation
from megatron_mohge.config.errors import ConfigError
from megatron_mohge.config.errors import expect_bool, expect_choice, expect_int, expect_number
from megatron_mohge.config.io import (YamlDataclass, build_dataclass, load_yaml,
                                      nested_dataclasses, read_yaml_file)
from megatron_mohge.config.megatron import _reject_uniform_only, apply_moe_fields
from megatron_mohge.sizes import ffn_params, group_offsets

ROUTER_TYPES = ("mohge", "noisy_topk", "hierarchical_noisy_topk")
GROUP_SCORES = ("sigmoid", "softmax")
EXPERT_WEIGHTINGS = ("renorm", "paper", "unnormalized")
GROUP_GRADIENTS = ("none", "straight_through")
GROUP_LOSS_COUNTS = ("selections", "assignments")
INTRA_GROUP_MODES = ("paper", "per_group", "per_group_used")
RELEASED_INTRA_GROUP_COEFF = 5e-3  # a_E of the released MoHGE-3B runs (paper mode)
# Router and losses of the released MoHGE-3B runs (the authors' code; MOHGE.md 2-3): the
# paper weighting, the group loss counting selections from half of training, the one
# Switch-style intra-group loss, and none of this package's mechanisms.
RELEASED_ROUTING = dict(
    router=dict(group_score="sigmoid", expert_weighting="paper", group_gradient="none"),
    losses=dict(group_coeff=1e-5, group_cost_delta=1024, group_start_fraction=0.5,
                group_loss_count="selections", group_balance_coeff=0.0,
                intra_group_coeff=RELEASED_INTRA_GROUP_COEFF, intra_group_mode="paper",
                expert_bias_update_rate=0.0))
EXPERT_BACKENDS = ("auto", "local", "torch", "te")


# Options of the two-level router only: (section, field, value that switches it off).
MOHGE_ONLY_OPTIONS = (("router", "group_gradient", "none"),
                      ("losses", "group_balance_coeff", 0.0),
                      ("losses", "expert_bias_update_rate", 0.0))


@dataclass
class RouterConfig:
    """Two-level router options (the math: ``routing.functional.two_level_route``)."""

    type: str = "mohge"  # mohge (two-level) | noisy_topk | hierarchical_noisy_topk (Shazeer 2017)
    group_score: str = "sigmoid"  # group gate score s = sigmoid(u) as released; or softmax(u)
    expert_weighting: str = "renorm"  # renorm: q/sum(q) over chosen [ours]; paper: softmax(q_chosen)
    #                                   unnormalized: q_chosen itself (group factor kept)
    # LM gradient to the group gate when all K picks share a group (renorm cancels s_g there):
    # straight_through (weights x exp(log s_g - stop_grad(log s_g)): same values) | none
    group_gradient: str = "straight_through"
    fp32: bool = True  # router math in fp32 (Megatron's moe_router_dtype='fp32')
    z_loss_coeff: Optional[float] = None  # ST-MoE z-loss on both gates; None disables
    input_jitter_eps: Optional[float] = None  # Switch input jitter, training only; None disables


@dataclass
class LossConfig:
    """Auxiliary losses (the formulas: each loss's docstring in ``routing.losses``)."""

    group_coeff: float = 1e-5  # a_G of the cost-weighted group-wise loss (released: 1e-5)
    group_cost_delta: Optional[float] = None  # Delta in c_g = 1 + (W_g - W_1)/Delta; None = mean width
    group_start_fraction: float = 0.5  # group loss is off before this fraction of training
    # f_g of the group loss: selections (tokens that picked g among their Kg groups, released)
    # | assignments (token-expert assignments to g's experts: what the group computes)
    group_loss_count: str = "assignments"
    # [ours] group balance on use from step 0, 1 at balance (routing.losses.group_balance_loss);
    # separate from the cost steering above, which keeps its own coefficient and schedule
    group_balance_coeff: float = 1e-2
    # a_E of the intra-group experts loss; 0 by default: the loss-free bias below balances
    # inside groups without a gradient, where the loss (per_group at 0.5, the former tiny
    # default) flattened the expert gate (in-group max prob ~0.26 for 4 experts). The released
    # setting is paper mode at 5e-3 (RELEASED_INTRA_GROUP_COEFF), which sums sparse
    # renormalised weights and sends almost no gradient towards an idle expert
    # (scripts/probe_intra_group_grad.py).
    intra_group_coeff: float = 0.0
    # per_group [ours]: inside each group over the tokens that selected it | per_group_used:
    # over the tokens with a pick in it | paper: one Switch loss over all experts, count N*Kg
    intra_group_mode: str = "per_group"
    # Loss-free balancing inside each group [ours, after arXiv 2408.15664]: a per-expert bias
    # on the in-group expert logits, used for top-K selection only, moved by
    # b_e += rate * sign(mean load of e's group - load_e) once per optimizer step from the
    # global batch's counts. 0 disables it (no bias buffer, checkpoints as before). 1e-3 as the
    # paper's large runs; a run of a few thousand steps needs more (tiny_mohge.yaml: 1e-2).
    expert_bias_update_rate: float = 1e-3
    # Load fractions f of both aux losses from the global batch (all-reduced over the
    # data-parallel group, averaged over the step's micro-batches so far) instead of the
    # micro-batch, as Megatron's global_aux_loss (arXiv 2501.11873).
    global_batch_stats: bool = False


@dataclass
class AllocationConfig:
    """All-size Group-decoupling Allocation (the algorithm: the ``allocation`` module docstring)."""

    max_imbalance: float = 1.05  # refuse plans whose per-rank width sums exceed mean by more
    allow_imbalance: bool = False  # accept a plan above max_imbalance (it is still reported)


@dataclass
class NoisyGatingConfig:
    """Sparsely-gated MoE router (Shazeer et al. 2017), used when router.type is noisy_*."""

    noise: bool = True  # add N(0,1) * softplus(x W_noise) to the logits while training
    noise_epsilon: float = 1e-2  # > 0, added to softplus(x W_noise) so the noise never vanishes
    importance_coeff: float = 0.1  # w_imp: coefficient of CV(importance)^2
    load_coeff: float = 0.1  # w_load: coefficient of CV(load)^2 (smooth load estimator)

    def validate(self, where: str = "NoisyGatingConfig") -> None:
        """Raise ConfigError naming ``{where}.<field>`` for a bad value."""
        expect_bool(f"{where}.noise", self.noise)
        expect_number(f"{where}.noise_epsilon", self.noise_epsilon, 0.0)
        if self.noise_epsilon <= 0:
            # softplus(x W_noise) underflows to 0 for large inputs: a zero noise std divides
            # the smooth load estimator by zero (NaN gradients).
            raise ConfigError(f"{where}.noise_epsilon: must be > 0 (the noise std floor; the "
                              f"paper uses 1e-2), got {self.noise_epsilon}.")
        expect_number(f"{where}.importance_coeff", self.importance_coeff, 0.0)
        expect_number(f"{where}.load_coeff", self.load_coeff, 0.0)


@dataclass
class MoHGEConfig(YamlDataclass):
    """Routed experts of a MoHGE layer.

    Example (the paper's MoHGE-3B layer): ``MoHGEConfig(widths=[384, 512, ..., 1280],
    experts_per_group=8, group_topk=4, topk=6, num_shared_experts=2, shared_expert_width=1024)``.
    """

    widths: list[int]  # FFN width W_g of each group, strictly increasing
    experts_per_group: Union[int, list[int]]  # N_g per group (an int means the same for all)
    group_topk: int  # Kg: groups per token; with 1 the group gate learns only from the group loss
    topk: int  # K: experts activated per token (exactly K; Megatron's moe_router_topk)
    num_shared_experts: int = 0  # shared experts (always active), as Megatron's shared expert
    shared_expert_width: Optional[int] = None  # width of each shared expert (required if any)
    router: RouterConfig = field(default_factory=RouterConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    noisy_gating: NoisyGatingConfig = field(default_factory=NoisyGatingConfig)
    # Expert GEMMs: local (Megatron SequentialMLP) | torch (torch._grouped_mm per width) | te
    # (TE grouped GEMM) | auto (te when TE is usable, else torch on CUDA, else the faster of
    # local/torch on CPU: megatron_mohge.experts.selection). Checkpoints are the same for all.
    expert_backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.experts_per_group, int) and not isinstance(self.experts_per_group, bool):
            _check_int("experts_per_group", self.experts_per_group, 1)
            if isinstance(self.widths, (list, tuple)):
                self.experts_per_group = [self.experts_per_group] * len(self.widths)
        for name, (cls, _) in nested_dataclasses(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, dict):  # MoHGEConfig(router={...}) built in code
                setattr(self, name, build_dataclass(cls, value, name))
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_groups(self) -> int:
        return len(self.widths)

    @property
    def num_experts(self) -> int:
        return sum(self.experts_per_group)

    @property
    def group_offsets(self) -> list[int]:
        """Canonical id of the first expert of each group (experts are numbered group-major)."""
        return group_offsets(self.experts_per_group)

    @property
    def expert_widths(self) -> list[int]:
        """Width of every expert in canonical (group-major) order."""
        return [w for w, n in zip(self.widths, self.experts_per_group) for _ in range(n)]

    @property
    def expert_group(self) -> list[int]:
        """Group of every expert in canonical order."""
        return [g for g, n in enumerate(self.experts_per_group) for _ in range(n)]

    @property
    def cost_delta(self) -> float:
        d = self.losses.group_cost_delta
        return float(d) if d is not None else sum(self.expert_widths) / self.num_experts

    @property
    def group_costs(self) -> list[float]:
        """c_g = 1 + (W_g - W_1) / Delta: relative cost of routing a token to group g."""
        return [1.0 + (w - self.widths[0]) / self.cost_delta for w in self.widths]

    def routed_params_per_expert(self, hidden_size: int, gated: bool = True,
                                 bias: bool = False) -> list[int]:
        """Parameters of each routed expert (fc1 [+ gate] and fc2, + biases with ``bias``:
        Megatron's ``add_bias_linear``), canonical order."""
        return [ffn_params(hidden_size, w, gated, bias) for w in self.expert_widths]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check internal consistency; every error names the field and the fix."""
        if not isinstance(self.widths, (list, tuple)) or not self.widths:
            raise ConfigError("MoHGEConfig.widths: expected a non-empty list of group FFN widths, "
                              f"got {self.widths!r}")
        self.widths = list(self.widths)
        for i, w in enumerate(self.widths):
            _check_int(f"widths[{i}]", w, 1)
        for i in range(1, len(self.widths)):
            if self.widths[i] <= self.widths[i - 1]:
                raise ConfigError(
                    f"MoHGEConfig.widths: widths must strictly increase from group to group, but "
                    f"widths[{i}]={self.widths[i]} <= widths[{i - 1}]={self.widths[i - 1]}. "
                    "Sort the groups by width (cheapest first) and merge equal widths into one "
                    "group (raise its experts_per_group instead).")
        if not isinstance(self.experts_per_group, (list, tuple)):
            raise ConfigError("MoHGEConfig.experts_per_group: expected an int or a list with one "
                              f"count per group, got {self.experts_per_group!r}")
        self.experts_per_group = list(self.experts_per_group)
        if len(self.experts_per_group) != len(self.widths):
            raise ConfigError(
                f"MoHGEConfig.experts_per_group: has {len(self.experts_per_group)} entries but "
                f"widths has {len(self.widths)} groups; give one count per group or a single int.")
        for i, n in enumerate(self.experts_per_group):
            _check_int(f"experts_per_group[{i}]", n, 1)
        _check_int("group_topk", self.group_topk, 1)
        _check_int("topk", self.topk, 1)
        ng, e = self.num_groups, self.num_experts
        if self.group_topk > ng:
            raise ConfigError(f"MoHGEConfig.group_topk: Kg={self.group_topk} exceeds the number of "
                              f"groups Ng={ng}; set group_topk <= {ng}.")
        if self.topk > e:
            raise ConfigError(f"MoHGEConfig.topk: K={self.topk} exceeds the number of experts "
                              f"E={e}; set topk <= {e}.")
        reachable = sum(sorted(self.experts_per_group)[: self.group_topk])
        if self.router.type == "mohge" and self.topk > reachable:
            raise ConfigError(
                f"MoHGEConfig.topk: K={self.topk} experts cannot always be found inside the "
                f"Kg={self.group_topk} selected groups (the smallest {self.group_topk} groups hold "
                f"only {reachable}); lower topk or raise group_topk.")
        if (self.router.type == "mohge" and self.group_topk == 1
                and self.router.group_gradient == "none"):
            warnings.warn(
                "MoHGEConfig.group_topk=1: the group gate gets no gradient from the LM loss (q is "
                "normalised inside the one selected group, so s_g cancels); it is trained only by "
                "the group losses (losses.group_coeff, losses.group_balance_coeff) and the z-loss. "
                "Set router.group_gradient: straight_through for a group choice learned from the "
                "task.",
                stacklevel=3)
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.num_shared_experts > 0:
            if self.shared_expert_width is None:
                raise ConfigError("MoHGEConfig.shared_expert_width: required when "
                                  "num_shared_experts > 0 (the FFN width of each shared expert).")
            _check_int("shared_expert_width", self.shared_expert_width, 1)
        _check_choice("expert_backend", self.expert_backend, EXPERT_BACKENDS)
        self._validate_router()
        self._validate_losses()
        self._validate_allocation()

    def _validate_router(self) -> None:
        r = self.router
        _check_choice("router.type", r.type, ROUTER_TYPES)
        _check_choice("router.group_score", r.group_score, GROUP_SCORES)
        _check_choice("router.expert_weighting", r.expert_weighting, EXPERT_WEIGHTINGS)
        _check_choice("router.group_gradient", r.group_gradient, GROUP_GRADIENTS)
        _check_bool("router.fp32", r.fp32)
        for name in ("z_loss_coeff", "input_jitter_eps"):
            v = getattr(r, name)
            if v is not None:
                _check_number(f"router.{name}", v, 0.0)
        if r.input_jitter_eps is not None and not r.input_jitter_eps < 1.0:
            raise ConfigError("MoHGEConfig.router.input_jitter_eps: must be < 1 (inputs are scaled "
                              f"by U(1-eps, 1+eps)), got {r.input_jitter_eps}.")
        if r.type == "hierarchical_noisy_topk":
            if self.topk % self.group_topk:
                raise ConfigError(
                    f"MoHGEConfig.topk: the hierarchical noisy router picks topk/group_topk experts "
                    f"in each of the group_topk groups, so topk={self.topk} must be a multiple of "
                    f"group_topk={self.group_topk}.")
            per_group = self.topk // self.group_topk
            if per_group > min(self.experts_per_group):
                raise ConfigError(
                    f"MoHGEConfig.topk: the hierarchical noisy router picks {per_group} experts per "
                    f"group but the smallest group has {min(self.experts_per_group)}; lower topk or "
                    "raise experts_per_group.")
        self.noisy_gating.validate("MoHGEConfig.noisy_gating")

    def _validate_losses(self) -> None:
        lo = self.losses
        _check_number("losses.group_coeff", lo.group_coeff, 0.0)
        _check_number("losses.intra_group_coeff", lo.intra_group_coeff, 0.0)
        _check_number("losses.group_start_fraction", lo.group_start_fraction, 0.0)
        if lo.group_start_fraction > 1.0:
            raise ConfigError("MoHGEConfig.losses.group_start_fraction: a fraction of training in "
                              f"[0, 1], got {lo.group_start_fraction}.")
        if lo.group_cost_delta is not None:
            _check_number("losses.group_cost_delta", lo.group_cost_delta, 0.0)
            if lo.group_cost_delta <= 0:
                raise ConfigError("MoHGEConfig.losses.group_cost_delta: must be > 0 (a width scale, "
                                  "e.g. 1024), or null for the mean expert width.")
        _check_choice("losses.intra_group_mode", lo.intra_group_mode, INTRA_GROUP_MODES)
        _check_choice("losses.group_loss_count", lo.group_loss_count, GROUP_LOSS_COUNTS)
        _check_number("losses.group_balance_coeff", lo.group_balance_coeff, 0.0)
        _check_number("losses.expert_bias_update_rate", lo.expert_bias_update_rate, 0.0)
        _check_bool("losses.global_batch_stats", lo.global_batch_stats)
        if self.router.type != "mohge":
            self._mohge_only_options_off()

    def _mohge_only_options_off(self) -> None:
        """Noisy routers have their own losses: the two-level router's options are switched
        off where they hold their (MoHGE) defaults, and refused where set to anything else."""
        for section, name, off in MOHGE_ONLY_OPTIONS:
            obj = getattr(self, section)
            value = getattr(obj, name)
            default = {f.name: f.default for f in fields(type(obj))}[name]
            if value == default:
                setattr(obj, name, off)
            elif value != off:
                raise ConfigError(
                    f"MoHGEConfig.{section}.{name}: implemented for router.type 'mohge' only, not "
                    f"{self.router.type!r}; set it to {off!r} (or leave it out).")

    def _validate_allocation(self) -> None:
        a = self.allocation
        _check_number("allocation.max_imbalance", a.max_imbalance, 1.0)
        _check_bool("allocation.allow_imbalance", a.allow_imbalance)

    # ------------------------------------------------------------------ Megatron
    def check_parallel_layout(self, ep_size: int, expert_tp_size: int = 1, fp8: bool = False,
                              fp8_align: int = 16) -> None:
        """Check the expert layout against the parallel sizes (raises ConfigError)."""
        for g, w in enumerate(self.widths):
            if w % expert_tp_size:
                raise ConfigError(
                    f"MoHGEConfig.widths[{g}]={w} is not divisible by the expert tensor-parallel "
                    f"size {expert_tp_size}; use widths that are multiples of {expert_tp_size} or a "
                    "smaller expert_tensor_parallel_size.")
            if fp8 and (w // expert_tp_size) % fp8_align:
                raise ConfigError(
                    f"MoHGEConfig.widths[{g}]={w}: with FP8 each expert-TP shard of a width must be "
                    f"a multiple of {fp8_align} (FP8 GEMM alignment); got {w // expert_tp_size}. "
                    f"Round the width to a multiple of {fp8_align * expert_tp_size}.")
        self.allocation_plan(ep_size)

    def allocation_plan(self, ep_size: int):
        """The expert-to-slot layout over ``ep_size`` EP ranks, honouring ``allocation``."""
        return plan_allocation(self.widths, self.experts_per_group, ep_size,
                               max_imbalance=self.allocation.max_imbalance,
                               allow_imbalance=self.allocation.allow_imbalance)

    def apply_to(self, transformer_config):
        """Return a copy of ``transformer_config`` with the MoE fields MoHGE needs.

        The fields are :func:`megatron_mohge.config.megatron.moe_transformer_fields` (``E``,
        ``K``, the widest group as ``moe_ffn_hidden_size``, shared-expert size, router dtype,
        z-loss, jitter; Megatron's own load-balancing loss off); options MoHGE cannot honour
        are refused and the parallel layout ``transformer_config`` implies is checked.
        """
        return apply_moe_fields(self, transformer_config)

    def check_transformer_config(self, tc) -> None:
        """Raise if ``tc`` disagrees with this config (e.g. ``apply_to`` was not used)."""
        _reject_uniform_only(tc)
        for name, want in (("num_moe_experts", self.num_experts), ("moe_router_topk", self.topk)):
            have = getattr(tc, name, None)
            if have != want:
                raise ConfigError(
                    f"TransformerConfig.{name}={have} but the MoHGE config implies {want}; build "
                    "the TransformerConfig with MoHGEConfig.apply_to(config).")
        lb = getattr(tc, "moe_router_load_balancing_type", "none")
        if lb not in ("none", ["none"]) and getattr(tc, "moe_aux_loss_coeff", 0):
            raise ConfigError(
                f"TransformerConfig.moe_router_load_balancing_type={lb!r} with a non-zero "
                "moe_aux_loss_coeff: MoHGE routers attach their own losses; use apply_to(config).")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoHGEConfig":
        return build_dataclass(cls, data)

    @staticmethod
    def normalize_mapping(data: dict[str, Any]) -> Any:
        """A layer file may wrap its keys in one top-level ``mohge:`` section
        (``build_dataclass`` calls this on the raw mapping)."""
        return data["mohge"] if "mohge" in data and len(data) == 1 else data

    @classmethod
    def from_yaml(cls, path_or_text: Union[str, Path]) -> "MoHGEConfig":
        """Load from a YAML file path or a YAML string."""
        text = str(path_or_text)
        p = Path(text) if "\n" not in text and len(text) < 4096 else None
        if p is not None and p.suffix in (".yaml", ".yml") and not p.exists():
            raise ConfigError(f"MoHGEConfig.from_yaml: file not found: {p}")
        if p is not None and p.exists():
            data = read_yaml_file(p, "MoHGE config")
        else:
            try:
                data = load_yaml(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"MoHGEConfig.from_yaml: invalid YAML: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def paper_3b(cls, released: bool = False, **overrides) -> "MoHGEConfig":
        """The paper's MoHGE-3B layer (8 groups x 8 experts, widths 384..1280, Kg=4, K=6, 2
        shared experts of 1024): the shipped ``configs/paper_3b_layer.yaml`` (this package's
        routing defaults), or with ``released`` the released router and losses
        (:data:`RELEASED_ROUTING`). ``overrides``: top-level fields."""
        from megatron_mohge.resources import config_path

        data = read_yaml_file(config_path("paper_3b_layer.yaml"), "MoHGE config")
        if released:
            for section, values in RELEASED_ROUTING.items():
                data.setdefault(section, {}).update(values)
        data.update(overrides)
        return cls.from_dict(data)


def _check_int(name: str, value: Any, minimum: int) -> None:
    expect_int(f"MoHGEConfig.{name}", value, minimum)


def _check_number(name: str, value: Any, minimum: float) -> None:
    expect_number(f"MoHGEConfig.{name}", value, minimum)


def _check_bool(name: str, value: Any) -> None:
    expect_bool(f"MoHGEConfig.{name}", value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    expect_choice(f"MoHGEConfig.{name}", value, choices)


