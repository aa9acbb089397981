"""Bad input to dskernels.models gets a clear error naming the argument: configs, layer
construction, load_hf_state_dict (per-expert FP8 checkpoints among them) and the forward's cache
arguments. Weights come from the layer's own hf_state_dict (no transformers needed)."""

import warnings

import numpy as np
import pytest
import torch

import dskernels
from dskernels.models import DeepseekV3Config, DeepseekV3DecoderLayer
import json
import types
from dskernels.models.paged import check_tables

CFG = DeepseekV3Config.tiny()
FP8 = torch.float8_e4m3fn


def float_state_dict(layer_idx: int, seed: int = 0) -> dict:
    """Random weights of the tiny layer under 5.x names (fused experts)."""
    layer = DeepseekV3DecoderLayer(CFG, layer_idx, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in layer.hf_state_dict().items()}


def per_expert(sd: dict) -> dict:
    """5.x fused experts -> the checkpoint's per-expert names."""
    out = {k: v for k, v in sd.items() if not k.startswith("mlp.experts.")}
    gate, up = sd["mlp.experts.gate_up_proj"].split(CFG.moe_intermediate_size, dim=1)
    for e in range(CFG.n_routed_experts):
        out[f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
        out[f"mlp.experts.{e}.up_proj.weight"] = up[e]
        out[f"mlp.experts.{e}.down_proj.weight"] = sd["mlp.experts.down_proj"][e]
    return out


def fp8_checkpoint(sd: dict) -> dict:
    """Every projection (per-expert or fused) as float8_e4m3fn + its block scales."""
    out = {}
    for key, value in sd.items():
        if key.endswith("proj.weight") or key.endswith("proj_with_mqa.weight"):
            out[key], out[key[:-len("weight")] + "weight_scale_inv"] = dskernels.per_block_cast_to_fp8(value)
        elif key in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            pairs = [dskernels.per_block_cast_to_fp8(w.contiguous()) for w in value]
            out[key] = torch.stack([w for w, _ in pairs])
            out[key + "_scale_inv"] = torch.stack([s for _, s in pairs])
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def moe_sd():
    return float_state_dict(1)


@pytest.fixture(scope="module")
def fp8_per_expert(moe_sd):
    return fp8_checkpoint(per_expert(moe_sd))


def snapshot(layer) -> dict:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_untouched(layer, before) -> None:
    after = layer.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].float(), v.float()), k


# ---- 1. cache arguments without a cache ----

@pytest.mark.parametrize("given,match", [
    (("block_table", "cache_seqlens"), "^block_table, cache_seqlens: expected only with a kv_cache"),
    (("cache_seqlens",), "^cache_seqlens: expected only with a kv_cache"),
    (("block_table",), "^block_table: expected only with a kv_cache"),
    (("index_cache",), "^index_cache: only a DeepSeek-V3.2 layer"),
    (("kv_cache_scale",), "^kv_cache_scale: only with a float8_e4m3fn kv_cache"),
])
def test_cache_arguments_without_kv_cache(given, match):
    layer = DeepseekV3DecoderLayer(CFG, 0, dtype=torch.float32)
    x, positions = torch.randn(1, 2, CFG.hidden_size), torch.zeros(1, 2, dtype=torch.long)
    args = {"block_table": torch.zeros(1, 1, dtype=torch.int32), "cache_seqlens": torch.zeros(1, dtype=torch.int32),
            "index_cache": torch.zeros(4, 16, 1, 68, dtype=torch.uint8), "kv_cache_scale": torch.ones(1)}
    with pytest.raises(ValueError, match=match):
        layer(x, positions, **{name: args[name] for name in given})


