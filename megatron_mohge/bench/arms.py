"""Layer shapes and named arms of the sized CPU presets (``study``, ``screen``; issue 22).

A **shape** is a MoHGE layer file read for its layout only -- groups, widths, Kg, K, shared
experts -- with its widths taken relative to a reference stock width; at hidden size ``h`` the
stock width is ``h`` (the paper's stock width 1024 equals its hidden 1024; tiny_mohge.yaml's
64 equals the tiny backbone's) and every width is scaled by ``h / reference``. Routing and
losses are always tiny_mohge.yaml's, the defaults the router screen chose for 300-1,500-step
CPU runs (the paper file's a_G = 1e-5 and bias rate 1e-3 are sized for ~1T tokens and would do
nothing here), so the two shapes differ in layout alone:

* ``tiny``: tiny_mohge.yaml, 4 groups x 4 experts of widths 28..76 / 64, Kg=2, K=2, no
  shared experts, vs 16 stock experts, top-2 (the study and screen as they always were);
* ``paper``: paper_3b_layer.yaml, 8 groups x 8 experts of widths 384..1280 / 1024, Kg=4,
  K=6, 2 shared experts of 1024 / 1024, vs 64 stock experts, top-6, the same shared experts.

Both have a mean routed width of 0.8125 x the stock width. The **arms** (:data:`ARMS`) read
the same in every preset and shape: ``moe`` the stock baseline, ``mohge`` the shipped
defaults, and three controls that split "MoHGE vs stock" into its parts (``arms``).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.resources import config_path

DEFAULT_SHAPE = "tiny"
# moe: stock; moe_equal_total: uniform width with MoHGE's routed params; moe_equal_activated:
# uniform width with MoHGE's measured activated routed params per token; mohge: the shipped
# defaults; mohge_uniform: the two-level router over near-equal widths at MoHGE's params.
ARMS = ("moe", "moe_equal_total", "moe_equal_activated", "mohge", "mohge_uniform")
CONTROL_ARMS = ("moe_equal_total", "moe_equal_activated", "mohge_uniform")

# MoHGE's activated routed width per pick / the stock width, as trained, per shape: the mean,
# over the committed runs named in Shape.activated_fraction_sources, of MoHGE's (arm "mohge",
# the shipped defaults) activated routed params per token / stock's of the same size and seed
# mean (measured_activated_fraction recomputes it; tests/test_bench_arms.py checks the stored
# figure). MoHGE's own figure is known only after training, so moe_equal_activated uses this
# stored measurement (a reproducible rule) rather than each bench's own (unknown before it
# runs); changing it changes the run dicts, so check_out_dir keeps old results apart.
TINY_ACTIVATED_SOURCES = tuple(f"results/screen-{c}/results.json"
                               for c in ("stdlib", "pydocs", "shakespeare"))

# Megatron's aux loss on the stock arms (all CPU presets)
STOCK_AUX_LOSS = 1e-2
# MoHGEConfig fields that make the layout of a layer (the rest is routing and losses)
LAYOUT_FIELDS = ("widths", "experts_per_group", "group_topk", "topk", "num_shared_experts",
                 "shared_expert_width")


@lru_cache(maxsize=None)
def _layer_dict(file: str) -> dict:
    return MoHGEConfig.from_yaml(config_path(file)).to_dict()


def routing_defaults() -> dict:
    """tiny_mohge.yaml as a mapping: the routing and losses of every shape's ``mohge``."""
    return copy.deepcopy(_layer_dict("tiny_mohge.yaml"))


