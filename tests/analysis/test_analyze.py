"""``modse-analyze`` end to end: in process on synthetic metrics and on exports of reference
models with planted routing over a small built-in-style corpus; one slow test on a real tiny
torchrun run (metrics.jsonl + checkpoints). Bad input: one line naming the fix, exit code 2."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from modse_megatron.analysis import analyze, topics
from tests.inference import TINY_MOE, random_reference, tiny_config, write_export

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = [48, 16, 40, 24]  # TINY_MOE's
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small stdlib packages/modules: a corpus of ~10 documents and 5 topics, built in about a second.
SOURCES = ["json", "dbm", "bisect.py", "colorsys.py", "shlex.py"]
# A synthetic metrics.jsonl (iteration -> tokens per logical expert of MoE layers 1 and 2).
STEPS = {1: {"1": [8, 4, 2, 2], "2": [1, 2, 3, 10]}, 2: {"1": [6, 2, 4, 4], "2": [3, 3, 3, 7]},
         3: {"1": [1, 1, 1, 13], "2": [4, 4, 4, 4]}}


def run(argv, capsys):
    """``modse-analyze ARGV`` in process: (exit code, stdout, stderr)."""
    try:
        code = analyze.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def error(argv, capsys) -> str:
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("modse-analyze: error: ") and err.count("\n") == 1, (code, err)
    return err


def write_metrics(directory: Path, steps=STEPS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for it, tokens in steps.items():
        rows.append({"iteration": it, "lm_loss": 6.0, "lr": 1e-3, "tokens_per_sec": 1.0, "step_time_s": 0.1,
                     "grad_norm": 1.0, "skipped": False, "skipped_nonfinite": 0, "tokens_per_expert": tokens})
        if it == 2:
            rows.append({"iteration": 2, "event": "replan", "layer": "all", "placement": [0, 1, 1, 0],
                         "moved_experts": 2})
            rows.append({"iteration": 2, "split": "valid", "lm_loss": 5.5})
    path = directory / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(path: Path, **extra) -> Path:
    """A modse-pretrain YAML of the tiny export architecture (what modse-ablate leaves in a run)."""
    config = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 16, "num_experts": 4,
              "moe_expert_widths": WIDTHS, "moe_ffn_hidden_size": 32, "swiglu": True, "disable_bias_linear": True,
              "expert_model_parallel_size": 2, "moe_expert_placement": "pairs", **extra}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A built-in corpus (the real builder, meta.json and all) over a few stdlib sources."""
    from modse_megatron.training.corpus import builtin_corpus

    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    for name in SOURCES:
        if name.endswith(".py"):
            src.mkdir(exist_ok=True)
            shutil.copyfile(STDLIB / name, src / name)
        else:
            shutil.copytree(STDLIB / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "test*"))
    prefix, tokenizer = builtin_corpus(cache_dir=str(root / "cache"), vocab_size=300, source_root=str(src))
    return {"prefix": prefix, "tokenizer": tokenizer, "src": src}


def planted_export(path: Path, granularity="token") -> Path:
    """Sigmoid router with zero weights and expert bias [0, 0, 1, 2] in both layers: every token
    goes to experts 3 and 2 (widths 24 and 40) with probability 1/2 each."""
    config = tiny_config(dict(TINY_MOE, moe_layers=[0, 1], score_function="sigmoid", expert_bias=True,
                              routing_granularity=granularity))
    model = random_reference(config, seed=6)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router_weight.zero_()
            layer.mlp.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 2.0]))
    return Path(write_export(path, config, model.export_tensors()))


def random_export(path: Path, seed: int, granularity="token", **moe) -> Path:
    config = tiny_config(dict(TINY_MOE, moe_layers=[0, 1], routing_granularity=granularity, **moe))
    return Path(write_export(path, config, random_reference(config, seed=seed).export_tensors()))


MODEL_ARGS = ["--split", "all", "--seq-length", "16", "--max-sequences", "24", "--batch-size", "8"]


