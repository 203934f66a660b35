"""``modse-convert`` on real checkpoints (saved by torchrun runs), and the checkpoints it writes
resumed by ``modse-pretrain`` under other layouts with the losses of the original layout."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_pretrain import ROOT, TINY, _error_lines, losses, ok, torchrun  # noqa: F401

pytestmark = pytest.mark.slow

RTOL = 1e-5
EP2 = [*TINY, "--expert-model-parallel-size", "2", "--moe-expert-placement", "pairs"]


def without(args, *flags):
    """``args`` minus each ``flag value`` pair."""
    out = list(args)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out


def convert(*args, check=True, subprocess_=False):
    """``modse-convert ARGS`` -> CompletedProcess. In this process (``main(argv)`` with stdout
    and stderr captured: saves a megatron import per call) unless ``subprocess_``; tests that
    need the real command line (console script, exit codes of a fresh interpreter) ask for it."""
    argv = [str(a) for a in args]
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "modse_megatron.checkpoint.convert", *argv],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
    else:
        from modse_megatron.checkpoint.convert import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv) or 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        proc = subprocess.CompletedProcess(["modse-convert", *argv], code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """EP=2 MoDSE run: checkpoints at iterations 2 and 4 (iteration 2 is resumed below)."""
    out = tmp_path_factory.mktemp("ep2")
    ok(torchrun([*EP2, "--train-iters", "4", "--save-interval", "2", "--log-dir", str(out), "--save", str(out / "ckpt")],
                data=data))
    start = out / "start"
    start.mkdir()
    shutil.copytree(out / "ckpt" / "iter_0000002", start / "iter_0000002")
    (start / "latest_checkpointed_iteration.txt").write_text("2")
    return out


def test_inspect(saved):
    report = json.loads(convert("inspect", saved / "ckpt", "--json", subprocess_=True).stdout)  # the real CLI
    assert report["iteration"] == 4 and report["path"].endswith("iter_0000004")
    assert report["layout"] == {"tp": 1, "pp": 1, "ep": 2, "etp": 1, "dp": 2, "world_size": 2}
    experts = report["moe_layers"][0]["experts"]
    assert [e["width"] for e in experts] == [96, 32, 80, 48]
    ranks = [e["rank"] for e in experts]
    assert sorted(ranks) == [0, 0, 1, 1] and ranks[0] == ranks[1]  # pairs: 96+32 and 80+48 share a rank
    assert report["optimizer"] == {"present": True, "format": "fully_reshardable"}
    assert report["rng_present"] and report["data_position"] == {"consumed_samples": 32}
    text = convert("inspect", saved / "ckpt" / "iter_0000002").stdout
    assert "iteration    2" in text and "EP 2" in text and "0: width 96 on rank" in text


# ------------------------------------------------------------------ resume under other layouts
@pytest.fixture(scope="module")
def reference(data, saved):
    """Resuming at the saved layout (EP=2): iterations 3 and 4."""
    out = saved / "resume_ep2"
    ok(torchrun([*EP2, "--train-iters", "4", "--load", str(saved / "start"), "--log-dir", str(out)], data=data))
    return losses(out)


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "1"],
    ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1"],
    ["--moe-expert-placement", "0,1,1,0;1,0,1,0"],  # one placement per MoE layer
], ids=["tp2-ep1", "pp2", "placement"])  # EP=1 alone: tests/training/test_replan_training.py
def test_full_checkpoint_resumes_under_another_layout(data, saved, reference, tmp_path, layout):
    """Model + optimizer + scheduler + data position: the losses equal the EP=2 resume."""
    ok(torchrun([*EP2, *layout, "--train-iters", "4", "--load", str(saved / "start"), "--log-dir", str(tmp_path)],
                data=data))
    resumed = losses(tmp_path)
    assert list(resumed) == [3, 4]
    for it in resumed:
        assert abs(resumed[it] - reference[it]) <= RTOL * abs(reference[it]), (it, resumed, reference)


def test_reshard_proves_and_writes_the_target(data, saved, reference, tmp_path):
    out = tmp_path / "tp2"
    proc = convert("reshard", saved / "start", out, "--tensor-model-parallel-size", "2")
    assert "checked 2 target ranks (TP 2 PP 1 EP 1 ETP 2 DP 1, world 2)" in proc.stdout
    assert "RNG streams are re-derived" in proc.stdout
    report = json.loads(convert("inspect", out, "--json").stdout)
    assert report["layout"]["tp"] == 2 and not report["rng_present"] and report["optimizer"]["present"]
    assert convert("verify", out, saved / "start").returncode == 0
    log = tmp_path / "log"
    ok(torchrun([*TINY, "--tensor-model-parallel-size", "2", "--sequence-parallel", "--train-iters", "4",
                 "--load", str(out), "--log-dir", str(log)], data=data))
    resumed = losses(log)
    for it in resumed:
        assert abs(resumed[it] - reference[it]) <= RTOL * abs(reference[it]), (it, resumed, reference)


@pytest.mark.parametrize("flags, message", [
    (["--tensor-model-parallel-size", "3"], "is not divisible by --tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "4"], "--num-layers 2 is not divisible by --pipeline-model-parallel-size 4"),
    (["--expert-model-parallel-size", "3"], "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
])
def test_reshard_refuses_layouts_that_do_not_divide(saved, tmp_path, flags, message):
    proc = convert("reshard", saved / "start", tmp_path / "out", *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_reshard_drop_optimizer_and_dtype(data, saved, tmp_path):
    out = tmp_path / "light"
    convert("reshard", saved / "start", out, "--drop-optimizer", "--dtype", "bf16")
    report = json.loads(convert("inspect", out, "--json").stdout)
    assert not report["optimizer"]["present"] and report["model"]["bf16"]
    assert report["tensors"]["model"]["bytes"] * 2 == json.loads(
        convert("inspect", saved / "start", "--json").stdout)["tensors"]["model"]["bytes"]
    log = tmp_path / "log"
    ok(torchrun([*TINY, "--bf16", "--train-iters", "3", "--load", str(out), "--log-dir", str(log)], data=data))
    assert list(losses(log)) == [3]  # iteration, scheduler and data position carried; fresh Adam moments


# ------------------------------------------------------------------ export / import / verify
def test_export_import_verify(data, saved, tmp_path):
    from safetensors import safe_open

    export = tmp_path / "export"
    convert("export", saved / "start", export, "--max-shard-size", "200KB")
    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((export / f).is_file() for f in files)
    config = json.loads((export / "config.json").read_text())
    assert config["moe"]["expert_widths"] == [96, 32, 80, 48] and config["tokenizer"] == "tokenizer.json"
    assert (export / "tokenizer.json").is_file()
    shapes = {}
    for f in files:
        with safe_open(str(export / f), framework="pt") as handle:
            shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})
    for layer in (0, 1):  # one tensor per logical expert weight, at its own width
        for e, width in enumerate([96, 32, 80, 48]):
            assert shapes[f"decoder.layers.{layer}.mlp.experts.expert{e}.linear_fc1.weight"] == (2 * width, 64)
            assert shapes[f"decoder.layers.{layer}.mlp.experts.expert{e}.linear_fc2.weight"] == (64, width)
    imported = tmp_path / "imported"
    convert("import", export, imported)
    assert convert("verify", saved / "start", imported).returncode == 0
    assert convert("verify", export, imported).returncode == 0
    assert "complete and intact" in convert("verify", imported).stdout
    # the import starts training under another layout (weights only: iteration 0)
    log = tmp_path / "log"
    ok(torchrun([*TINY, "--expert-model-parallel-size", "2", "--train-iters", "2", "--load", str(imported),
                 "--tokenizer", str(imported / "tokenizer.json"), "--log-dir", str(log)], data=data))
    assert list(losses(log)) == [1, 2]


def _rewrite_export(src: Path, dst: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        change(tensors)
        save_file(tensors, str(f), metadata={"format": "pt"})


def _one_element(t):
    name = "decoder.layers.1.mlp.experts.expert2.linear_fc2.weight"
    t[name][3, 5] += 1e-3


def test_verify_names_the_difference(saved, tmp_path):
    export = tmp_path / "export"
    convert("export", saved / "start", export)
    changed = tmp_path / "changed"
    _rewrite_export(export, changed, _one_element)
    proc = convert("verify", export, changed, check=False)
    assert proc.returncode == 1
    assert "decoder.layers.1.mlp.experts.expert2.linear_fc2.weight: 1 of 5120 values differ" in proc.stdout
    missing = tmp_path / "missing"
    _rewrite_export(export, missing, lambda t: t.pop("decoder.layers.0.mlp.experts.expert3.linear_fc1.weight"))
    proc = convert("verify", export, missing, check=False)
    assert proc.returncode == 2 and "lacks tensor decoder.layers.0.mlp.experts.expert3.linear_fc1.weight" in proc.stderr
    wider = tmp_path / "wider"
    _rewrite_export(export, wider, lambda t: t.update({"decoder.layers.0.mlp.experts.expert1.linear_fc2.weight":
                                                      torch.zeros(64, 40)}))
    proc = convert("verify", export, wider, check=False)
    assert proc.returncode == 2 and "expert1.linear_fc2.weight has shape [64, 40]" in proc.stderr


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_a_checkpoint", "is not a checkpoint"),
    ("truncated", "is truncated"),
    ("other_architecture", "config.json and the weights disagree"),
])
def test_bad_input_is_one_line(saved, tmp_path, case, message):
    out = tmp_path / "out"
    if case == "missing":
        proc = convert("export", tmp_path / "nope", out, check=False, subprocess_=True)
    elif case == "not_a_checkpoint":
        (tmp_path / "empty").mkdir()
        proc = convert("inspect", tmp_path / "empty", check=False)
    elif case == "truncated":
        ckpt = tmp_path / "ckpt"
        shutil.copytree(saved / "start" / "iter_0000002", ckpt)
        big = max(ckpt.glob("__*.distcp"), key=lambda p: p.stat().st_size)
        big.write_bytes(big.read_bytes()[:1000])
        proc = convert("verify", ckpt, check=False)
    else:
        export = tmp_path / "export"
        convert("export", saved / "start", export)
        config = json.loads((export / "config.json").read_text())
        config["hidden_size"] = 96
        (export / "config.json").write_text(json.dumps(config))
        proc = convert("import", export, out, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modse-convert: error:") and message in lines[0], proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_crafted_checkpoint_is_refused_by_convert(saved, tmp_path):
    from tests.training.test_reliability import _craft

    ckpt = tmp_path / "evil"
    shutil.copytree(saved / "start" / "iter_0000002", ckpt)
    marker = tmp_path / "pwned"
    _craft(ckpt, "common", marker)
    proc = convert("inspect", ckpt, check=False, subprocess_=True)
    assert proc.returncode == 2 and "refusing to load" in proc.stderr and "io.open" in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------ megatron checkpoints
def test_megatron_uniform_moe_imports_as_the_twin(data, tmp_path):
    """megatron's own MoE layer (SequentialMLP experts, stacked [L, E, ...]) at EP=2 -> our
    uniform twin; training from it at EP=1 gives megatron's losses at EP=2."""
    uniform = without(TINY, "--moe-expert-widths")
    src = tmp_path / "megatron"
    ok(torchrun([*uniform, "--moe-layer-impl", "megatron", "--expert-model-parallel-size", "2", "--train-iters", "2",
                 "--save", str(src), "--log-dir", str(tmp_path / "l0")], data=data))
    imported = tmp_path / "twin"
    convert("import", "--from", "megatron", src, imported)
    report = json.loads(convert("inspect", imported, "--json").stdout)
    assert [e["width"] for e in report["moe_layers"][0]["experts"]] == [64] * 4
    assert report["model"]["moe_layer_impl"] == "modse"
    assert convert("verify", src, imported).returncode == 0  # the same tensors under our names
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    ok(torchrun([*uniform, "--moe-layer-impl", "megatron", "--expert-model-parallel-size", "2", "--train-iters", "2",
                 "--load", str(src), "--finetune", "--log-dir", str(theirs)], data=data))
    ok(torchrun([*uniform, "--moe-expert-widths", "64,64,64,64", "--train-iters", "2", "--load", str(imported),
                 "--log-dir", str(ours)], data=data))
    a, b = losses(theirs), losses(ours)
    assert list(a) == list(b) == [1, 2]
    for it in a:
        assert abs(a[it] - b[it]) <= RTOL * abs(a[it]), (a, b)


