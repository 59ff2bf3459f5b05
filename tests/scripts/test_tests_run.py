"""tests/run's own failure path: a step that fails stops the run at that step, with its name.

Each case copies tests/run into a scratch tree where every command it runs (models/fetch, cargo,
the cluster scripts, .venv/bin/python, ...) is a small recording script, and one of them exits 3.
The run must exit non-zero, name that step, and run nothing after it. A passing case runs every
step, so the recorded order also pins what tests/run does.
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What tests/run invokes, relative to the repository root ("cargo" is found on PATH).
COMMANDS = [
    "models/fetch",
    "tests/python-env",
    ".venv/bin/python",
    "tests/cluster/build",
    "tests/cluster/up",
    "tests/cluster/node-check",
    "tests/cluster/down",
    "tests/cluster/check-clean",
    "tests/cuda/run",
    "tests/arm/run",
    "tests/image/run",
    "bin/cargo",
]

# Every step tests/run announces, in order (its time table lists them so).
STEPS = [
    line.split('step "', 1)[1].rsplit('"', 1)[0]
    for line in (ROOT / "tests" / "run").read_text().splitlines()
    if line.startswith('step "')
]

RECORDER = """#!/usr/bin/env bash
name={name}
echo "$name $*" >>"$CALLS"
if [[ "$name $*" == "$FAIL_CALL"* ]]; then echo "$name: failing on purpose" >&2; exit 3; fi
if [[ $name == tests/cluster/up ]]; then echo "export KUBECONFIG=$PWD/kubeconfig"; fi
exit 0
"""


def scratch_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "repo"
    (tree / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "run", tree / "tests" / "run")
    for command in COMMANDS:
        path = tree / command
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(RECORDER.format(name=command.removeprefix("bin/")))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return tree


def run_tests_run(tmp_path: Path, fail_call: str):
    tree = scratch_tree(tmp_path)
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{tree / 'bin'}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "FAIL_CALL": fail_call,
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        ["bash", str(tree / "tests" / "run")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return result, recorded


def test_every_step_runs_when_nothing_fails(tmp_path):
    result, calls = run_tests_run(tmp_path, fail_call="(nothing)")
    assert result.returncode == 0, result.stderr
    order = [
        c.split()[0] + (" " + c.split()[1] if c.startswith(("cargo", "tests/cluster/check-clean")) else "")
        for c in calls
    ]
    assert order.index("tests/cluster/build") < order.index("tests/cluster/up")
    assert order.index("tests/cluster/check-clean snapshot") < order.index("tests/cluster/up")
    assert order.index("cargo build") < order.index("tests/cluster/up") < order.index("cargo test")
    assert order.index("tests/cluster/up") < order.index("tests/cluster/node-check") < order.index("cargo test")
    # After the e2e tests: down, then the check that it left nothing; the exit trap is gone by then.
    last_test = len(order) - 1 - order[::-1].index("cargo test")
    assert order[last_test + 1 : last_test + 3] == ["tests/cluster/down", "tests/cluster/check-clean compare"], order
    assert order.count("tests/cluster/down") == 1, order
    assert order[-3:] == ["tests/arm/run", "tests/image/run", "tests/cuda/run"], order
    # The time table at the end names every step once, then the total.
    table = result.stderr[result.stderr.index("tests/run: passed; time per step:") :].splitlines()[1:]
    assert [row.split(" s  ", 1)[1] for row in table] == STEPS + ["total"], table


@pytest.mark.parametrize(
    ("fail_call", "step"),
    [
        ("models/fetch", "Model checkpoint"),
        ("cargo clippy", "Format and lint"),
        ("cargo build", "Build (release, all targets)"),
        ("tests/cluster/build", "Control plane and real-node binaries"),
        ("tests/cluster/check-clean snapshot", "Cluster for the end-to-end tests"),
        ("tests/cluster/up", "Cluster for the end-to-end tests"),
        ("tests/cluster/node-check", "Real node"),
        ("cargo test", "Rust tests"),
        ("tests/cluster/check-clean compare", "Cluster down leaves nothing behind"),
        ("tests/arm/run", "Arm (aarch64) under qemu-user"),
        ("tests/image/run", "Baked image"),
        ("tests/cuda/run", "CUDA build without a GPU"),
    ],
)
def test_a_failing_step_stops_the_run_there(tmp_path, fail_call, step):
    result, calls = run_tests_run(tmp_path, fail_call)
    assert result.returncode != 0, f"tests/run passed although {fail_call} failed:\n{result.stderr}"
    assert f"FAIL at step '{step}" in result.stderr, result.stderr
    # The time table is printed on failure too, ending with the failed step.
    assert f"tests/run: FAILED at step '{step}" in result.stderr, result.stderr
    table = result.stderr[result.stderr.index("; time per step:") :].splitlines()[1:]
    assert table[-2].split(" s  ", 1)[1].startswith(step), table
    failed_at = next(i for i, c in enumerate(calls) if c.startswith(fail_call))
    after = [c for c in calls[failed_at + 1 :] if not c.startswith("tests/cluster/down")]
    assert after == [], f"tests/run went on after {fail_call} failed: {after}"
    # Once tests/cluster/up was called, the cluster is torn down whatever failed: by the exit trap,
    # or by the down step itself when the check after it failed.
    if any(c.startswith("tests/cluster/up") for c in calls):
        up = next(i for i, c in enumerate(calls) if c.startswith("tests/cluster/up"))
        assert any(c.startswith("tests/cluster/down") for c in calls[up + 1 :]), calls