def test_float64_layer_refuses_the_paged_path_before_writing():
    """A float64 layer runs its prefill; the paged attention's kernels take no float64, which is
    said up front, naming x, with the cache left as it was (not written, then refused by the op)."""
    layer = DeepseekV3DecoderLayer(CFG, 0, dtype=torch.float64)
    layer.load_hf_state_dict(float_state_dict(0))
    x, positions = torch.randn(1, 2, CFG.hidden_size, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.long)
    assert layer(x, positions).dtype == torch.float64
    cache = torch.full((4, 16, 1, CFG.kv_cache_dim), float("nan"), dtype=torch.float64)
    with pytest.raises(TypeError, match="^x: the paged attention's kernels take bfloat16, float16 or float32"):
        layer(x, positions, kv_cache=cache, block_table=torch.zeros(1, 1, dtype=torch.int32),
              cache_seqlens=torch.zeros(1, dtype=torch.int32))
    assert cache.isnan().all()


@pytest.mark.parametrize("name,value,error,match", [
    ("x", [[0.0]], TypeError, "^x: expected a tensor"),
    ("kv_cache", [0], TypeError, "^kv_cache: expected a tensor or None, got list"),
    ("block_table", [[0]], TypeError, "^block_table: expected a tensor or None, got list"),
])
def test_forward_arguments_that_are_not_tensors(name, value, error, match):
    layer = DeepseekV3DecoderLayer(CFG, 0, dtype=torch.float32)
    args = {"x": torch.randn(1, 2, CFG.hidden_size), "positions": torch.zeros(1, 2, dtype=torch.long),
            "kv_cache": torch.zeros(4, 16, 1, CFG.kv_cache_dim), "block_table": torch.zeros(1, 1, dtype=torch.int32),
            "cache_seqlens": torch.zeros(1, dtype=torch.int32)}
    with pytest.raises(error, match=match):
        layer(**{**args, name: value})


# ---- 2. per-expert FP8 checkpoints ----

def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _set(key, value):
    return lambda sd: {**sd, key: value(sd) if callable(value) else value}


@pytest.mark.parametrize("edit,error,match", [
    (_drop("mlp.experts.3.down_proj.weight_scale_inv"), KeyError,
     "missing 'mlp.experts.3.down_proj.weight_scale_inv' for layer 1: the block scales of its float8_e4m3fn"),
    (_drop("mlp.experts.5.up_proj.weight_scale_inv"), KeyError, "missing 'mlp.experts.5.up_proj.weight_scale_inv'"),
    (_drop("self_attn.q_b_proj.weight_scale_inv"), KeyError, "missing 'self_attn.q_b_proj.weight_scale_inv'"),
    (_set("mlp.experts.2.gate_proj.weight_scale_inv", torch.ones(2, 3)), ValueError,
     r"^state_dict: 'mlp.experts.2.gate_proj.weight_scale_inv' of layer 1: expected shape \(1, 2\), got \(2, 3\)"),
    (_set("mlp.experts.7.down_proj.weight", lambda sd: torch.randn(CFG.hidden_size, CFG.moe_intermediate_size)),
     ValueError, "^state_dict: 'mlp.experts.7.down_proj.weight' of layer 1: expected torch.float8_e4m3fn like "
                 "'mlp.experts.0.gate_proj.weight'"),
    (_set("mlp.experts.4.up_proj.weight_scale_inv", lambda sd: sd["mlp.experts.4.up_proj.weight_scale_inv"].double()),
     ValueError, "^state_dict: 'mlp.experts.4.up_proj.weight_scale_inv' of layer 1: expected torch.float32 like"),
    (_set("mlp.experts.1.gate_proj.weight", lambda sd: sd["mlp.experts.1.gate_proj.weight"].to(torch.float8_e5m2)),
     TypeError, r"^state_dict: 'mlp.experts.1.gate_proj.weight' of layer 1: expected a float tensor or "
                r"float8_e4m3fn \(an FP8 weight\), got torch.float8_e5m2"),
])
@pytest.mark.parametrize("fp8", [None, False])
def test_per_expert_fp8_checkpoint_errors(fp8_per_expert, edit, error, match, fp8):
    layer = DeepseekV3DecoderLayer(CFG, 1)
    layer.load_hf_state_dict(fp8_per_expert, fp8=fp8)  # the good one loads
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer.load_hf_state_dict(edit(fp8_per_expert), fp8=fp8)
    assert_untouched(layer, before)


