"""The reference model on its own (no megatron): KV cache = recomputation, sequence routing
modes, strict loading of exports (one-line errors), dtypes, and no megatron import anywhere."""
import json
import os
import subprocess
import sys

import pytest
import torch

from modse_megatron.inference import ExportError, ReferenceGPT
from modse_megatron.inference.generate import generate

from . import TINY_MOE, random_reference, rel_error, tiny_config, write_export

RTOL = 1e-5
CONFIGS = {
    "moe_rope_gqa": lambda: tiny_config(TINY_MOE),
    "dense_learned_layernorm_gelu_bias": lambda: tiny_config(
        normalization="LayerNorm", activation="gelu", gated_linear_unit=False, add_bias_linear=True,
        position_embedding_type="learned_absolute", tie_word_embeddings=True),
    "moe_shared_gated_sigmoid_bias_every_layer": lambda: tiny_config(dict(
        TINY_MOE, moe_layers=[0, 1], score_function="sigmoid", expert_bias=True,
        shared_expert_intermediate_size=16, shared_expert_gate=True, router_topk=3)),
    "moe_sequence_routing": lambda: tiny_config(dict(TINY_MOE, routing_granularity="sequence")),
}


def _tokens(batch, seq, seed=0, vocab=300):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_kv_cache_equals_recomputation(name):
    """Prefill 5 tokens, then 1, 1 and 3 at a time: the same logits as one causal pass."""
    model = random_reference(CONFIGS[name](), seed=1)
    routing = "causal"  # the only sequence routing a cache can continue (token routing ignores it)
    tokens = _tokens(2, 10)
    full = model(tokens, sequence_routing=routing)
    cache = model.new_cache(2, 10)
    parts = [model(tokens[:, a:b], cache=cache, sequence_routing=routing) for a, b in ((0, 5), (5, 6), (6, 7), (7, 10))]
    assert cache.length == 10
    assert rel_error(torch.cat(parts, dim=1), full) <= RTOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generation_cache_vs_recompute_and_repeatable(name):
    model = random_reference(CONFIGS[name](), seed=2)
    prompt = _tokens(1, 6, seed=4)[0].tolist()
    routing = "causal" if model.config.moe and model.config.moe.routing_granularity == "sequence" else "full"
    cached = generate(model, prompt, 12, sequence_routing=routing)
    assert len(cached) == 12
    assert cached == generate(model, prompt, 12, sequence_routing=routing)
    assert cached == generate(model, prompt, 12, use_cache=False, sequence_routing=routing)


@torch.no_grad()
def test_sequence_routing_full_is_whole_sequence_pooling():
    """full: every token routes by the mean over the WHOLE sequence, so appending a token
    changes earlier tokens' logits; causal: earlier tokens are unaffected by later ones."""
    model = random_reference(CONFIGS["moe_sequence_routing"](), seed=3)
    tokens = _tokens(1, 9)
    full8, full9 = model(tokens[:, :8]), model(tokens)
    assert rel_error(full9[:, :8], full8) > 1e-3
    causal8, causal9 = model(tokens[:, :8], sequence_routing="causal"), model(tokens, sequence_routing="causal")
    assert rel_error(causal9[:, :8], causal8) <= RTOL
    assert rel_error(causal9[:, -1], full9[:, -1]) > 1e-3  # the two definitions differ
    with pytest.raises(ValueError, match="cannot reproduce full-sequence routing"):
        model(tokens, cache=model.new_cache(1, 9))


def test_generation_with_full_sequence_routing_recomputes():
    """Each new token is the argmax of the full-sequence-pooled forward over the current text."""
    model = random_reference(CONFIGS["moe_sequence_routing"](), seed=3)
    prompt = _tokens(1, 5, seed=6)[0].tolist()
    new = generate(model, prompt, 6)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(torch.argmax(model(torch.tensor([ids]))[0, -1, :300])))
    assert new == ids[len(prompt):]


@torch.no_grad()
def test_every_expert_and_width_is_used():
    """The MoE loop runs each expert at its own width on the tokens routed to it."""
    model = random_reference(tiny_config(TINY_MOE), seed=5)
    moe = model.layers[0].mlp
    assert [e.linear_fc2.weight.shape[1] for e in moe.experts] == [48, 16, 40, 24]
    logits = model(_tokens(4, 16))
    for e in range(4):  # silencing any one expert changes the output
        w = moe.experts[e].linear_fc2.weight
        saved = w.clone()
        w.zero_()
        assert rel_error(model(_tokens(4, 16)), logits) > 1e-4, f"expert {e} unused"
        w.copy_(saved)


def test_positions_and_cache_limits():
    model = random_reference(CONFIGS["dense_learned_layernorm_gelu_bias"](), seed=0)
    with pytest.raises(ValueError, match="beyond the model's max_position_embeddings=64"):
        model(_tokens(1, 65))
    with pytest.raises(ValueError, match="KV cache holds 4 positions, 5 needed"):
        model(_tokens(1, 5), cache=model.new_cache(1, 4))
    with pytest.raises(ValueError, match="max_position_embeddings=64: shorten the prompt"):
        generate(model, [1] * 60, 10)
    with pytest.raises(ValueError, match="token ids must be in 0..383"):
        model(torch.tensor([[384]]))