@dataclass(frozen=True)
class Shape:
    name: str
    layer_file: str  # MoHGE layer file giving the layout (LAYOUT_FIELDS)
    reference_width: int  # the stock expert width that file's widths are relative to
    activated_fraction: float  # MoHGE's measured activated routed width / stock's (above)
    activated_fraction_sources: tuple  # the committed results.json files it is the mean of

    @property
    def layout(self) -> dict:
        d = _layer_dict(self.layer_file)
        return {k: copy.deepcopy(d[k]) for k in LAYOUT_FIELDS}

    def _ratio(self, width: int) -> Fraction:
        return Fraction(width, self.reference_width)

    @property
    def width_ratios(self) -> list[Fraction]:
        """Group widths / stock width (the released 384..1280 / 1024 for the paper)."""
        return [self._ratio(w) for w in self.layout["widths"]]

    @property
    def mean_width_ratio(self) -> Fraction:
        """MoHGE's mean routed width / the stock width (13/16 = 0.8125 in both shapes)."""
        lay = self.layout
        return sum((self._ratio(w) * n for w, n in zip(lay["widths"], lay["experts_per_group"])),
                   Fraction(0)) / sum(lay["experts_per_group"])

    @property
    def size_multiple(self) -> int:
        """Hidden sizes must be multiples of this for every width (group, shared, the equal-
        total stock width) to be an exact integer, so the 0.8125 ratio holds without rounding
        (16 in both shapes: tiny's widths are h x 7..19/16, the paper's h x 3..10/8)."""
        ratios = self.width_ratios + [self.mean_width_ratio]
        if self.layout["num_shared_experts"]:
            ratios.append(self._ratio(self.layout["shared_expert_width"]))
        return math.lcm(*(r.denominator for r in ratios))

    def check_hidden(self, hidden: int) -> None:
        m = self.size_multiple
        if hidden % m:
            raise ConfigError(f"study sizes: hidden {hidden} must be a multiple of {m} (shape "
                              f"{self.name}: the widths are exact fractions of it)")

    def _scaled(self, ratio: Fraction, hidden: int) -> int:
        w = ratio * hidden
        assert w.denominator == 1, (ratio, hidden)  # check_hidden ran
        return int(w)

    def mohge(self, hidden: int) -> dict:
        """The ``mohge`` arm's layer: this shape's layout at ``hidden`` with the shipped
        routing defaults (tiny_mohge.yaml)."""
        self.check_hidden(hidden)
        cfg = routing_defaults()
        cfg.update(self.layout)
        cfg["widths"] = [self._scaled(r, hidden) for r in self.width_ratios]
        if cfg["num_shared_experts"]:
            cfg["shared_expert_width"] = self._scaled(self._ratio(cfg["shared_expert_width"]),
                                                      hidden)
        return cfg

    def equal_activated_width(self, hidden: int) -> int:
        """Stock width whose K picks activate MoHGE's measured routed width per token
        (``activated_fraction`` x ``hidden``, to the nearest integer: the activated routed
        params are then within K/2 widths of the rule)."""
        return max(1, round(self.activated_fraction * hidden))

    def stock(self, hidden: int, width=None, aux: float = STOCK_AUX_LOSS) -> dict:
        """The stock baseline: as many experts as MoHGE, of ``width`` (default: hidden), the
        same K and shared experts. Spelled as the presets always spelled it (kind "moe")."""
        self.check_hidden(hidden)
        lay = self.layout
        d = dict(kind="moe", num_experts=sum(lay["experts_per_group"]),
                 expert_hidden_size=width or hidden, topk=lay["topk"], aux_loss_coeff=aux)
        if lay["num_shared_experts"]:
            d.update(num_shared_experts=lay["num_shared_experts"],
                     shared_expert_width=self.mohge(hidden)["shared_expert_width"])
        return d

    def arms(self, hidden: int) -> dict[str, dict]:
        """The ``moe`` section of every arm of :data:`ARMS` at ``hidden``."""
        mohge = self.mohge(hidden)
        uniform = copy.deepcopy(mohge)
        uniform["widths"] = near_equal_widths(self._scaled(self.mean_width_ratio, hidden),
                                              uniform["experts_per_group"])
        return {
            "moe": self.stock(hidden),
            # E experts of MoHGE's mean width: E x mean = MoHGE's routed width sum, exactly
            "moe_equal_total": self.stock(hidden, self._scaled(self.mean_width_ratio, hidden)),
            # K picks of the measured activated fraction x stock width (nearest integer)
            "moe_equal_activated": self.stock(hidden, self.equal_activated_width(hidden)),
            "mohge": dict(kind="mohge", mohge=mohge),
            "mohge_uniform": dict(kind="mohge", mohge=uniform),
        }


def measured_activated_fraction(results_files) -> float:
    """Mean over every (``mohge[_h<size>]``, ``moe[_h<size>]``) pair of the runs in
    ``results_files`` of MoHGE's activated routed params per token / stock's (seed means)."""
    ratios = []
    for path in results_files:
        runs = json.loads(Path(path).read_text())["runs"]
        for name, run in runs.items():
            if name == "mohge" or re.fullmatch(r"mohge_h\d+", name):
                stock = runs.get("moe" + name[len("mohge"):])
                if stock:
                    ratios.append(run["activated_routed_params_per_token"]
                                  / stock["activated_routed_params_per_token"])
    if not ratios:
        raise ConfigError(f"no (mohge, moe) run pairs in {', '.join(map(str, results_files))}")
    return sum(ratios) / len(ratios)


def near_equal_widths(mean: int, experts_per_group: list[int]) -> list[int]:
    """Strictly increasing integer widths, as equal as MoHGEConfig allows, with mean ``mean``.

    MoHGEConfig requires strictly increasing group widths (equal widths would be one group),
    so the groups get ``mean`` + offsets 1 apart, symmetric about 0 so the mean (hence the
    routed params) is MoHGE's exactly: -2,-1,+1,+2 for 4 groups (0 skipped: with an even
    count a centred step of 1 would need half-integers), -4..-1,+1..+4 for 8. The spread is
    G/mean (tiny h48: 37..41, +-5%; paper h48: 35..43, +-10%), where MoHGE's span 0.54..1.46
    (tiny) and 0.46..1.54 (paper) x the mean."""
    counts = list(experts_per_group)
    if len(set(counts)) != 1:
        raise ConfigError(f"mohge_uniform: needs equal group sizes to keep the mean width, got "
                          f"experts_per_group {counts}")
    g = len(counts)
    half = g // 2
    offsets = ([*range(-half, 0), *range(1, half + 1)] if g % 2 == 0
               else list(range(-half, half + 1)))
    if mean + offsets[0] < 1:
        raise ConfigError(f"mohge_uniform: mean width {mean} is too small for {g} distinct "
                          "widths; use a larger hidden size")
    return [mean + o for o in offsets]


SHAPE_TABLE = {
    # tiny: the three screens at hidden 48 (0.767, 0.779, 0.782 on stdlib, docs, Shakespeare)
    "tiny": Shape("tiny", "tiny_mohge.yaml", 64, 0.776, TINY_ACTIVATED_SOURCES),
    # 1024: the paper's stock expert width (and hidden), which its widths are relative to
    # (MoHGE-3B's 64 stock experts of width 1024, the paper-3b preset)
    # paper: its stdlib study at hidden 32, 48, 80 (0.763, 0.770, 0.776)
    "paper": Shape("paper", "paper_3b_layer.yaml", 1024, 0.77,
                   ("results/decision-paper-stdlib/results.json",))}
SHAPES = tuple(SHAPE_TABLE)


def get_shape(name=None) -> Shape:
    name = DEFAULT_SHAPE if name is None else name
    if name not in SHAPE_TABLE:
        raise ConfigError(f"--shape: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    return SHAPE_TABLE[name]