def test_fused_fp8_expert_scales(moe_sd):
    fused = fp8_checkpoint(moe_sd)
    layer = DeepseekV3DecoderLayer(CFG, 1)
    layer.load_hf_state_dict(fused)  # the good one loads
    assert layer.mlp.experts.gate_up_proj.dtype == FP8
    for key, bad in (("mlp.experts.gate_up_proj_scale_inv", torch.ones(CFG.n_routed_experts, 1, 2)),
                     ("mlp.experts.down_proj_scale_inv", torch.ones(3, 2, 1))):
        with pytest.raises(ValueError, match=rf"^state_dict: '{key}' of layer 1: expected shape \(16, "):
            DeepseekV3DecoderLayer(CFG, 1).load_hf_state_dict({**fused, key: bad})
    with pytest.raises(KeyError, match="missing 'mlp.experts.down_proj_scale_inv'"):
        DeepseekV3DecoderLayer(CFG, 1).load_hf_state_dict(_drop("mlp.experts.down_proj_scale_inv")(fused))
    # float weights with scales: the scales would be ignored (a raw FP8 -> bf16 cast, say)
    with pytest.raises(ValueError, match="^state_dict: 'mlp.experts.gate_up_proj_scale_inv' of layer 1: expected "
                                         "no scale for the torch.float32 weight"):
        DeepseekV3DecoderLayer(CFG, 1).load_hf_state_dict({**fused, **{k: moe_sd[k] for k in (
            "mlp.experts.gate_up_proj", "mlp.experts.down_proj")}})
    with pytest.raises(ValueError, match="^state_dict: 'mlp.experts.down_proj' of layer 1: expected "
                                         "torch.float8_e4m3fn like 'mlp.experts.gate_up_proj'"):
        float_down = {"mlp.experts.down_proj": moe_sd["mlp.experts.down_proj"]}
        DeepseekV3DecoderLayer(CFG, 1).load_hf_state_dict({**_drop("mlp.experts.down_proj_scale_inv")(fused),
                                                           **float_down})


# ---- 3. configs ----

@pytest.mark.parametrize("overrides,error,match", [
    (dict(n_group=0), ValueError, "^n_group: expected an int >= 1, got 0"),
    (dict(topk_group=5), ValueError, r"^topk_group: expected 1 <= topk_group <= n_group=4, got 5"),
    (dict(topk_group=0), ValueError, r"^topk_group: expected 1 <= topk_group <= n_group=4, got 0"),
    (dict(num_experts_per_tok=17), ValueError,
     r"^num_experts_per_tok: expected 1 <= num_experts_per_tok <= n_routed_experts=16, got 17"),
    (dict(n_group=16, topk_group=1), ValueError, "^n_group: expected groups of at least 2 experts"),
    (dict(n_routed_experts=10), ValueError, "^n_routed_experts: expected a multiple of n_group=4, got 10"),
    (dict(rope_scaling={"type": "yarn", "mscale_all_dim": 1.0}), ValueError,
     "^rope_scaling: expected a number > 0 as YaRN's 'factor', got None"),
    (dict(rope_scaling="yarn"), TypeError, "^rope_scaling: expected a dict or None, got str"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), ValueError,
     "^rope_parameters: expected rope_type 'default' or 'yarn'"),
    (dict(num_attention_heads="2"), TypeError, "^num_attention_heads: expected an int, got str"),
    (dict(hidden_size=True), TypeError, "^hidden_size: expected an int, got bool"),
    (dict(kv_lora_rank=0), ValueError, "^kv_lora_rank: expected an int >= 1, got 0"),
    (dict(rms_norm_eps="1e-6"), TypeError, "^rms_norm_eps: expected a number, got str"),
    (dict(rope_theta=-1.0, rope_scaling=None), ValueError, "^rope_theta: expected a number > 0, got -1.0"),
    (dict(norm_topk_prob="yes"), TypeError, "^norm_topk_prob: expected a bool, got str"),
    (dict(quantization_config={"weight_block_size": [64, 64]}), ValueError,
     r"^quantization_config: expected weight_block_size \[128, 128\]"),
])
def test_bad_config_fields_are_named(overrides, error, match):
    with pytest.raises(error, match=match):
        DeepseekV3Config.tiny(**overrides)


