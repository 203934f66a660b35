"""``modse-generate`` through ``main([...])`` on tiny exports with a real byte-level BPE
tokenizer (trained like the corpus tokenizer): greedy output = an independent full-recompute
argmax decode, EOD stops, seeded sampling, and one-line errors with exit status 2."""
import json
import os
import shutil

import pytest
import torch

from modse_megatron.inference import ReferenceGPT
from modse_megatron.inference.generate import main, next_token

from . import TINY_MOE, random_reference, tiny_config, write_export

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE (vocab 300, <|endoftext|> = 0) trained on real stdlib source."""
    import textwrap

    from modse_megatron.training.tokenizer import train_bpe_tokenizer

    texts = [open(module.__file__, encoding="utf-8").read() for module in (json, shutil, textwrap)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def _export(root, tokenizer_file, name="export", seed=0, **overrides):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    fields = dict(vocab_size=vocab, tokenizer="tokenizer.json", eod_token_id=0)
    fields.update(overrides)
    config = tiny_config(TINY_MOE, **fields)
    model = random_reference(config, seed=seed)
    path = write_export(root / name, config, model.export_state_dict())
    shutil.copy(tokenizer_file, os.path.join(path, "tokenizer.json"))
    return path, model


def _run(capsys, *argv):
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1]


@torch.no_grad()
def _oracle(path, prompt, max_new):
    """Greedy decode without cache, written independently of generate(): argmax over the
    tokenizer's ids of the full forward on the growing sequence, stop at id 0 (EOD)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    model = ReferenceGPT.from_export(path)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    new = []
    for _ in range(max_new):
        token = int(torch.argmax(model(torch.tensor([ids + new]))[0, -1, : tokenizer.get_vocab_size()]))
        if token == 0:
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=False), new


def test_greedy_output_is_deterministic_and_equals_recompute_oracle(tmp_path, tokenizer_file, capsys):
    path, _ = _export(tmp_path, tokenizer_file)
    out = _run(capsys, "--load", path, "--prompt", PROMPT, "--max-new-tokens", 12)
    expected, new = _oracle(path, PROMPT, 12)
    assert out == expected and new
    assert _run(capsys, "--load", path, "--prompt", PROMPT, "--max-new-tokens", 12) == out
    assert _run(capsys, "--load", path, "--prompt", PROMPT, "--max-new-tokens", 12, "--no-kv-cache") == out
    assert _run(capsys, "--load", path, "--prompt", PROMPT, "--max-new-tokens", 12, "--dtype", "float32",
                "--device", "cpu") == out


def test_stops_at_end_of_document(tmp_path, tokenizer_file, capsys):
    """A model whose final hidden state is constant and whose output row for EOD points
    along it always predicts EOD: nothing is generated."""
    path, model = _export(tmp_path, tokenizer_file, normalization="LayerNorm")
    state = model.export_state_dict()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    state["decoder.final_layernorm.weight"] = torch.zeros(32)
    state["decoder.final_layernorm.bias"] = direction
    state["output_layer.weight"][0] = 10 * direction
    write_export(path, model.config, state)
    assert _run(capsys, "--load", path, "--prompt", PROMPT) == ""
    # without a recorded id the EOD is found in the tokenizer by name (<|endoftext|>)
    config = json.load(open(os.path.join(path, "config.json")))
    config["eod_token_id"] = None
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    assert _run(capsys, "--load", path, "--prompt", PROMPT) == ""


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(tmp_path, tokenizer_file, capsys):
    path, _ = _export(tmp_path, tokenizer_file)
    sample = ("--load", path, "--prompt", PROMPT, "--max-new-tokens", 16, "--temperature", 1.5)
    first = _run(capsys, *sample, "--seed", 3)
    assert _run(capsys, *sample, "--seed", 3) == first
    assert _run(capsys, *sample, "--seed", 4) != first
    greedy = _run(capsys, "--load", path, "--prompt", PROMPT, "--max-new-tokens", 16)
    assert _run(capsys, *sample, "--seed", 3, "--top-p", 1e-6) == greedy  # nucleus of one = argmax


def test_next_token_top_p_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))
    gen = torch.Generator().manual_seed(0)
    draws = [next_token(logits, 4, temperature=1.0, top_p=0.7, generator=gen) for _ in range(400)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7, so the nucleus is {0, 1}
    assert 0.5 < draws.count(0) / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625
    assert next_token(torch.tensor([0.0, 1.0, 5.0]), 2) == 1  # padding id 2 never wins


def _error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modse-generate: error: "), err
    return err


def test_errors_are_one_line_with_status_2(tmp_path, tokenizer_file, capsys):
    path, _ = _export(tmp_path, tokenizer_file)
    ok = ("--load", path, "--prompt", PROMPT)
    assert "does not exist" in _error(capsys, "--load", tmp_path / "nope", "--prompt", "x")
    (tmp_path / "empty").mkdir()
    assert "has no config.json and is no training checkpoint" in _error(capsys, "--load", tmp_path / "empty", "--prompt", "x")
    assert "the following arguments are required: --prompt" in _error(capsys, "--load", path)
    assert "--top-p must be in (0, 1]" in _error(capsys, *ok, "--top-p", 0)
    assert "--temperature must be >= 0" in _error(capsys, *ok, "--temperature", -1)
    assert "invalid choice: 'float16'" in _error(capsys, *ok, "--dtype", "float16")
    assert "--prompt encodes to no tokens" in _error(capsys, "--load", path, "--prompt", "")
    if not torch.cuda.is_available():
        assert "no CUDA device is available" in _error(capsys, *ok, "--device", "cuda")
    learned, _ = _export(tmp_path, tokenizer_file, "learned", position_embedding_type="learned_absolute",
                         max_position_embeddings=16)
    assert "max_position_embeddings=16" in _error(capsys, "--load", learned, "--prompt", PROMPT, "--max-new-tokens", 64)
    os.remove(os.path.join(path, "tokenizer.json"))
    assert "lacks its tokenizer file tokenizer.json" in _error(capsys, *ok)
    no_tok, _ = _export(tmp_path, tokenizer_file, "no_tok", tokenizer=None)
    assert "has no tokenizer" in _error(capsys, "--load", no_tok, "--prompt", "x")
    os.remove(os.path.join(no_tok, "model.safetensors"))
    assert "has neither model.safetensors" in _error(capsys, "--load", no_tok, "--prompt", "x")


def test_training_checkpoint_is_exported_first(tmp_path, capsys):
    """A megatron save directory goes through modse_megatron.checkpoint.export; until that
    module exists (or when the checkpoint is unusable) the error is one line."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")
    err = _error(capsys, "--load", ckpt, "--prompt", "x")
    try:
        import modse_megatron.checkpoint.export  # noqa: F401
    except ImportError:
        assert "is a training checkpoint: export it first with `modse-convert export" in err
    else:
        assert f"exporting training checkpoint {ckpt} failed" in err