def test_dense_upcycling_reproduces_the_dense_ffn(data, tmp_path):
    """Dense -> MoDSE (widths 96,32,80,48 partition the FFN of 256): with top-k = all experts
    and a zero router (uniform probabilities 1/E; fc2 scaled by E) the model's logits equal
    the dense model's."""
    from modse_megatron.inference.model import ReferenceGPT

    dense_args = [*without(TINY, "--num-experts", "--moe-expert-widths", "--moe-ffn-hidden-size"),
                  "--ffn-hidden-size", "256"]
    src = tmp_path / "dense"
    ok(torchrun([*dense_args, "--train-iters", "2", "--save", str(src), "--log-dir", str(tmp_path / "l")], data=data))
    up = tmp_path / "up"
    convert("import", "--from", "megatron", src, up, "--upcycle-widths", "96,32,80,48", "--upcycle-topk", "4",
            "--upcycle-router", "zero")
    convert("export", src, tmp_path / "dense_export")
    convert("export", up, tmp_path / "up_export")
    dense = ReferenceGPT.from_export(tmp_path / "dense_export")
    moe = ReferenceGPT.from_export(tmp_path / "up_export")
    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    a, b = dense(tokens), moe(tokens)
    assert float((a - b).norm() / a.norm()) <= 1e-6
    # and it trains under modse-pretrain (EP=2)
    ok(torchrun([*TINY, "--moe-router-topk", "4", "--expert-model-parallel-size", "2", "--train-iters", "2",
                 "--load", str(up), "--log-dir", str(tmp_path / "l2")], data=data))