def test_moe_fields_checked_only_with_routed_experts():
    # a model without MoE layers does not need consistent router fields...
    dense = DeepseekV3Config.tiny(first_k_dense_replace=2, n_group=0, topk_group=0)
    DeepseekV3DecoderLayer(dense, 0)
    # ...until a MoE layer is built from it (the MTP layer sits past num_hidden_layers)
    with pytest.raises(ValueError, match="^n_group: expected an int >= 1, got 0"):
        DeepseekV3DecoderLayer(dense, 2)
    # a config changed after construction is checked again when a layer is built
    cfg = DeepseekV3Config.tiny()
    cfg.topk_group = 9
    with pytest.raises(ValueError, match="^topk_group: expected"):
        DeepseekV3DecoderLayer(cfg, 1)
    # the presets and transformers' own defaults still load
    for good in (DeepseekV3Config(), DeepseekV3Config.deepseek_v3_671b(), DeepseekV3Config.deepseek_v32_671b(),
                 DeepseekV3Config.tiny(q_lora_rank=None, rope_scaling=None, n_group=1, topk_group=1),
                 DeepseekV3Config.tiny(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=8)):
        DeepseekV3Config.from_hf(good.to_hf_dict())


@pytest.mark.parametrize("value", [42, None, [1, 2]], ids=["int", "None", "list"])
def test_from_hf_of_something_else(value):
    with pytest.raises(TypeError, match=f"^hf_config: expected a transformers config, a dict or a config.json "
                                        f"path, got {type(value).__name__}"):
        DeepseekV3Config.from_hf(value)


# ---- 4. layer construction ----

@pytest.mark.parametrize("args,kwargs,error,match", [
    ((CFG.to_hf_dict(), 1), {}, TypeError, r"^cfg: expected a DeepseekV3Config \(DeepseekV3Config.from_hf"),
    ((CFG, "1"), {}, TypeError, "^layer_idx: expected an int, got str"),
    ((CFG, True), {}, TypeError, "^layer_idx: expected an int, got bool"),
    ((CFG, -1), {}, ValueError, "^layer_idx: expected an int >= 0, got -1"),
    ((CFG, 0), {"dtype": "float32"}, TypeError, "^dtype: expected a floating-point torch.dtype"),
    ((CFG, 0), {"dtype": torch.int32}, TypeError, "^dtype: expected a floating-point torch.dtype"),
    ((CFG, 0), {"index_fp8": "no"}, TypeError, "^index_fp8: expected a bool, got str"),
    ((CFG, 1), {"ep_low_latency_tokens": 0}, ValueError, "^ep_low_latency_tokens: expected an int >= 1"),
    ((CFG, 1), {"ep_low_latency_tokens": True}, TypeError, "^ep_low_latency_tokens: expected an int, got bool"),
])
def test_bad_layer_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        DeepseekV3DecoderLayer(*args, **kwargs)


# ---- 5. load_hf_state_dict inputs: checked before anything is copied ----