# ----------------------------------------------------------------------------- metrics only
def test_metrics_only_run(tmp_path, capsys):
    write_metrics(tmp_path / "run")
    code, out, _ = run([tmp_path / "run", "--out", tmp_path / "out", "--expert-widths", "48,16,40,24"], capsys)
    assert code == 0 and "modse-analyze: wrote" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    share = report["token_share_by_width"]
    assert share["iterations"] == 3 and list(share["layers"]) == ["1", "2", "all"]
    # Layer 1 over the run: experts [15, 7, 7, 19] of widths 48, 16, 40, 24.
    assert share["layers"]["1"]["tokens_by_width"] == {"16": 7, "24": 19, "40": 7, "48": 15}
    assert share["layers"]["all"]["share"]["24"] == pytest.approx((19 + 21) / 96)
    assert report["token_share_over_time"]["iterations"] == [1, 2, 3]
    assert report["last_valid_loss"] == {"iteration": 2, "split": "valid", "lm_loss": 5.5}
    assert set(report["skipped"]) == {"difficulty_by_width", "router_entropy", "routing_stability", "specialisation",
                                      "rank_compute"}
    assert set(report["rank_compute"]) == {"logged_by_training"}  # the replan event; no placement to apply
    assert sorted(report["plots"]) == ["token_share_by_width.png", "token_share_over_time.png"]
    assert all((tmp_path / "out" / p).stat().st_size > 0 for p in report["plots"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| layer | w=16 | w=24 | w=40 | w=48 | mean width |" in md and "Last validation loss: 5.5000" in md


def test_run_config_gives_placement_and_rank_compute(tmp_path, capsys):
    """A run directory as modse-ablate leaves it (config.yaml next to metrics.jsonl): widths and
    the EP placement come from the config; the replan event is reported, the final placement noted."""
    write_metrics(tmp_path / "run")
    run_config(tmp_path / "run" / "config.yaml")
    assert run([tmp_path / "run", "--out", tmp_path / "out"], capsys)[0] == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rank = report["rank_compute"]
    assert rank["from_metrics"]["placement"] == [0, 0, 1, 1] and rank["from_metrics"]["ep"] == 2
    layer1 = rank["from_metrics"]["layers"]["1"]
    assert layer1["compute"] == [15 * 48 + 7 * 16, 7 * 40 + 19 * 24]
    assert layer1["max_over_mean"] == pytest.approx(max(layer1["compute"]) / (sum(layer1["compute"]) / 2))
    assert rank["logged_by_training"]["replans"] == [{"iteration": 2, "layer": "all", "placement": [0, 1, 1, 0],
                                                      "moved_experts": 2}]
    assert any("re-planned" in n for n in report["notes"])
    assert "rank_compute.png" in report["plots"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "on the training tokens in metrics.jsonl (EP 2, placement [0, 0, 1, 1])" in md
    assert "- iteration 2: re-planned to placement [0, 1, 1, 0] (2 experts moved)" in md


# ----------------------------------------------------------------------------- exports
def test_planted_routing_on_an_export(tmp_path, corpus, capsys):
    export = planted_export(tmp_path / "export")
    metrics = write_metrics(tmp_path / "run")
    config = run_config(tmp_path / "run.yaml")
    code, _, _ = run([export, "--data", corpus["prefix"], "--metrics", metrics, "--config", config,
                      "--checkpoint-b", export, "--out", tmp_path / "out", *MODEL_ARGS], capsys)
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["expert_widths"] == WIDTHS and report["model"]["moe_layers"] == [1, 2]
    assert report["inputs"]["sequences"] == 24 and report["inputs"]["seq_length"] == 16
    diff = report["difficulty_by_width"]
    assert diff["tokens"] == 24 * 16 and sum(d["tokens"] for d in diff["deciles"]) == 24 * 16
    for layer in ("1", "2"):
        assert diff["layers"][layer]["mass_by_width"] == {"16": [0.0] * 10, "24": [0.5] * 10, "40": [0.5] * 10,
                                                          "48": [0.0] * 10}
        assert diff["layers"][layer]["spearman"]["rho"] is None
        assert report["router_entropy"][layer]["normalized"] == pytest.approx(1.0)
        assert report["routing_stability"][layer] == {"top1_changed": 0.0, "topk_set_changed": 0.0, "tokens": 384}
    # Every token on experts 2 and 3, both on EP rank 1 (pairs): rank 1 does all the work.
    eval_rank = report["rank_compute"]["from_eval_routing"]["layers"]["1"]
    assert eval_rank["compute"] == [0.0, 384 * 40 + 384 * 24] and eval_rank["max_over_mean"] == pytest.approx(2.0)
    assert report["token_share_by_width"]["layers"]["1"]["tokens_by_width"] == {"16": 7, "24": 19, "40": 7, "48": 15}
    spec = report["specialisation"]
    assert spec["unit"] == "token" and spec["sequences"] == 24
    assert sum(spec["topic_counts"].values()) == 24 and set(spec["topic_counts"]) <= {"json", "dbm", "bisect", "colorsys", "shlex"}
    for layer in spec["layers"].values():
        assert [e["units"] for e in layer["experts"]] == [0, 0, 384, 384]  # each token reaches both
        assert layer["nmi"] == 0.0 or layer["nmi"] is None  # one top-1 expert: no information
    md = (tmp_path / "out" / "report.md").read_text()
    for title in ("## Share of routed tokens", "## Harder tokens -> larger experts?", "## Router entropy and stability",
                  "analysed data", "## Specialisation by topic"):
        assert title in md
    assert sorted(report["plots"]) == ["difficulty_by_width.png", "rank_compute.png", "specialisation.png",
                                       "token_share_by_width.png", "token_share_over_time.png"]


def test_sequence_routing_specialisation_and_stability(tmp_path, corpus, capsys):
    a = random_export(tmp_path / "a", seed=1, granularity="sequence")
    b = random_export(tmp_path / "b", seed=2, granularity="sequence")
    code, _, _ = run([a, "--data", corpus["prefix"], "--checkpoint-b", b, "--out", tmp_path / "out", *MODEL_ARGS], capsys)
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    spec = report["specialisation"]
    assert spec["unit"] == "sequence" and spec["sequences"] == 24
    for layer in spec["layers"].values():
        assert sum(e["units"] for e in layer["experts"]) == 24 * 2  # each sequence reaches its 2 experts
        assert 0.0 <= layer["nmi"] <= 1.0 and layer["nmi_shuffled_mean"] is not None
    assert {topics.topic_of(f) for f in spec["files"]} == set(spec["topic_counts"])
    for layer in ("1", "2"):
        changed = report["routing_stability"][layer]
        assert 0.0 < changed["top1_changed"] <= changed["topk_set_changed"] <= 1.0  # two random routers differ
    assert {"token_share_by_width", "rank_compute"} <= set(report["skipped"])


def test_topics_replay_the_corpus_build(corpus):
    from modse_megatron.training.corpus import stdlib_documents
    from modse_megatron.training.data import check_indexed_dataset
    from modse_megatron.training.tokenizer import load_tokenizer

    info = check_indexed_dataset(corpus["prefix"])
    sources, reason = topics.replay_builtin(corpus["prefix"], info.num_documents)
    assert reason == "" and sources.texts == list(stdlib_documents(str(corpus["src"])))
    assert {sources.topic(d) for d in range(info.num_documents)} == {"json", "dbm", "bisect", "colorsys", "shlex"}
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(corpus["prefix"])
    tokenizer = load_tokenizer(corpus["tokenizer"])
    assert topics.verify(sources, range(info.num_documents), lambda d: dataset[d], tokenizer) == ""
    assert "does not re-tokenise" in topics.verify(sources, [1], lambda d: dataset[0], tokenizer)
    assert "the sources changed" in topics.replay_builtin(corpus["prefix"], info.num_documents + 1)[1]
    assert topics.topic_of("email/mime/text.py") == "email" and topics.topic_of("enum.py") == "enum"


def test_topics_without_a_builtin_corpus(tmp_path):
    assert "not a built-in corpus" in topics.replay_builtin(str(tmp_path / "data"), 10)[1]
    (tmp_path / "meta.json").write_text(json.dumps({"source": str(tmp_path / "gone"), "builder_version": 1}))
    assert "no longer exists" in topics.replay_builtin(str(tmp_path / "data"), 10)[1]


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_naming_the_fix(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    write_metrics(run_dir)
    assert "does not exist: give a run's --log-dir" in error([tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    (tmp_path / "empty").mkdir()
    assert "has no metrics.jsonl and is not a checkpoint" in error([tmp_path / "empty", "--out", tmp_path / "o"], capsys)
    assert "--config YAML or --expert-widths" in error([run_dir, "--out", tmp_path / "o"], capsys)
    assert "not a list of positive integers" in error([run_dir, "--out", tmp_path / "o", "--expert-widths", "4,x"], capsys)
    assert "lists 4 expert counts but the model has 2" in error([run_dir, "--out", tmp_path / "o", "--expert-widths", "4,4"],
                                                                capsys)
    (tmp_path / "file").write_text("")
    assert "is a file: give a directory" in error([run_dir, "--out", tmp_path / "file", "--expert-widths", "1,2,3,4"], capsys)
    assert "--max-sequences must be >= 1" in error([run_dir, "--out", tmp_path / "o", "--max-sequences", "0"], capsys)
    assert "is not a file: give the metrics.jsonl" in error([run_dir, "--out", tmp_path / "o", "--metrics", tmp_path], capsys)
    (tmp_path / "bad.yaml").write_text("num_layers: 2\nnot_an_option: 1\n")
    assert "unknown option 'not_an_option'" in error([run_dir, "--out", tmp_path / "o", "--config", tmp_path / "bad.yaml"],
                                                     capsys)
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\nnot json\n{"iteration": 2}\n')
    assert "line 2 is not a metrics row" in error([run_dir, "--out", tmp_path / "o", "--expert-widths", "1,2"], capsys)
    for name in ("a", "b"):  # two --save roots in one run directory
        (tmp_path / "two" / name).mkdir(parents=True)
        (tmp_path / "two" / name / "latest_checkpointed_iteration.txt").write_text("1")
    write_metrics(tmp_path / "two")
    assert "several checkpoint roots (a, b): choose one with --checkpoint" in error([tmp_path / "two", "--out", tmp_path / "o"],
                                                                                   capsys)
    assert not (tmp_path / "o").exists() or not (tmp_path / "o" / "report.json").exists()


def test_bad_model_input_is_one_line(tmp_path, corpus, capsys):
    export = random_export(tmp_path / "e", seed=3)
    data = ["--data", corpus["prefix"], "--out", tmp_path / "o"]
    assert "neither a checkpoint" in error([export, *data, "--checkpoint-b", tmp_path], capsys)
    other = random_export(tmp_path / "other", seed=3, expert_widths=[40, 24, 48, 16])
    assert "has other experts" in error([export, *data, *MODEL_ARGS, "--checkpoint-b", other], capsys)
    # The default split 98,1,1 of ~10 documents leaves the test split none.
    assert "the test split of '98,1,1' has no documents" in error([export, *data, "--split", "test"], capsys)
    assert "has seq_length + 1 = 100001 tokens: use a smaller --seq-length" in error(
        [export, *data, "--split", "all", "--seq-length", "100000"], capsys)
    assert "does not exist; check --data-path" in error([export, "--data", tmp_path / "nodata", "--out", tmp_path / "o"],
                                                        capsys)
    dense = tiny_config(None)
    write_export(tmp_path / "dense", dense, random_reference(dense).export_tensors())
    assert "nothing to analyse" in error([tmp_path / "dense", *data, *MODEL_ARGS], capsys)
    big = tiny_config(TINY_MOE, vocab_size=100, padded_vocab_size=128)
    write_export(tmp_path / "small_vocab", big, random_reference(big).export_tensors())
    assert "vocabulary has 128 rows" in error([tmp_path / "small_vocab", *data, *MODEL_ARGS], capsys)


# ----------------------------------------------------------------------------- a real run
@pytest.mark.slow
def test_tiny_torchrun_run_end_to_end(tmp_path, corpus):
    """modse-pretrain (2 gloo ranks, EP=2, pair placement, sequence-level routing) on a built-in
    corpus (split 50,40,10: a valid split of several topics), checkpoints at 3 and 6, then `modse-analyze RUN --checkpoint-b iter 3`: every section,
    consistent with metrics.jsonl."""
    from tests.training.test_pretrain import TINY

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pretrain = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "modse_megatron.pretrain", "--data-path", corpus["prefix"], "--tokenizer", corpus["tokenizer"],
                "--data-cache-dir", str(tmp_path / "cache"), *TINY, "--expert-model-parallel-size", "2",
                "--moe-expert-placement", "pairs", "--moe-routing-granularity", "sequence", "--train-iters", "6",
                "--save-interval", "3", "--eval-interval", "3", "--split", "50,40,10", "--log-dir", str(run_dir),
                "--save", str(run_dir / "checkpoints")]
    proc = subprocess.run(pretrain, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "modse_megatron.analysis.analyze", str(run_dir), "--out", str(out),
                           "--checkpoint-b", str(run_dir / "checkpoints" / "iter_0000003"), "--max-sequences", "32"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"wrote {out / 'report.json'}, {out / 'report.md'} and 5 plots" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["checkpoint"].endswith("iter_0000006") and report["inputs"]["data"] == corpus["prefix"]
    assert not report["skipped"], report["skipped"]
    for name in report["plots"] + ["report.md"]:
        assert (out / name).stat().st_size > 0

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r and "event" not in r]
    widths = [96, 32, 80, 48]
    share = report["token_share_by_width"]
    assert share["iterations"] == len(train) == 6
    # every EP>1 MoDSE run logs both ranks' expert seconds and the compute imbalance it sees
    assert all(len(r["expert_seconds_per_rank"]) == 2 and min(r["expert_seconds_per_rank"]) > 0 for r in train)
    assert len(report["rank_compute"]["logged_by_training"]["values"]) == 6
    for layer in ("1", "2"):
        counts = [sum(r["tokens_per_expert"][layer][e] for r in train) for e in range(4)]
        assert sum(counts) == 6 * 8 * 32 * 2  # steps x sequences x tokens x top-2
        by_width = {str(w): c for w, c in zip(widths, counts)}
        assert share["layers"][layer]["tokens_by_width"] == by_width
        assert sum(share["layers"][layer]["share"].values()) == pytest.approx(1.0)
        # Pairs: (96, 32) on EP rank 0, (80, 48) on rank 1.
        compute = report["rank_compute"]["from_metrics"]["layers"][layer]
        assert compute["compute"] == [counts[0] * 96 + counts[1] * 32, counts[2] * 80 + counts[3] * 48]
        assert compute["max_over_mean"] >= 1.0
        assert report["rank_compute"]["from_eval_routing"]["layers"][layer]["max_over_mean"] >= 1.0
        for w in share["layers"][layer]["share"]:
            series = report["token_share_over_time"]["layers"][layer][w]
            assert len(series) == 6 and all(0 <= v <= 1 for v in series)
        entropy = report["router_entropy"][layer]
        assert 0 < entropy["normalized"] <= 1.0
        stability = report["routing_stability"][layer]
        assert 0 <= stability["top1_changed"] <= 1 and stability["tokens"] == 32 * 32
    assert report["last_valid_loss"] == [r for r in rows if r.get("split") == "valid"][-1]
    diff = report["difficulty_by_width"]
    assert diff["tokens"] == 32 * 32 and len(diff["deciles"]) == 10
    for b in range(10):
        assert sum(diff["all_layers"]["mass_by_width"][str(w)][b] for w in widths) == pytest.approx(1.0)
    assert -1 <= diff["all_layers"]["spearman"]["rho"] <= 1
    spec = report["specialisation"]
    assert spec["unit"] == "sequence" and sum(spec["topic_counts"].values()) == 32
    assert spec["topics"] >= 2  # the valid split (documents 8..14 of 17) spans several packages
    assert all(0 <= v["nmi"] <= 1 for v in spec["layers"].values())
    md = (out / "report.md").read_text()
    assert "sequence-level learned router" in md and "## Specialisation by topic" in md
    print(md)
