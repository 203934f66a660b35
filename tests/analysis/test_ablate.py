"""modse-ablate: grids x seeds through real torchrun runs, resumable, with paired statistics
that match a textbook computation."""
import json
import math
import subprocess
import sys

import pytest

from modse_megatron.analysis.ablate import mean_ci95, paired, param_counts, summarize, t_quantile
from modse_megatron.analysis.stats import t_two_sided_p
from tests.training.test_pretrain import ROOT, TINY


def test_t_distribution_matches_tables():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 9) == pytest.approx(2.2622, abs=1e-4)
    assert t_two_sided_p(2.0, 5) == pytest.approx(0.10194, abs=1e-5)
    assert t_two_sided_p(0.0, 3) == pytest.approx(1.0)


def test_paired_statistics_by_hand():
    deltas = [0.10, 0.12, 0.08]
    mean, half, p = paired(deltas)
    sd = math.sqrt(sum((d - 0.1) ** 2 for d in deltas) / 2)
    t = 0.1 / (sd / math.sqrt(3))
    assert mean == pytest.approx(0.1) and half == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
    assert p == pytest.approx(t_two_sided_p(t, 2)) and p < 0.05
    assert mean_ci95([3.0]) == (3.0, None)
    rows = [{"name": n, "seed": s, "valid_loss": v} for n, s, v in
            [("a", 1, 5.0), ("a", 2, 5.2), ("b", 1, 4.9), ("b", 2, 5.0), ("b", 3, 4.0)]]
    summary = summarize(rows, ["a", "b"])
    assert summary[1]["n"] == 3 and summary[1]["delta_vs_first"] == pytest.approx(-0.15)  # paired on seeds 1, 2
    assert summary[0]["p_value"] is None


def test_uniform_twin_has_the_same_total_and_active_parameters():
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "swiglu": True,
            "disable_bias_linear": True, "num_experts": 8, "moe_ffn_hidden_size": 160, "moe_router_topk": 2}
    modse = param_counts({**base, "moe_expert_size_preset": "paper8"})
    uniform = param_counts({**base, "moe_expert_size_preset": "uniform"})
    assert modse == uniform and modse[0] > modse[1]
    dense = param_counts({k: v for k, v in base.items() if not k.startswith(("num_experts", "moe_"))}
                         | {"ffn_hidden_size": 320})
    assert dense[1] == modse[1] - 2 * 8 * 64  # equal active FLOPs up to the routers


def _ablate(*args):
    return subprocess.run([sys.executable, "-m", "modse_megatron.analysis.ablate", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


@pytest.mark.slow
def test_grid_runs_resumes_and_summarises(data, tmp_path):
    import yaml

    base = {}
    flags = TINY + ["--data-path", data["prefix"], "--tokenizer", data["tokenizer"], "--data-cache-dir", data["cache"]]
    i = 0
    while i < len(flags):
        key = flags[i][2:].replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            base[key] = flags[i + 1] if key != "data_path" else [flags[i + 1]]
            i += 2
        else:
            base[key.removeprefix("no_")] = not key.startswith("no_")
            i += 1
    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "num_experts", "moe_ffn_hidden_size",
                "micro_batch_size", "global_batch_size", "lr_warmup_iters", "eval_interval", "eval_iters"):
        base[key] = int(base[key])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "seeds": [1, 2], "overrides": {"train_iters": 4, "eval_interval": 2},
        "runs": {"top2": {}, "top1": {"moe_router_topk": 1, "moe_router_pre_softmax": True}}, "launcher": {"nproc": 2}}, sort_keys=False))
    out = tmp_path / "out"
    proc = _ablate(tmp_path / "grid.yaml", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["seed"]) for r in results["runs"]] == [("top2", 1), ("top2", 2), ("top1", 1), ("top1", 2)]
    for r in results["runs"]:
        assert r["valid_loss"] > 0 and r["tokens"] == 4 * 8 * 32 and r["params_total"] > r["params_active"]
        valid = [json.loads(x)["lm_loss"] for x in open(r["metrics_path"]) if '"split": "valid"' in x]
        assert r["valid_loss"] == valid[-1]
    top2, top1 = results["summary"]
    by = {(r["name"], r["seed"]): r["valid_loss"] for r in results["runs"]}
    assert top2["valid_loss_mean"] == pytest.approx((by["top2", 1] + by["top2", 2]) / 2)
    assert top1["delta_vs_first"] == pytest.approx((by["top1", 1] - by["top2", 1] + by["top1", 2] - by["top2", 2]) / 2)
    assert (out / "results.md").read_text().startswith("| run |") and (out / "results.png").stat().st_size > 0
    # a crashed run (no done.json) is re-run on --resume; finished ones are skipped
    (out / "top1" / "seed2" / "done.json").unlink()
    proc = _ablate(tmp_path / "grid.yaml", "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done already (--resume)") == 3 and "top1 seed 2: valid loss" in proc.stdout
    assert json.loads((out / "results.json").read_text())["runs"][3]["valid_loss"] == pytest.approx(by["top1", 2])


@pytest.mark.parametrize("grid, message", [
    ({"seeds": [1]}, "needs 'base'"),
    ({"base": "../configs/tiny_cpu.yaml", "runs": {"x": {"num_layer": 2}}}, "unknown option 'num_layer'"),
    ({"base": "../configs/tiny_cpu.yaml", "runs": {}}, "needs 'runs'"),
    ({"base": "../configs/broken.yaml", "runs": {"a": {}}}, "is not valid YAML: fix the syntax"),
    ({"base": "../configs/tiny_cpu.yaml", "runs": {"a": {}}, "seeds": [1, 1]}, "distinct integers"),
])
def test_bad_grids_are_one_line(tmp_path, grid, message):
    import yaml

    (tmp_path / "ablations").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_cpu.yaml").write_text((ROOT / "examples/configs/tiny_cpu.yaml").read_text())
    (tmp_path / "configs" / "broken.yaml").write_text("num_layers: [2\n")
    path = tmp_path / "ablations" / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    proc = _ablate(path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