@pytest.mark.parametrize("bad,error,match", [
    (lambda sd: list(sd.items()), TypeError, "^state_dict: expected a mapping of names to tensors, got list"),
    (lambda sd: {**sd, "mlp.gate.weight": sd["mlp.gate.weight"].tolist()}, TypeError,
     "^state_dict: 'mlp.gate.weight' of layer 1: expected a torch.Tensor, got list"),
    (lambda sd: {**sd, "mlp.experts.down_proj": sd["mlp.experts.down_proj"].numpy()}, TypeError,
     "^state_dict: 'mlp.experts.down_proj' of layer 1: expected a torch.Tensor, got ndarray"),
    (lambda sd: {**sd, "mlp.experts.down_proj": sd["mlp.experts.down_proj"].to("meta")}, ValueError,
     "^state_dict: 'mlp.experts.down_proj' of layer 1: expected a tensor with data, got one on the meta device"),
    (lambda sd: {**sd, "mlp.gate.weight": sd["mlp.gate.weight"].to("meta")}, ValueError,
     "^state_dict: 'mlp.gate.weight' of layer 1: expected a tensor with data"),
    (lambda sd: {**sd, "input_layernorm.weight": sd["input_layernorm.weight"].long()}, TypeError,
     "^state_dict: 'input_layernorm.weight' of layer 1: expected a float tensor, got torch.int64"),
    (lambda sd: {**sd, 7: torch.ones(1)}, TypeError, "^state_dict: expected str keys, got int"),
])
def test_bad_state_dict_leaves_the_layer_untouched(moe_sd, bad, error, match):
    layer = DeepseekV3DecoderLayer(CFG, 1, dtype=torch.float32)
    layer.load_hf_state_dict(float_state_dict(1, seed=1))
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        layer.load_hf_state_dict(bad(moe_sd))
    assert_untouched(layer, before)
    # the checks run before the first copy: a late error (the experts are loaded last) changes nothing either
    with pytest.raises(KeyError, match="missing 'mlp.experts.down_proj'"):
        layer.load_hf_state_dict(_drop("mlp.experts.down_proj")(moe_sd))
    assert_untouched(layer, before)
    with pytest.raises(TypeError, match="^fp8: expected None, True or False, got str"):
        layer.load_hf_state_dict(moe_sd, fp8="yes")
    with pytest.raises(TypeError, match="^strict: expected a bool, got str"):  # ("no" was True)
        layer.load_hf_state_dict(moe_sd, strict="no")


def test_numpy_scalars_and_good_inputs_still_load(moe_sd):
    cfg = DeepseekV3Config.tiny(num_attention_heads=np.int64(4), norm_topk_prob=np.bool_(False))  # read through numpy
    assert type(cfg.num_attention_heads) is int and cfg.norm_topk_prob is False
    layer = DeepseekV3DecoderLayer(CFG, np.int64(1), dtype=torch.float32, index_fp8=np.bool_(False))
    layer.load_hf_state_dict(per_expert(moe_sd), fp8=np.bool_(False))
    torch.testing.assert_close(layer.mlp.experts.down_proj, moe_sd["mlp.experts.down_proj"], atol=0, rtol=0)


