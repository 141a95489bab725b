"""Model geometry: the built-in Step-3.5-Flash tables, HF config.json files, and the errors for bad ones."""

import json
from pathlib import Path

import pytest

from tuning.errors import UsageError
from tuning.models import ARCHITECTURES, BUILTIN, DEFAULT_MODEL, geometry_from_config, load_model

FIXTURES = Path(__file__).parent / "fixtures" / "foundation"
STEP_MOE_LAYERS = tuple(range(3, 45))


def test_builtin_step35_flash_geometry():
    g = load_model()
    assert g.name == DEFAULT_MODEL == "stepfun-ai/Step-3.5-Flash"
    assert g.model_type == "step3p5"
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (288, 8, 1280, 4096)
    assert g.num_layers == 45
    assert g.moe_layers == STEP_MOE_LAYERS and len(g.moe_layers) == 42
    assert g.vocab_size == 128896
    assert g.weight_block_size is None
    assert g.total_params == pytest.approx(196.81e9)
    # 288 experts x (gate, up, down) x 1280 x 4096 x 42 layers: almost all of the model.
    assert g.expert_params == 288 * 3 * 1280 * 4096 * 42 == 190_253_629_440


def test_builtin_fp8_checkpoint_has_the_128_block():
    g = load_model("stepfun-ai/Step-3.5-Flash-FP8")
    assert g.weight_block_size == (128, 128)
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (288, 8, 1280, 4096)
    assert g.moe_layers == STEP_MOE_LAYERS
    assert g.total_params == pytest.approx(196.81e9)


@pytest.mark.parametrize("how", ["file", "folder"])
def test_config_json_by_path_and_by_folder(tmp_path, how):
    cfg = dict(BUILTIN["stepfun-ai/Step-3.5-Flash-FP8"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = tmp_path / "config.json" if how == "file" else tmp_path
    g = load_model(str(spec))
    assert g.name == str(tmp_path / "config.json")
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (288, 8, 1280, 4096)
    assert g.moe_layers == STEP_MOE_LAYERS
    assert g.weight_block_size == (128, 128)
    assert g.total_params == pytest.approx(196.81e9)


def test_step3p7_nested_text_config_has_the_same_moe_geometry():
    g = load_model(str(FIXTURES / "step3p7"))
    assert g.model_type == "step3p5"  # the text model's type picks the keys
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (288, 8, 1280, 4096)
    assert g.num_layers == 45 and g.moe_layers == STEP_MOE_LAYERS
    assert g.vocab_size == 128896
    assert g.weight_block_size == (128, 128)  # quantization_config stays at the top level
    # No total_params in the file: estimated from the geometry, within 1% of the published 196.81B.
    assert g.total_params == pytest.approx(196.81e9, rel=0.01)


def test_deepseek_v3_keys_and_first_k_dense_rule():
    g = load_model(str(FIXTURES / "deepseek_v3" / "config.json"))
    assert g.model_type == "deepseek_v3"
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (256, 8, 2048, 7168)
    assert g.moe_layers == tuple(range(3, 61))  # first_k_dense_replace=3 of 61 layers
    assert g.weight_block_size == (128, 128)
    assert g.expert_params == 256 * 3 * 2048 * 7168 * 58


def test_qwen3_moe_sparse_step_and_mlp_only_layers():
    g = load_model(str(FIXTURES / "qwen3_moe"))
    assert g.model_type == "qwen3_moe"
    assert (g.num_experts, g.top_k, g.moe_intermediate_size, g.hidden_size) == (128, 8, 768, 2048)
    # decoder_sparse_step=2: layers whose (i+1) is even; mlp_only_layers=[5] removes layer 5.
    assert g.moe_layers == (1, 3, 7, 9, 11)
    assert g.weight_block_size is None


def test_qwen3_moe_defaults_make_every_layer_sparse():
    cfg = {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
           "hidden_size": 2048, "num_hidden_layers": 4}
    assert geometry_from_config(cfg, "q").moe_layers == (0, 1, 2, 3)


def test_step3p5_layer_rules_in_vllm_order():
    base = {k: v for k, v in BUILTIN[DEFAULT_MODEL].items() if k not in ("moe_layers_enum", "total_params")}
    base["num_hidden_layers"] = 6
    # mlp_layer_types wins over moe_layers_enum; without either, every layer but the first.
    typed = {**base, "mlp_layer_types": ["dense", "sparse", "dense", "sparse", "sparse", "dense"],
             "moe_layers_enum": "1,2,3,4,5"}
    assert geometry_from_config(typed, "t").moe_layers == (1, 3, 4)
    assert geometry_from_config({**base, "moe_layers_enum": " 4,2,5 "}, "e").moe_layers == (2, 4, 5)
    assert geometry_from_config(base, "d").moe_layers == (1, 2, 3, 4, 5)


def test_fp8_block_only_for_fp8_quantization():
    cfg = {**BUILTIN[DEFAULT_MODEL], "quantization_config": {"quant_method": "awq", "weight_block_size": [64, 64]}}
    assert geometry_from_config(cfg, "awq").weight_block_size is None
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [64, 64]}
    assert geometry_from_config(cfg, "fp8").weight_block_size == (64, 64)


def test_unknown_model_type_names_the_known_ones_and_where_to_add_it():
    with pytest.raises(UsageError) as err:
        load_model(str(FIXTURES / "llama"))
    msg = str(err.value)
    assert "'llama'" in msg
    for known in ARCHITECTURES:
        assert known in msg
    assert "tuning.models.ARCHITECTURES" in msg


def test_missing_keys_are_named():
    cfg = {k: v for k, v in BUILTIN[DEFAULT_MODEL].items() if k not in ("moe_top_k", "hidden_size")}
    with pytest.raises(UsageError) as err:
        geometry_from_config(cfg, "my/config.json")
    msg = str(err.value)
    assert msg.startswith("my/config.json: ")
    assert "moe_top_k" in msg and "hidden_size" in msg
    assert "moe_num_experts" not in msg  # only the missing ones


def test_non_integer_key_counts_as_missing():
    cfg = {**BUILTIN[DEFAULT_MODEL], "moe_num_experts": "288"}
    with pytest.raises(UsageError, match="moe_num_experts"):
        geometry_from_config(cfg, "c")


def test_config_with_no_moe_layers_is_refused():
    cfg = {**BUILTIN[DEFAULT_MODEL], "mlp_layer_types": ["dense"] * 45}
    with pytest.raises(UsageError, match="no MoE layers"):
        geometry_from_config(cfg, "c")


def test_corrupt_json_is_a_usage_error():
    path = FIXTURES / "corrupt" / "config.json"
    with pytest.raises(UsageError) as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "not readable JSON" in str(err.value)


def test_unreadable_file_is_a_usage_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UsageError, match="not readable JSON"):
        load_model(str(path))


