#!/usr/bin/env python3
"""Writes an OCI image layout (image-spec v1.1) from directory trees, with the standard library only.

    oci_image.py --out DIR --config config.json --layer ROOT1 [--layer ROOT2 ...] [--ref-name TAG]
    oci_image.py --out DIR --config config.json --image amd64=ROOT1,ROOT2 --image arm64=ROOT3,ROOT2 ...

Each --layer ROOT becomes one gzip-compressed tar layer holding ROOT's contents at / (in order),
of one image for config.json's "architecture" (default amd64). Each --image ARCH=ROOTS is one
image of its own for that architecture; with two or more, DIR/index.json names one multi-platform
image index (the --ref-name) that lists a manifest per platform, as `docker buildx` writes one.
A layer shared by several images (the same ROOT) is one blob.
config.json gives the image's runtime config ("config": Entrypoint, Cmd, Env, User, ...), plus
optional "history" comments (one per layer) and "annotations" for the manifest. Output:
DIR/oci-layout, DIR/index.json, DIR/blobs/sha256/<digest>.

Reproducible: entries sorted, owner root:root unless a path is listed in "owners" of the config
file, mtimes = SOURCE_DATE_EPOCH (default 0), gzip header without name or mtime. The same
inputs give the same digests.
"""
import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile

EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def walk_sorted(root):
    """Paths under root (relative, '/'-separated), parents before children, sorted by name."""
    out = []

    def visit(rel):
        full = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(full)):
            child = f"{rel}/{name}" if rel else name
            out.append(child)
            path = os.path.join(root, child)
            if os.path.isdir(path) and not os.path.islink(path):
                visit(child)

    visit("")
    return out


def layer_tar(root, owners, modes):
    """Uncompressed tar bytes of root, reproducible. owners/modes: {"path": ...} overrides."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in walk_sorted(root):
            path = os.path.join(root, rel)
            st = os.lstat(path)
            info = tarfile.TarInfo(rel)
            info.mtime = EPOCH
            uid, gid = owners.get("/" + rel, (0, 0))
            info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type, info.mode = tarfile.DIRTYPE, modes.get("/" + rel, 0o755)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                executable = st.st_mode & 0o111
                info.mode = modes.get("/" + rel, 0o755 if executable else 0o644)
                info.size = st.st_size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                sys.exit(f"oci_image: {path}: not a file, directory or symlink")
    return buf.getvalue()


class Blobs:
    def __init__(self, out):
        self.dir = os.path.join(out, "blobs", "sha256")
        os.makedirs(self.dir, exist_ok=True)

    def put(self, data, media_type, annotations=None):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.dir, digest), "wb") as f:
            f.write(data)
        desc = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def platform(arch):
    """The OCI platform of a Go/OCI architecture name (arm64 is v8, as registries label it)."""
    p = {"architecture": arch, "os": "linux"}
    if arch == "arm64":
        p["variant"] = "v8"
    return p


def write_image(blobs, spec, arch, roots, layer_cache):
    """Layers, config and manifest of one platform's image; returns the manifest's descriptor."""
    owners = {p: tuple(v) for p, v in spec.get("owners", {}).items()}
    modes = {p: int(v, 8) for p, v in spec.get("modes", {}).items()}
    layers, diff_ids = [], []
    for root in roots:
        if root not in layer_cache:
            raw = layer_tar(root, owners, modes)
            gz = io.BytesIO()
            with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=6) as z:
                z.write(raw)
            layer_cache[root] = ("sha256:" + hashlib.sha256(raw).hexdigest(),
                                 blobs.put(gz.getvalue(), "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_id, desc = layer_cache[root]
        diff_ids.append(diff_id)
        layers.append(desc)

    created = datetime.datetime.fromtimestamp(EPOCH, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": created,
        **platform(arch),
        "config": spec["config"],
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": h} for h in spec.get("history", [])],
    }
    config_desc = blobs.put(canonical(config), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layers,
    }
    if spec.get("annotations"):
        manifest["annotations"] = spec["annotations"]
    desc = blobs.put(canonical(manifest), "application/vnd.oci.image.manifest.v1+json")
    desc["platform"] = platform(arch)
    return desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--layer", action="append", default=[])
    ap.add_argument("--image", action="append", default=[], metavar="ARCH=ROOT[,ROOT...]")
    ap.add_argument("--ref-name")
    args = ap.parse_args()

    with open(args.config) as f:
        spec = json.load(f)
    images = []
    if args.layer:
        images.append((spec.get("architecture", "amd64"), args.layer))
    for image in args.image:
        arch, sep, roots = image.partition("=")
        if not sep or not arch or not roots:
            sys.exit(f"oci_image: --image {image!r}: expected ARCH=ROOT[,ROOT...]")
        images.append((arch, roots.split(",")))
    if not images:
        sys.exit("oci_image: no --layer or --image given")
    archs = [arch for arch, _ in images]
    if len(set(archs)) != len(archs):
        sys.exit(f"oci_image: an architecture given twice: {archs}")

    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    tmp_out = tempfile.mkdtemp(prefix=".oci-", dir=os.path.dirname(os.path.abspath(args.out)))
    blobs = Blobs(tmp_out)
    layer_cache = {}
    manifests = [write_image(blobs, spec, arch, roots, layer_cache) for arch, roots in images]
    ref = {"org.opencontainers.image.ref.name": args.ref_name} if args.ref_name else {}
    if len(manifests) == 1:
        top = manifests[0]
        top.setdefault("annotations", {}).update(ref)
    else:
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": manifests}
        if spec.get("annotations"):
            index["annotations"] = spec["annotations"]
        top = blobs.put(canonical(index), "application/vnd.oci.image.index.v1+json", ref or None)
    if not top.get("annotations"):
        top.pop("annotations", None)
    with open(os.path.join(tmp_out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(tmp_out, "index.json"), "wb") as f:
        f.write(canonical({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": [top]}))
    os.rename(tmp_out, args.out)
    print(top["digest"])


if __name__ == "__main__":
    main()