def test_forward_before_loading_weights_says_so_once():
    """The weights are torch.empty until loaded: a forward before that warns (once) rather than
    returning garbage without a word; after load_hf_state_dict or torch's load_state_dict, none."""
    x, positions = torch.randn(1, 3, CFG.hidden_size), torch.arange(3)[None]
    unloaded = DeepseekV3DecoderLayer(CFG, 0)
    with pytest.warns(RuntimeWarning, match="forward before any weights were loaded"):
        unloaded(x, positions)
    loaded = DeepseekV3DecoderLayer(CFG, 0)
    loaded.load_hf_state_dict(float_state_dict(0))
    copied = DeepseekV3DecoderLayer(CFG, 0)
    copied.load_state_dict(loaded.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unloaded(x, positions)  # (said once)
        loaded(x, positions)
        copied(x, positions)


def test_config_from_hf_json_path_and_plain_namespace(tmp_path):
    cfg = DeepseekV3Config.tiny(mlp_layer_types=["dense", "sparse"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    from_path = DeepseekV3Config.from_hf(str(path))
    namespace = types.SimpleNamespace(**cfg.to_hf_dict())  # no to_dict(): read through vars()
    from_ns = DeepseekV3Config.from_hf(namespace)
    for got in (from_path, from_ns):
        assert got.to_hf_dict() == cfg.to_hf_dict()
        assert got.mlp_layer_types == ["dense", "sparse"]
        assert got.is_moe_layer(1) and not got.is_moe_layer(0)


def test_config_defaults_kv_heads_and_yarn_without_mscale_boost():
    cfg = DeepseekV3Config.tiny(num_key_value_heads=None,
                                rope_scaling={"type": "yarn", "factor": 1.0, "mscale_all_dim": 1.0,
                                              "original_max_position_embeddings": 4096})
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    # factor 1: mscale = 0.1 * mscale_all_dim * log(1) + 1 = 1, so the plain qk_head_dim ** -0.5
    assert cfg.softmax_scale == cfg.qk_head_dim ** -0.5
    boosted = DeepseekV3Config.tiny()  # factor 40, mscale_all_dim 1
    m = 0.1 * np.log(40) + 1
    assert boosted.softmax_scale == pytest.approx(boosted.qk_head_dim ** -0.5 * m * m, rel=1e-12)


@pytest.mark.parametrize("overrides, error, name", [
    (dict(rms_norm_eps=0), ValueError, "rms_norm_eps"),
    (dict(rms_norm_eps="1e-6"), TypeError, "rms_norm_eps"),
    (dict(qk_rope_head_dim=31), ValueError, "qk_rope_head_dim"),
    (dict(hidden_act="gelu"), ValueError, "hidden_act"),
    (dict(quantization_config=[128, 128]), TypeError, "quantization_config"),
    (dict(rope_scaling=None, rope_theta="1e4"), TypeError, "rope_theta"),
    (dict(mlp_layer_types="dense"), TypeError, "mlp_layer_types"),
    (dict(mlp_layer_types=["dense", "moe"]), ValueError, "mlp_layer_types"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": True}), ValueError,
     "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "mscale": "1"}),
     ValueError, "rope_scaling"),
    (dict(hidden_size=256.0), TypeError, "hidden_size"),
])
def test_config_refusals_name_the_field(overrides, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        DeepseekV3Config.tiny(**overrides)


@pytest.mark.parametrize("block_table, cache_seqlens, error, name", [
    ([[0, 1]], torch.zeros(1, dtype=torch.int32), TypeError, "block_table"),
    (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.float32), TypeError, "cache_seqlens"),
    (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), ValueError, "cache_seqlens"),
    (torch.zeros(1, 2, dtype=torch.int32, device="meta"), torch.zeros(1, dtype=torch.int32), ValueError,
     "block_table"),
])
def test_check_tables_names_the_table(block_table, cache_seqlens, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        check_tables(block_table, cache_seqlens, 1, torch.device("cpu"))


class _Slice:
    """A safetensors slice, duck-typed over a tensor (get_shape, get_dtype, [index])."""

    def __init__(self, t):
        self.t = t

    def get_shape(self):
        return list(self.t.shape)

    def get_dtype(self):
        return "F32"

    def __getitem__(self, index):
        return self.t[index]


def test_unread_tensor_indexing():
    """An unread checkpoint tensor (a written one too) takes [i] or [a:b] on its first dimension, a
    row range again; other indices raise the IndexError it promises: a row indexed again (was an
    AttributeError), a step, a tuple, a row past the end."""
    from dskernels.models.layer import _Unread, _Written

    t = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    unread = _Unread(_Slice(t), "w")
    assert torch.equal(unread[1].read(), t[1]) and torch.equal(unread[1:][0].read(), t[1])
    written = _Written(t.shape, t.dtype, as_fp8=True)
    assert written[1:][0].as_fp8 and written[1].shape == t.shape[1:]
    for tensor in (unread, written):
        for index in ((1, 0), (slice(None, None, 2),), ((0, 1),), (2,)):
            got = tensor
            with pytest.raises(IndexError, match="^an unread checkpoint tensor"):
                for i in index:
                    got = got[i]
