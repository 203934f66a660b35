"""``modse-plan``: table and JSON output, input formats, one-line errors with status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modse_megatron.placement import PlanOptions
from modse_megatron.placement.cli import build_parser, main

from .test_layout import without_planner

ROOT = Path(__file__).resolve().parents[2]
MODSE = ["--ratios", "4.5:0.5,4.0:1.0,3.0:2.0,2.5:2.5", "--unit", "256"]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_by_default(capsys):
    code, out, _ = run(capsys, *MODSE, "--ranks", "4")
    assert code == 0
    assert "rank" in out and "memory" in out and "compute" in out and "gap 0.000%" in out
    assert "memory equal" in out


def test_json_single_layer(capsys):
    code, out, _ = run(capsys, "--widths", "1152,128,1024,256", "--loads", "10,3,7,9",
                       "--ranks", "2", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["sizes"] == [1152, 128, 1024, 256]
    assert sorted(plan["rank_of_expert"]) == [0, 0, 1, 1]
    assert {"max_compute", "lower_bound", "gap", "optimal", "moved_bytes"} <= plan.keys()


@pytest.mark.parametrize(
    "content, layers",
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], 1),
        ({"loads": [1, 2, 3, 4, 5, 6, 7, 8]}, 1),
        ({"layers": [[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1], [0] * 8]}, 3),
    ],
)
def test_loads_from_file(capsys, tmp_path, content, layers):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps(content))
    code, out, _ = run(capsys, *MODSE, "--loads-from", str(path), "--ranks", "2", "--json")
    data = json.loads(out)
    assert code == 0
    assert len(data["layers"]) == layers if layers > 1 else "rank_of_expert" in data


def test_many_layers_table_and_hierarchy(capsys, tmp_path):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"layers": [list(range(1, 17)), list(range(16, 0, -1))]}))
    code, out, _ = run(capsys, *MODSE, "--repeat", "2", "--loads-from", str(path),
                       "--ranks", "4", "--ranks-per-node", "2", "--details")
    assert code == 0
    assert "2 layers: mean gap" in out and "layer 1" in out and "node inflow" in out


def test_previous_placement(capsys):
    code, out, _ = run(capsys, "--widths", "1,2,3,4", "--ranks", "2", "--previous", "0,1,1,0",
                       "--json")
    assert code == 0 and json.loads(out)["moved_bytes"] == 0.0


def test_move_slack_flag(capsys):
    """--move-slack reaches the planner (the instance of test_plan_api's move_slack test)."""
    rng = np.random.default_rng(11)
    loads = ",".join(map(repr, rng.lognormal(size=64).tolist()))
    previous = ",".join(map(str, rng.permutation(np.repeat(np.arange(8), 8)).tolist()))
    argv = ["--widths", ",".join(["1"] * 64), "--loads", loads, "--ranks", "8",
            "--previous", previous, "--json"]
    moved = []
    for slack in ("0", "0.05"):
        code, out, _ = run(capsys, *argv, "--move-slack", slack)
        assert code == 0
        moved.append(json.loads(out)["moved_bytes"])
    assert moved == [46.0, 28.0]


def test_flag_defaults_are_the_api_defaults():
    args = build_parser().parse_args(["--widths", "1", "--ranks", "1"])
    defaults = PlanOptions()
    assert (args.balance, args.bytes_per_param, args.move_slack, args.replicas) == (
        defaults.balance, defaults.bytes_per_param, defaults.move_slack, defaults.num_replicas)
    assert (args.joint_counts, args.stack_copies, args.groups) == (
        defaults.joint_counts, defaults.stack_copies, defaults.num_groups)


def test_missing_planner_is_one_line(capsys, monkeypatch):
    without_planner(monkeypatch, "libstdc++.so.6: version `GLIBCXX_3.4.32' not found")
    with pytest.raises(SystemExit) as info:
        main(["--widths", "1,2", "--ranks", "2"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("modse-plan: error: the C++ placement planner")
    assert "GLIBCXX_3.4.32" in err and "pip install -e ." in err


def test_replicas_table_and_json(capsys):
    argv = ["--widths", "1152,128,1024,256", "--loads", "40,3,7,9", "--ranks", "3",
            "--replicas", "2"]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "copies: 0 x2 on ranks" in out and "2 slots/rank (4 experts + 2 replicas)" in out
    assert "memory equal" in out
    code, out, _ = run(capsys, *argv, "--json")
    plan = json.loads(out)
    assert plan["num_replicas"] == 2 and plan["copies_per_expert"][0] == 2
    assert sum(plan["copies_per_expert"]) == 6 and len(plan["slot_expert"]) == 6
    assert len(plan["ranks_of_expert"][0]) == 2


def test_joint_counts_and_stacking_flags(capsys):
    """The issue's example: greedy counts 49.5, joint counts 39.5; stacking takes 6 replicas."""
    argv = ["--widths", "1,1,1,1", "--loads", "26,2,23,27", "--ranks", "2", "--json"]
    plans = {}
    for extra in ([], ["--no-joint-counts"], ["--joint-counts"]):
        code, out, _ = run(capsys, *argv, "--replicas", "2", *extra)
        assert code == 0
        plans[tuple(extra)] = json.loads(out)
    assert plans[()]["max_compute"] == plans[("--joint-counts",)]["max_compute"] == 39.5
    assert plans[("--no-joint-counts",)]["max_compute"] == 49.5
    code, out, _ = run(capsys, *argv, "--replicas", "6", "--stack-copies")
    plan = json.loads(out)
    assert code == 0 and plan["max_compute"] == 39.0 and max(plan["copies_per_expert"]) > 2


def test_groups_flag(capsys):
    code, out, _ = run(capsys, *MODSE, "--repeat", "4", "--loads", ",".join(["9"] * 8 + ["1"] * 24),
                       "--ranks", "8", "--ranks-per-node", "2", "--groups", "4", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["memory_balanced"]
    nodes: dict[int, set[int]] = {}
    for e, ranks in enumerate(plan["ranks_of_expert"]):
        nodes.setdefault(e // 8, set()).update(r // 2 for r in ranks)
    assert sorted(nodes) == [0, 1, 2, 3] and all(len(v) == 1 for v in nodes.values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--widths", "1,1", "--ranks", "2", "--replicas", "4"], "or stack_copies"),
        (["--widths", "1,1,1,1", "--ranks", "4", "--ranks-per-node", "2", "--groups", "3"],
         "num_groups=3 does not divide"),
        (["--widths", "1,2,3", "--ranks", "2", "--replicas", "2"], "5 slots is not divisible"),
        (["--widths", "9,1,8,2", "--ranks", "5", "--replicas", "1"], "num_replicas=1 is odd"),
        (["--widths", "1,2", "--ranks", "2", "--replicas", "-2"], "num_replicas=-2"),
        (["--widths", "1,2,3", "--ranks", "2"], "not divisible by num_ranks=2"),
        (["--widths", "1,2", "--loads", "1,nan", "--ranks", "2"], "loads[1]=nan"),
        (["--widths", "1,2", "--loads", "1", "--ranks", "2"], "loads has 1 entries"),
        (["--widths", "1,2", "--ranks", "0"], "num_ranks=0"),
        (["--widths", "1,2", "--ranks", "2", "--ranks-per-node", "3"], "does not divide"),
        (["--ratios", "4.5:0.5", "--ranks", "1"], "--ratios needs --unit"),
        (["--ratios", "4.3:0.7", "--unit", "256", "--ranks", "1"], "not an integer width"),
        (["--widths", "1,x", "--ranks", "1"], "comma-separated numbers"),
        (["--widths", "1,2", "--ranks", "2", "--bogus"], "unrecognized arguments"),
        (["--ranks", "2"], "required"),
        (["--widths", "1,2", "--loads-from", "/nonexistent.json", "--ranks", "2"], "cannot read"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("modse-plan: error: ") and message in err
    assert err.count("\n") == 1


def test_bad_json_file(capsys, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit):
        main(["--widths", "1,2", "--loads-from", str(path), "--ranks", "2"])
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize(
    "entry", [["-m", "modse_megatron.placement.cli"], ["tools/plan_placement.py"]]
)
def test_runs_as_a_program(entry):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, *entry, *MODSE, "--ranks", "2", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["paired"] is True