@torch.no_grad()
def test_bfloat16_export_and_compute(tmp_path):
    config = tiny_config(TINY_MOE)
    model = random_reference(config, seed=7)
    tokens = _tokens(2, 8)
    expected = model(tokens)
    bf16_config = tiny_config(TINY_MOE, dtype="bfloat16")
    state = {n: t.to(torch.bfloat16) for n, t in model.export_state_dict().items()}
    path = write_export(tmp_path / "bf16", bf16_config, state)
    ref = ReferenceGPT.from_export(path)
    assert ref.word_embeddings.dtype == torch.bfloat16 and ref.layers[0].mlp.expert_bias is None
    logits = ref(tokens)
    assert logits.dtype == torch.float32 and rel_error(logits, expected) < 5e-2
    as_fp32 = ReferenceGPT.from_export(path, dtype=torch.float32)  # upcast on load
    assert as_fp32.word_embeddings.dtype == torch.float32 and rel_error(as_fp32(tokens), expected) < 5e-2


# ----------------------------------------------------------------------------- bad exports
def _good_export(tmp_path, shards=1):
    config = tiny_config(TINY_MOE)
    model = random_reference(config)
    return write_export(tmp_path / "export", config, model.export_state_dict(), shards=shards), model


def _rewrite(path, change):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


BAD_WEIGHTS = {
    "missing tensor": (lambda t: t.pop("decoder.layers.0.mlp.experts.expert2.linear_fc1.weight"),
                       "lacks tensor decoder.layers.0.mlp.experts.expert2.linear_fc1.weight [80, 32] that its config.json"),
    "wrong shape": (lambda t: t.update({"decoder.layers.0.mlp.experts.expert1.linear_fc2.weight": torch.zeros(32, 17)}),
                    "tensor decoder.layers.0.mlp.experts.expert1.linear_fc2.weight has shape [32, 17] but config.json"),
    "unexpected tensor": (lambda t: t.update({"decoder.layers.1.mlp.router.weight": torch.zeros(4, 32)}),
                          "has tensor decoder.layers.1.mlp.router.weight that its config.json (2-layer GPT, 4 experts"),
    "integer tensor": (lambda t: t.update({"decoder.final_layernorm.weight": torch.ones(32, dtype=torch.int32)}),
                       "tensor decoder.final_layernorm.weight has dtype torch.int32"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_are_one_line_errors(tmp_path, case):
    change, expected = BAD_WEIGHTS[case]
    path, _ = _good_export(tmp_path)
    _rewrite(path, change)
    with pytest.raises(ExportError) as err:
        ReferenceGPT.from_export(path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert "modse-convert export" in str(err.value)


def test_sharded_exports(tmp_path):
    path, model = _good_export(tmp_path, shards=3)
    tokens = _tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(ReferenceGPT.from_export(path)(tokens), model(tokens))
    index_file = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_file))
    name = next(iter(index["weight_map"]))
    other = {"model-00001-of-00003.safetensors": "model-00002-of-00003.safetensors"}
    index["weight_map"][name] = other.get(index["weight_map"][name], "model-00001-of-00003.safetensors")
    json.dump(index, open(index_file, "w"))
    with pytest.raises(ExportError, match=f"puts {name} in model-0000.-of-00003.safetensors but it is in"):
        ReferenceGPT.from_export(path)
    os.remove(os.path.join(path, "model-00003-of-00003.safetensors"))
    with pytest.raises(ExportError, match="shard 'model-00003-of-00003.safetensors' named in .* does not exist"):
        ReferenceGPT.from_export(path)


def test_unreadable_exports(tmp_path):
    path, _ = _good_export(tmp_path)
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ExportError, match="is not a readable safetensors file"):
        ReferenceGPT.from_export(path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(ExportError, match="has neither model.safetensors nor model.safetensors.index.json"):
        ReferenceGPT.from_export(path)
    config = json.load(open(os.path.join(path, "config.json")))
    config["architecture"] = "llama"
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ExportError, match="architecture='llama' is not supported"):
        ReferenceGPT.from_export(path)


def test_reference_model_and_cli_never_import_megatron(tmp_path):
    """model.py / generate.py are megatron-free: running the whole CLI imports no megatron."""
    path, _ = _good_export(tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w1")).save(os.path.join(path, "tok.json"))
    config = json.load(open(os.path.join(path, "config.json")))
    config["tokenizer"] = "tok.json"
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    code = (
        "import sys\n"
        "from modse_megatron.inference.generate import main\n"
        f"main(['--load', {str(path)!r}, '--prompt', 'w5', '--max-new-tokens', '3'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformer_engine', 'apex'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().split()) == 3  # three new word-level tokens