def test_non_object_json_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(UsageError, match="expected a JSON object"):
        load_model(str(path))


def test_missing_file_and_empty_folder_name_the_builtins(tmp_path):
    for spec in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(UsageError) as err:
            load_model(str(spec))
        assert "no such config.json" in str(err.value)
        assert "stepfun-ai/Step-3.5-Flash-FP8" in str(err.value)


TINY = json.loads((Path(__file__).parent / "fixtures" / "tiny-moe" / "config.json").read_text())


@pytest.mark.parametrize("change,match", [
    ({"moe_num_experts": 0}, "moe_num_experts=0: must be at least 1"),
    ({"moe_num_experts": True}, "missing integer keys moe_num_experts"),
    ({"hidden_size": -1}, "hidden_size=-1: must be at least 1"),
    ({"moe_top_k": 17}, "moe_top_k=17 is more than the 16 experts"),
    ({"num_hidden_layers": 10**9}, "is more than 10000"),
    ({"model_type": ["step3p5"]}, "is not a known MoE architecture"),
    ({"moe_layers_enum": "1,two"}, "moe_layers_enum must list layer numbers"),
    ({"mlp_layer_types": "sparse"}, "mlp_layer_types must be a list"),
    ({"quantization_config": ["fp8"]}, "quantization_config must be a JSON object"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "is not two positive integers"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}}, "is not two positive integers"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64.0, 64.0]}}, "not two positive integers"),
    ({"total_params": "197B"}, "total_params '197B' is not a positive number"),
    ({"vocab_size": "big"}, "vocab_size must be a whole number"),
    ({"share_expert_dim": None}, "share_expert_dim must be a whole number"),
])
def test_bad_values_are_one_line_naming_the_key(change, match):
    with pytest.raises(UsageError, match=match):
        geometry_from_config({**TINY, **change}, "c")


@pytest.mark.parametrize("cfg,match", [
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1"),
    ({"mlp_only_layers": 5}, "mlp_only_layers must be a list of layer numbers"),
])
def test_bad_qwen_layer_rules(cfg, match):
    base = {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
            "hidden_size": 128, "num_hidden_layers": 4}
    with pytest.raises(UsageError, match=match):
        geometry_from_config({**base, **cfg}, "q")


def test_bad_first_k_dense_replace():
    base = {"model_type": "deepseek_v3", "n_routed_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 128,
            "hidden_size": 128, "num_hidden_layers": 4, "first_k_dense_replace": "1"}
    with pytest.raises(UsageError, match="first_k_dense_replace must be an integer >= 0"):
        geometry_from_config(base, "d")


def test_layers_enum_beyond_the_model_is_ignored_as_vllm_does():
    assert geometry_from_config({**TINY, "moe_layers_enum": "1,2,99"}, "t").moe_layers == (1, 2)
