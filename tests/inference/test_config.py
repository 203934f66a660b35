"""config.json: round trip, and every bad value is a one-line error naming the field and the fix."""
import copy
import json

import pytest

from modse_megatron.inference import ExportConfig, ExportConfigError

from . import TINY_MOE, tiny_config


def _data():
    return tiny_config(TINY_MOE, tokenizer="tokenizer.json", eod_token_id=0).to_dict()


def test_round_trip_through_json(tmp_path):
    config = tiny_config(dict(TINY_MOE, shared_expert_intermediate_size=16, shared_expert_gate=True), tokenizer="tok.json")
    config.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert list(data)[:3] == ["format", "format_version", "architecture"]
    assert data["format"] == "modse-megatron-export" and data["format_version"] == 1 and data["architecture"] == "gpt"
    assert data["moe"]["expert_widths"] == [48, 16, 40, 24]
    assert ExportConfig.from_json(tmp_path) == config  # a directory means its config.json
    assert ExportConfig.from_json(tmp_path / "config.json") == config


def test_optional_fields_may_be_omitted():
    data = _data()
    for name in ("tokenizer", "eod_token_id", "rotary_base", "rotary_percent", "rotary_interleaved", "softmax_scale"):
        del data[name]
    for name in ("score_function", "pre_softmax", "capacity_factor", "router_dtype", "routing_granularity"):
        del data["moe"][name]
    config = ExportConfig.from_dict(data)
    assert config.rotary_base == 10000.0 and config.tokenizer is None and config.moe.router_dtype == "float32"


def _set(path, value):
    def change(data):
        *parents, last = path.split(".")
        target = data
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return change


_DELETE = object()
BAD = {
    "other format": (_set("format", "huggingface"), "format='huggingface' is not 'modse-megatron-export'"),
    "no format": (_set("format", _DELETE), "format=None is not 'modse-megatron-export'"),
    "newer version": (_set("format_version", 2),
                      "format_version=2 is not supported (this reader knows 1): upgrade modse-megatron"),
    "older version": (_set("format_version", 0), "re-export with `modse-convert export` (version 1)"),
    "other architecture": (_set("architecture", "t5"), "architecture='t5' is not supported"),
    "unknown field": (_set("sliding_window", 8), "unknown field 'sliding_window'"),
    "unknown moe field": (_set("moe.num_groups", 2), "unknown field 'moe.num_groups'"),
    "missing field": (_set("hidden_size", _DELETE), "missing field 'hidden_size'"),
    "missing moe field": (_set("moe.expert_widths", _DELETE), "missing field 'moe.expert_widths'"),
    "string for int": (_set("hidden_size", "32"), "field hidden_size='32' is not of type int"),
    "int for bool": (_set("gated_linear_unit", 1), "field gated_linear_unit=1 is not of type bool"),
    "moe not object": (_set("moe", [1]), "field 'moe' must be an object or null"),
    "bad norm": (_set("normalization", "BatchNorm"), "normalization='BatchNorm' is not supported: use one of LayerNorm, RMSNorm"),
    "bad activation": (_set("activation", "tanh"), "activation='tanh' is not supported"),
    "bad dtype": (_set("dtype", "float16"), "dtype='float16' is not supported: use one of float32, bfloat16"),
    "heads vs groups": (_set("num_attention_heads", 3), "num_attention_heads=3 is not a multiple of num_query_groups=2"),
    "zero layers": (_set("num_layers", 0), "num_layers=0 is not positive"),
    "vocab over padded": (_set("vocab_size", 500), "vocab_size=500 exceeds padded_vocab_size=384"),
    "odd rotary dim": (_set("rotary_percent", 0.2), "rotary_percent=0.2 gives 1 rotated channels"),
    "tokenizer outside": (_set("tokenizer", "../tokenizer.json"), "is not a file inside the export"),
    "eod outside vocab": (_set("eod_token_id", 300), "eod_token_id=300 is outside the vocabulary"),
    "widths vs experts": (_set("moe.expert_widths", [8, 8]), "moe.expert_widths has 2 widths for 4 experts"),
    "zero width": (_set("moe.expert_widths", [8, 0, 8, 8]), "has a non-positive width"),
    "moe layer out of range": (_set("moe.moe_layers", [0, 2]), "moe.moe_layers=[0, 2] is not an ascending list"),
    "no moe layers": (_set("moe.moe_layers", []), "moe.moe_layers is empty"),
    "topk too big": (_set("moe.router_topk", 5), "moe.router_topk=5 is outside 1..4"),
    "expert bias with softmax": (_set("moe.expert_bias", True), "moe.expert_bias needs moe.score_function='sigmoid'"),
    "gate without shared": (_set("moe.shared_expert_gate", True), "moe.shared_expert_gate is set without a shared expert"),
    "bad granularity": (_set("moe.routing_granularity", "batch"), "moe.routing_granularity='batch' is not supported"),
    "biased experts": (_set("add_bias_linear", True), "add_bias_linear with MoE layers"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_one_line_error(case, tmp_path):
    change, expected = BAD[case]
    data = copy.deepcopy(_data())
    change(data)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ExportConfigError) as err:
        ExportConfig.from_json(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert expected in message
    assert message.count(": ") >= 2, message  # "<file>: <problem>: <fix>"


def test_unreadable_files(tmp_path):
    with pytest.raises(ExportConfigError, match="does not exist: point at an export directory"):
        ExportConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ExportConfigError, match="is not valid JSON"):
        ExportConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ExportConfigError, match="is not a JSON object"):
        ExportConfig.from_json(tmp_path)
