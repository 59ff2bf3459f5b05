#!/usr/bin/env python3
"""Copies the shared libraries a dynamically linked binary needs (per `ldd`, plus its ELF
interpreter) into a root filesystem DEST, at the paths the loader looks for them, keeping the
host's symlinks on the way (e.g. Debian's merged /lib -> usr/lib), so DEST holds what
distroless/cc holds for that binary: libc, libm, libgcc_s, ld-linux.

    copy_libs.py BINARY DEST
"""
import os
import re
import shutil
import subprocess
import sys


def add(path, dest, seen):
    """Recreates absolute host path `path` under dest: directories as directories, symlinks as
    symlinks (and their targets too), regular files as copies."""
    if path in seen or path == "/":
        return
    seen.add(path)
    parent = os.path.dirname(path)
    add(parent, dest, seen)
    target = dest + path
    if os.path.islink(path):
        link = os.readlink(path)
        if not os.path.lexists(target):
            os.symlink(link, target)
        add(os.path.normpath(os.path.join(parent, link)), dest, seen)
    elif os.path.isdir(path):
        os.makedirs(target, exist_ok=True)
    elif os.path.isfile(path):
        shutil.copy2(path, target)
        os.chmod(target, 0o755)
    else:
        sys.exit(f"copy_libs: {path}: missing on this machine")


def main(binary, dest):
    out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    paths = []
    for line in out.splitlines():
        if "not found" in line:
            sys.exit(f"copy_libs: {binary}: {line.strip()}")
        m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            paths.append(m.group(1))
        elif "linux-vdso" not in line and "statically linked" not in line:
            sys.exit(f"copy_libs: unexpected ldd line: {line!r}")
    if not paths:
        sys.exit(f"copy_libs: {binary}: no shared libraries (statically linked?)")
    seen = set()
    for path in paths:
        add(path, dest, seen)
    print("\n".join(paths))


if __name__ == "__main__":
    main(*sys.argv[1:])
