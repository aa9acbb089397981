"""`DeepseekV3Config`: the fields of Hugging Face's `DeepseekV3Config` that one decoder layer needs.

Field names are Hugging Face's (config.json of deepseek-ai/DeepSeek-V3 and -V3.2), so
`DeepseekV3Config(**json.load(open("config.json")))` works; unknown keys are kept in `extra`.
RoPE parameters come either as transformers 5.x `rope_parameters` (a dict that holds rope_theta)
or as 4.x / checkpoint `rope_scaling` + `rope_theta`; both are normalized into `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dskernels._checks import as_flag, check_int


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_field(cfg, name: str, minimum: int | None) -> int:
    """cfg.<name> as a Python int (numpy ints too), else TypeError / ValueError naming it."""
    value = check_int(name, getattr(cfg, name), minimum)
    setattr(cfg, name, value)
    return value


def _number_field(cfg, name: str) -> float:
    value = getattr(cfg, name)
    if not _is_number(value):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return value


# config.json fields that name another model's MoE (DeepSeek-V2's softmax and greedy routing, MoE
# layers every n-th only) or FP8 format: present with another value, the config is refused rather
# than run as V3's.
_ROUTING_KINDS = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
_QUANTIZATION_KINDS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096    # transformers' default (the 671B preset: 163840)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # 4.x / checkpoint spelling; folded into rope_parameters
    rope_parameters: dict | None = None    # 5.x spelling: {"rope_type", "rope_theta", "factor", ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    quantization_config: dict | None = None  # the FP8 checkpoint's {"weight_block_size": [128, 128], ...}
    mlp_layer_types: list | None = None    # transformers 5.x V3.2: "dense" / "sparse" per layer
    # DeepSeek-V3.2's sparse attention (DSA): with index_topk set, each layer's lightning indexer picks
    # the index_topk cached tokens every query attends to (None: V3's dense attention).
    index_topk: int | None = None
    index_head_dim: int = 128
    index_n_heads: int = 64
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __init__(self, **kwargs):
        names = {f.name for f in dataclasses.fields(self)}
        for f in dataclasses.fields(self):
            if f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
            else:
                setattr(self, f.name, f.default_factory())
        for key, value in kwargs.items():
            if key in names:
                setattr(self, key, value)
            elif key == "num_local_experts":  # transformers' attribute_map alias
                self.n_routed_experts = value
            else:
                self.extra[key] = value
        self.__post_init__()

    def __post_init__(self):
        for name in ("rope_parameters", "rope_scaling"):  # (checked before dict() turns a string into an error)
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{name}: expected a dict or None, got {type(value).__name__}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("rope_interleave", "norm_topk_prob"):  # transformers' config allows None: its layer reads False
            if getattr(self, name) is None:
                setattr(self, name, False)
        params = dict(self.rope_parameters or self.rope_scaling or {})
        self._rope_source = "rope_parameters" if self.rope_parameters else "rope_scaling"
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.rope_theta)
        self.rope_theta = params["rope_theta"]
        if params["rope_type"] == "yarn":
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.rope_parameters = params
        self._validate()

    def _validate(self, moe: bool | None = None) -> None:
        """Raises TypeError / ValueError naming the first field that the layer cannot use. The
        router's fields (n_group, topk_group, num_experts_per_tok, ...) are checked where a MoE
        layer can be built: moe=None: where some layer below num_hidden_layers is one; the layer
        passes moe=True for a MoE layer (the MTP layer sits past num_hidden_layers)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                     "max_position_embeddings"):
            _int_field(self, name, 1)
        _int_field(self, "first_k_dense_replace", 0)
        if self.q_lora_rank is not None:  # (0, like None, means q_proj without LoRA)
            _int_field(self, "q_lora_rank", 0)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim: expected an even number, got {self.qk_rope_head_dim}")
        if _number_field(self, "rms_norm_eps") <= 0:
            raise ValueError(f"rms_norm_eps: expected a number > 0, got {self.rms_norm_eps}")
        for name in ("rope_interleave", "attention_bias", "norm_topk_prob"):
            setattr(self, name, as_flag(name, getattr(self, name)))  # (a numpy bool as Python's, like the ints)
        if self.hidden_act != "silu":  # the experts' SwiGLU and the dense MLP are written with silu
            raise ValueError(f"hidden_act: only 'silu' (DeepSeek-V3's) is supported, got {self.hidden_act!r}")
        self._validate_rope()
        if self.quantization_config is not None:
            if not isinstance(self.quantization_config, Mapping):
                raise TypeError(f"quantization_config: expected a dict or None, "
                                f"got {type(self.quantization_config).__name__}")
            block = self.quantization_config.get("weight_block_size")
            if block is not None and list(block) != [128, 128]:  # the scales' shapes and our FP8 ops assume it
                raise ValueError(f"quantization_config: expected weight_block_size [128, 128], got {block}")
            for key, value in _QUANTIZATION_KINDS.items():  # what the FP8 path implements (V3's checkpoint)
                if self.quantization_config.get(key, value) != value:
                    raise ValueError(f"quantization_config: expected {key} {value!r} (DeepSeek-V3's FP8 format: "
                                     f"e4m3 weights, activations cast per token at run time), got "
                                     f"{self.quantization_config[key]!r}")
        for key, value in _ROUTING_KINDS.items():  # config.json's keys the layer has no field for
            if self.extra.get(key, value) != value:
                kinds = ", ".join(f"{k}={v!r}" for k, v in _ROUTING_KINDS.items())
                raise ValueError(f"{key}: the layer implements DeepSeek-V3's MoE ({kinds}), got {self.extra[key]!r}")
        if self.index_topk is not None:
            _int_field(self, "index_topk", 1)  # (None: dense attention, V3)
            _int_field(self, "index_head_dim", 1)
            _int_field(self, "index_n_heads", 1)
            if not self.q_lora_rank:
                raise ValueError("q_lora_rank: DeepSeek-V3.2's indexer reads the q LoRA latent, expected a rank, "
                                 f"got {self.q_lora_rank!r}")
            if not self.rope_interleave:
                raise ValueError("rope_interleave: DeepSeek-V3.2's attention always ropes interleaved pairs "
                                 "(transformers' V3.2 has no such option), expected True")
            if self.index_head_dim < self.qk_rope_head_dim:
                raise ValueError(f"index_head_dim: expected at least qk_rope_head_dim={self.qk_rope_head_dim} "
                                 f"(the indexer ropes its first dims), got {self.index_head_dim}")
        if self.mlp_layer_types is not None:
            if not isinstance(self.mlp_layer_types, (list, tuple)):
                raise TypeError(f"mlp_layer_types: expected a list or None, got {type(self.mlp_layer_types).__name__}")
            if any(t not in ("dense", "sparse") for t in self.mlp_layer_types):
                raise ValueError(f"mlp_layer_types: expected 'dense' or 'sparse' per layer, got {self.mlp_layer_types}")
        if moe is None:
            moe = ("sparse" in self.mlp_layer_types if self.mlp_layer_types is not None
                   else self.first_k_dense_replace < self.num_hidden_layers)
        if moe:
            self._validate_moe()

    def _validate_rope(self) -> None:
        p, name = self.rope_parameters, getattr(self, "_rope_source", "rope_parameters")
        if p.get("rope_type") not in ("default", "yarn"):
            raise ValueError(f"{name}: expected rope_type 'default' or 'yarn' (what the layer implements), "
                             f"got {p.get('rope_type')!r}")
        theta = p["rope_theta"]
        if not _is_number(theta):
            raise TypeError(f"rope_theta: expected a number, got {type(theta).__name__}")
        if theta <= 0:
            raise ValueError(f"rope_theta: expected a number > 0, got {theta!r}")
        if p["rope_type"] != "yarn":
            return
        # transformers requires factor too (softmax_scale's mscale and the frequencies read it)
        if not _is_number(p.get("factor")) or p["factor"] <= 0:
            raise ValueError(f"{name}: expected a number > 0 as YaRN's 'factor', got {p.get('factor')!r}")
        original = p["original_max_position_embeddings"]
        if isinstance(original, bool) or not isinstance(original, numbers.Integral) or original < 1:
            raise ValueError(f"{name}: expected an int >= 1 as original_max_position_embeddings, got {original!r}")
        for key in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor"):
            if p.get(key) is not None and not _is_number(p[key]):
                raise ValueError(f"{name}: expected a number or None as {key!r}, got {p[key]!r}")

    def _validate_moe(self) -> None:
        experts = _int_field(self, "n_routed_experts", 1)
        groups = _int_field(self, "n_group", 1)
        if experts % groups:
            raise ValueError(f"n_routed_experts: expected a multiple of n_group={groups}, got {experts}")
        if experts // groups < 2:  # each group is ranked by the sum of its two best experts (transformers too)
            raise ValueError(f"n_group: expected groups of at least 2 experts (n_group <= n_routed_experts / 2 = "
                             f"{experts // 2}), got {groups}")
        topk_group = _int_field(self, "topk_group", None)
        if not 1 <= topk_group <= groups:
            raise ValueError(f"topk_group: expected 1 <= topk_group <= n_group={groups}, got {topk_group}")
        k = _int_field(self, "num_experts_per_tok", None)
        if not 1 <= k <= experts:
            raise ValueError(f"num_experts_per_tok: expected 1 <= num_experts_per_tok <= n_routed_experts={experts}, "
                             f"got {k}")
        _int_field(self, "moe_intermediate_size", 1)
        _int_field(self, "n_shared_experts", 0)
        _number_field(self, "routed_scaling_factor")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """transformers' rule: mlp_layer_types[layer_idx] when given, else layer_idx >= first_k_dense_replace.
        The list covers the num_hidden_layers main layers; the MTP layers past them (DeepSeek's
        checkpoints number them on, e.g. layer 61) follow first_k_dense_replace: MoE."""
        if layer_idx < 0:
            raise ValueError(f"layer_idx: expected >= 0, got {layer_idx}")
        if self.mlp_layer_types is not None and layer_idx < len(self.mlp_layer_types):
            return self.mlp_layer_types[layer_idx] == "sparse"
        return layer_idx >= self.first_k_dense_replace

    # ---- derived sizes ----
    @property
    def fp8_round_scale(self) -> bool:
        """The checkpoint's FP8 scales are powers of two (DeepSeek-V3.1's quantization_config
        "scale_fmt": "ue8m0"): activations are then cast with power-of-two scales too, as
        DeepSeek's inference code does (per_token_cast_to_fp8(x, round_scale=True))."""
        return (self.quantization_config or {}).get("scale_fmt") == "ue8m0"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per-token width of the latent cache: kv_lora_rank (normalized latent) + rope dims."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim ** -0.5, times mscale**2 for YaRN with mscale_all_dim (as HF / DeepSeek)."""
        scale = self.qk_head_dim ** -0.5
        p = self.rope_parameters
        if p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
            factor = p["factor"]
            if factor > 1:
                m = 0.1 * p["mscale_all_dim"] * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    # ---- conversions ----
    @classmethod
    def from_hf(cls, hf_config) -> DeepseekV3Config:
        """From a transformers DeepseekV3Config or DeepseekV32Config (4.x or 5.x), a dict, or a
        config.json path. A V3.2 config (index_topk) gives layers with the sparse-attention indexer."""
        given = type(hf_config).__name__
        if isinstance(hf_config, (str, os.PathLike)):
            import json
            with open(hf_config) as f:
                hf_config = json.load(f)
        elif not isinstance(hf_config, Mapping):
            if callable(getattr(hf_config, "to_dict", None)):
                hf_config = hf_config.to_dict()
            elif hasattr(hf_config, "__dict__") and not isinstance(hf_config, type):  # a namespace of fields
                hf_config = vars(hf_config)
        if not isinstance(hf_config, Mapping):
            raise TypeError(f"hf_config: expected a transformers config, a dict or a config.json path, got {given}"
                            f"{'' if given == type(hf_config).__name__ else f' holding {type(hf_config).__name__}'}")
        names = {f.name for f in dataclasses.fields(cls)} | {"num_local_experts"}  # (the alias of n_routed_experts)
        names |= _ROUTING_KINDS.keys()  # (kept in extra, checked)
        kwargs = {k: v for k, v in hf_config.items() if k in names}
        if hf_config.get("rope_parameters"):
            kwargs.pop("rope_scaling", None)
        kwargs.pop("extra", None)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """Keyword arguments for transformers' DeepseekV3Config, or DeepseekV32Config when index_topk
        is set (5.x `rope_parameters` spelling)."""
        skip = {"extra", "rope_scaling", "rope_theta", "quantization_config"}
        if self.index_topk is None:
            skip |= {"index_topk", "index_head_dim", "index_n_heads"}
        else:
            skip.add("rope_interleave")  # V3.2's attention always interleaves; its config has no such field
        if self.mlp_layer_types is None:
            skip.add("mlp_layer_types")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["rope_parameters"] = dict(self.rope_parameters)
        return out

    # ---- presets ----
    @classmethod
    def deepseek_v3_671b(cls, **overrides) -> DeepseekV3Config:
        """deepseek-ai/DeepSeek-V3 (and -V3-0324 / R1): config.json's values."""
        base = dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
            n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
            qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
            num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
            max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
            rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096, "type": "yarn"},
            attention_bias=False,
            quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]})
        base.update(overrides)
        return cls(**base)

    @classmethod
    def deepseek_v32_671b(cls, **overrides) -> DeepseekV3Config:
        """deepseek-ai/DeepSeek-V3.2(-Exp): V3's sizes plus the indexer (64 heads of 128, top-2048)
        and V3.1's power-of-two (ue8m0) FP8 scales."""
        base = dict(index_topk=2048, index_head_dim=128, index_n_heads=64,
                    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "scale_fmt": "ue8m0", "weight_block_size": [128, 128]})
        base.update(overrides)
        return cls.deepseek_v3_671b(**base)

    @classmethod
    def tiny(cls, **overrides) -> DeepseekV3Config:
        """A small model with every path of the real one (q LoRA, grouped routing, shared expert,
        YaRN with mscale) whose matrix sizes stay multiples of 128, so the FP8 path works too."""
        base = dict(
            vocab_size=1000, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=128, q_lora_rank=128,
            qk_rope_head_dim=32, v_head_dim=32, qk_nope_head_dim=32, n_group=4, topk_group=2,
            num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True, hidden_act="silu",
            max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
            rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                          "original_max_position_embeddings": 4096, "type": "yarn"},
            attention_bias=False)
        base.update(overrides)
        return cls(**base)
