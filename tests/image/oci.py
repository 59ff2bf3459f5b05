#!/usr/bin/env python3
"""OCI image layout helpers for tests/image/run and bench/image (stdlib only).

  oci.py unpack LAYOUT ROOTFS CONFIG_OUT [ARCH]
                                           verify every blob's digest and size and each layer's
                                           diff_id, apply the layers in order (whiteouts too)
                                           into ROOTFS, write the image config to CONFIG_OUT;
                                           a multi-platform index: ARCH's manifest (default
                                           amd64), the platform checked in the config too
  oci.py platforms LAYOUT                  the architectures of a layout's image, one per line
  oci.py sizes LAYOUT                      JSON: compressed and uncompressed size of each layer
  oci.py dockerfile-check DOCKERFILE CONFIG
                                           the Dockerfile's final stage (ENTRYPOINT, CMD, USER,
                                           EXPOSE, ENV, LABEL with build args substituted from
                                           the image's labels) must match the image config
"""
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tarfile


def fail(msg):
    sys.exit(f"oci.py: FAIL: {msg}")


def blob(layout, desc):
    algo, digest = desc["digest"].split(":", 1)
    if algo != "sha256":
        fail(f"unsupported digest {desc['digest']}")
    with open(os.path.join(layout, "blobs", algo, digest), "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != digest:
        fail(f"blob {desc['digest']}: content does not match its digest")
    if len(data) != desc["size"]:
        fail(f"blob {desc['digest']}: size {len(data)} != descriptor's {desc['size']}")
    return data


MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def top(layout):
    """The one descriptor index.json names (a manifest, or a multi-platform image index)."""
    with open(os.path.join(layout, "oci-layout")) as f:
        if json.load(f).get("imageLayoutVersion") != "1.0.0":
            fail("oci-layout: imageLayoutVersion is not 1.0.0")
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    if len(index["manifests"]) != 1:
        fail(f"index.json: expected one manifest, found {len(index['manifests'])}")
    return index["manifests"][0]


def platform_manifests(layout):
    """{architecture: manifest descriptor} of the layout's image."""
    desc = top(layout)
    if desc["mediaType"] == MANIFEST:
        return {desc.get("platform", {}).get("architecture", "amd64"): desc}
    if desc["mediaType"] != INDEX:
        fail(f"index.json: media type {desc['mediaType']}")
    out = {}
    for m in json.loads(blob(layout, desc))["manifests"]:
        if m["mediaType"] != MANIFEST or m.get("platform", {}).get("os") != "linux":
            fail(f"image index entry is not a linux image manifest: {m}")
        arch = m["platform"]["architecture"]
        if arch in out:
            fail(f"image index lists {arch} twice")
        out[arch] = m
    return out


def load(layout, arch="amd64"):
    manifests = platform_manifests(layout)
    if arch not in manifests:
        fail(f"no {arch} image in {layout} (it has {sorted(manifests)})")
    mdesc = manifests[arch]
    manifest = json.loads(blob(layout, mdesc))
    config = json.loads(blob(layout, manifest["config"]))
    if config.get("architecture") != arch or config.get("os") != "linux":
        fail(f"{arch} manifest's config says {config.get('os')}/{config.get('architecture')}")
    if len(config["rootfs"]["diff_ids"]) != len(manifest["layers"]):
        fail("config's diff_ids and manifest's layers differ in number")
    return mdesc, manifest, config


def platforms(layout):
    print("\n".join(sorted(platform_manifests(layout))))


def unpack(layout, rootfs, config_out, arch="amd64"):
    _, manifest, config = load(layout, arch)
    os.makedirs(rootfs, exist_ok=True)
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        if desc["mediaType"] != "application/vnd.oci.image.layer.v1.tar+gzip":
            fail(f"layer media type {desc['mediaType']}")
        raw = gzip.decompress(blob(layout, desc))
        if "sha256:" + hashlib.sha256(raw).hexdigest() != diff_id:
            fail(f"layer {desc['digest']}: uncompressed content does not match diff_id {diff_id}")
        tmp = os.path.join(rootfs, ".layer.tar")
        with open(tmp, "wb") as f:
            f.write(raw)
        with tarfile.open(tmp) as tar:
            members = []
            for m in tar.getmembers():
                name = os.path.normpath(m.name)
                if name.startswith("..") or os.path.isabs(name):
                    fail(f"layer entry escapes the root: {m.name}")
                base = os.path.basename(name)
                if base.startswith(".wh."):   # whiteouts: delete from lower layers
                    parent = os.path.join(rootfs, os.path.dirname(name))
                    if base == ".wh..wh..opq":
                        for child in os.listdir(parent):
                            p = os.path.join(parent, child)
                            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                    else:
                        p = os.path.join(parent, base[4:])
                        if os.path.lexists(p):
                            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)
                    continue
                members.append(m)
            tar.extractall(rootfs, members=members, numeric_owner=True, filter="fully_trusted")
        os.remove(tmp)
    with open(config_out, "w") as f:
        json.dump(config, f, indent=1)


def sizes(layout):
    _, manifest, config = load(layout)
    out = []
    for desc in manifest["layers"]:
        out.append({"digest": desc["digest"], "compressed": desc["size"],
                    "uncompressed": len(gzip.decompress(blob(layout, desc)))})
    print(json.dumps(out))


def dockerfile_check(dockerfile, config_path):
    with open(config_path) as f:
        cfg = json.load(f)["config"]
    labels = cfg.get("Labels", {})
    text = open(dockerfile).read().replace("\\\n", " ")
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    final = max(i for i, l in enumerate(lines) if l.upper().startswith("FROM "))
    args = {"MODEL": labels.get("dev.qmodel.model.name"), "MODEL_VERSION": labels.get("dev.qmodel.model.version"),
            "PRECISION": labels.get("dev.qmodel.model.precision"),
            "REVISION": labels.get("org.opencontainers.image.revision")}
    sub = lambda s: re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], s)
    want = {"Entrypoint": None, "Cmd": None, "User": None, "ExposedPorts": {}, "Env": {}, "Labels": {}}
    for line in lines[final + 1:]:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op in ("ENTRYPOINT", "CMD"):
            want[op.capitalize() if op == "CMD" else "Entrypoint"] = json.loads(rest)
        elif op == "USER":
            want["User"] = rest.strip()
        elif op == "EXPOSE":
            for p in rest.split():
                want["ExposedPorts"][p if "/" in p else p + "/tcp"] = {}
        elif op in ("ENV", "LABEL"):
            for kv in shlex.split(rest):
                k, _, v = kv.partition("=")
                want["Env" if op == "ENV" else "Labels"][k] = sub(v)
    problems = []
    for key in ("Entrypoint", "Cmd", "User", "ExposedPorts"):
        if cfg.get(key) != want[key]:
            problems.append(f"{key}: image {cfg.get(key)!r}, Dockerfile {want[key]!r}")
    env = dict(e.split("=", 1) for e in cfg.get("Env", []))
    for k, v in want["Env"].items():
        if env.get(k) != v:
            problems.append(f"Env {k}: image {env.get(k)!r}, Dockerfile {v!r}")
    if labels != want["Labels"]:
        problems.append(f"Labels: image {labels!r}, Dockerfile {want['Labels']!r}")
    if problems:
        fail("the baked image and " + dockerfile + " disagree:\n  " + "\n  ".join(problems))
    print(f"image config matches {dockerfile}'s final stage")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"unpack": unpack, "platforms": platforms, "sizes": sizes, "dockerfile-check": dockerfile_check}[cmd](*rest)
