"""tests/cluster/build's cache: a new clone with the same inputs builds no Go; a changed input
builds everything again.

Each case copies tests/cluster/build and the tools' module files into scratch clones that share
one cache directory. A stand-in Go toolchain records each `go build` (and answers `go version`
and `go list -m`); the package installer and the image baker are stand-ins too: this checks
the cache's keying and restoring, not the Go build itself (tests/run runs that for real).
"""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARIES = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "coredns",
    "kwok",
    "helm",
]

FAKE_GO = """#!/usr/bin/env bash
case "$1" in
version) echo "go version ${FAKE_GO_VERSION:-go1.26.8} linux/amd64" ;;
list)
    case "$*" in
    *'{{.Dir}}'*)
        dir=$FAKE_ROOT/kwok-module
        for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \\
            pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
            mkdir -p "$(dirname "$dir/kustomize/stage/$f")"; echo "kind: Stage" >"$dir/kustomize/stage/$f.yaml"
        done
        echo "$dir" ;;
    *k8s.io/kubernetes*) echo v1.37.2 ;;
    *) echo v0.7.0 ;;
    esac ;;
build)
    while [[ $1 != -o ]]; do shift; done
    echo "$3" >>"$FAKE_ROOT/go-builds"
    echo "binary of $3" >"$2" && chmod +x "$2" ;;
*) echo "fake go: unexpected $*" >&2; exit 1 ;;
esac
"""

FAKE_BAKE = """#!/usr/bin/env bash
mkdir -p "$1" && echo '{}' >"$1/index.json"
"""


def executable(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def clone(tmp_path: Path, name: str) -> Path:
    """A scratch copy of what build reads: the script, the tools' module files, stand-ins."""
    cluster = tmp_path / name / "tests" / "cluster"
    cluster.mkdir(parents=True)
    shutil.copy(ROOT / "tests/cluster/build", cluster / "build")
    shutil.copytree(ROOT / "tests/cluster/tools", cluster / "tools")
    executable(cluster / "packages", "#!/usr/bin/env bash\n")
    executable(cluster / "bake-busybox", FAKE_BAKE)
    return cluster


def build(tmp_path: Path, cluster: Path, *args: str, **env: str):
    executable(tmp_path / "go", FAKE_GO)
    builds = tmp_path / "go-builds"
    builds.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(cluster / "build"), *args],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "GO": str(tmp_path / "go"),
            "FAKE_ROOT": str(tmp_path),
            "QMODEL_CACHE_DIR": str(tmp_path / "cache"),
            "BUILD_NICE": "0",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = builds.read_text().splitlines() if builds.exists() else []
    return result.stdout, built


def test_a_new_clone_with_the_same_inputs_builds_no_go(tmp_path):
    first = clone(tmp_path, "clone-1")
    _, built = build(tmp_path, first)
    assert len(built) == len(BINARIES), built
    second = clone(tmp_path, "clone-2")
    out, built = build(tmp_path, second)
    assert built == [], f"the second clone built {built}"
    assert "restored from" in out, out
    for name in BINARIES:
        assert (second / "bin" / name).read_text().startswith("binary of"), name
    assert (second / "bin/images/pause/index.json").exists()
    assert (second / "bin/kwok-stages.yaml").exists()


@pytest.mark.parametrize(
    "change",
    ["tools/k8s/go.mod", "tools/kwok/go.sum", "tools/coredns/main.go", "build", "go version"],
)
def test_a_changed_input_builds_everything_again(tmp_path, change):
    first = clone(tmp_path, "clone-1")
    build(tmp_path, first)
    second = clone(tmp_path, "clone-2")
    env = {}
    if change == "go version":
        env["FAKE_GO_VERSION"] = "go1.27.0"
    else:
        with open(second / change, "a") as f:
            f.write("\n// changed\n" if change != "build" else "\n# changed\n")
    before = build(tmp_path, first, "--key")[0]
    after = build(tmp_path, second, "--key", **env)[0]
    assert before != after, f"{change} did not change the key"
    out, built = build(tmp_path, second, **env)
    assert len(built) == len(BINARIES), f"after a change to {change}: built {built}\n{out}"
    assert "restored" not in out, out
    # The clone that still has the old inputs keeps its own up-to-date bin/ without building.
    _, built = build(tmp_path, first)
    assert built == []


def test_a_bin_built_from_other_inputs_is_rebuilt_not_reused(tmp_path):
    cluster = clone(tmp_path, "clone")
    build(tmp_path, cluster)
    with open(cluster / "tools/helm/go.mod", "a") as f:
        f.write("\n// changed\n")
    _, built = build(tmp_path, cluster)
    assert len(built) == len(BINARIES), f"a stale bin/ was partly reused: built only {built}"
