"""Configuration of an exported MoHGE model (Mixture of Heterogeneous Grouped Experts).

Shipped inside every ``mohge-export-hf`` folder and loaded with ``trust_remote_code=True``;
imports only ``transformers``. Routed experts come in width groups (every expert of group
``g`` is ``expert_group_widths[g]`` wide); a two-level router picks ``router["group_topk"]``
groups and exactly ``router["topk"]`` experts inside them.

Every router option the modeling code implements is listed in :data:`ROUTER_OPTIONS`; a
``config.json`` with any other router key or value is refused on load (one line naming the
field), so a model exported by a newer megatron-mohge never silently computes something
else here.
"""

from transformers import PretrainedConfig

FORMAT_VERSION = 1

#: router key -> allowed values (None: any value of the right kind, checked in the model)
ROUTER_OPTIONS = {
    # sigmoid / softmax of the group logits u (two_level_route step 1)
    "group_score": ("sigmoid", "softmax"),
    # renorm: q_chosen / sum(q_chosen); paper: softmax(q_chosen) (q_chosen itself at K=1);
    # softmax_topk: Megatron's stock TopKRouter, softmax over the chosen expert logits
    "expert_weighting": ("renorm", "paper", "softmax_topk"),
    "group_topk": None,  # Kg groups per token
    "topk": None,  # K experts per token, all inside the Kg groups
    "group_gate": (True, False),  # a group gate W_G exists (False: one group, stock MoE)
    "gate_bias": (True, False),  # the expert gate has a bias (Megatron's add_bias_linear)
    "selection_bias": (True, False),  # loss-free balancing bias, used for selection only
}

NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
ACTIVATIONS = ("silu", "gelu")
MLP_LAYER_TYPES = ("moe", "dense")


def _refuse(field, value, choices):
    raise ValueError(f"MohgeConfig.{field}={value!r} is not implemented by this modeling code "
                     f"(known: {list(choices)}); export the model with the megatron-mohge "
                     "version that trained it, or update configuration_mohge.py / "
                     "modeling_mohge.py")


class MohgeConfig(PretrainedConfig):
    model_type = "mohge"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None,
                 intermediate_size=256, hidden_act="silu", gated_mlp=True,
                 add_bias_linear=False, normalization="RMSNorm", norm_eps=1e-5,
                 position_embedding_type="rope", rope_theta=10000.0,
                 max_position_embeddings=2048, tie_word_embeddings=True, mlp_layer_types=None,
                 expert_group_widths=None, experts_per_group=None, num_shared_experts=0,
                 shared_expert_intermediate_size=None, router=None,
                 mohge_format_version=FORMAT_VERSION, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.add_bias_linear = add_bias_linear
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.mlp_layer_types = list(mlp_layer_types or ["dense"] * num_hidden_layers)
        self.expert_group_widths = list(expert_group_widths or [])
        self.experts_per_group = list(experts_per_group or [])
        self.num_shared_experts = num_shared_experts
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router = dict(router or {})
        self.mohge_format_version = mohge_format_version
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def _check(self):
        if self.mohge_format_version != FORMAT_VERSION:
            _refuse("mohge_format_version", self.mohge_format_version, (FORMAT_VERSION,))
        for field, choices in (("normalization", NORMALIZATIONS), ("hidden_act", ACTIVATIONS),
                               ("position_embedding_type", POSITION_EMBEDDINGS)):
            if getattr(self, field) not in choices:
                _refuse(field, getattr(self, field), choices)
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ValueError(f"MohgeConfig.mlp_layer_types: {len(self.mlp_layer_types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        for t in self.mlp_layer_types:
            if t not in MLP_LAYER_TYPES:
                _refuse("mlp_layer_types", t, MLP_LAYER_TYPES)
        if "moe" not in self.mlp_layer_types:
            return
        for key, value in self.router.items():
            if key not in ROUTER_OPTIONS:
                _refuse(f"router.{key}", value, ROUTER_OPTIONS)
            choices = ROUTER_OPTIONS[key]
            if choices is not None and value not in choices:
                _refuse(f"router.{key}", value, choices)
        missing = [k for k in ROUTER_OPTIONS if k not in self.router]
        if missing:
            raise ValueError(f"MohgeConfig.router: missing {missing}")
        if len(self.expert_group_widths) != len(self.experts_per_group):
            raise ValueError("MohgeConfig.experts_per_group: one count per expert_group_widths "
                             "entry")
        if not self.router["group_gate"] and len(self.expert_group_widths) != 1:
            raise ValueError("MohgeConfig.router.group_gate: False needs exactly one group")
