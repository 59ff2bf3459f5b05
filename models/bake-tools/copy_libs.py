#!/usr/bin/env python3
"""Copies the shared libraries a dynamically linked binary needs (per `ldd`, plus its ELF
interpreter) into a root filesystem DEST, at the paths the loader looks for them, keeping the
host's symlinks on the way (e.g. Debian's merged /lib -> usr/lib), so DEST holds what
distroless/cc holds for that binary: libc, libm, libgcc_s, ld-linux.

    copy_libs.py BINARY DEST
    copy_libs.py --sysroot DIR --multiarch TRIPLET BINARY DEST

The second form is for a binary of another architecture (ldd cannot run it): its DT_NEEDED
libraries and ELF interpreter (readelf), and theirs, are taken from DIR (a Debian cross
package's library directory, e.g. /usr/aarch64-linux-gnu/lib from libc6-arm64-cross: the same
files as the native arm64 packages) and laid out as a Debian image of that architecture has
them: /usr/lib/TRIPLET/<lib>, the interpreter reachable at its absolute path, /lib -> usr/lib.
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


def readelf(args, path):
    return subprocess.run(["readelf", *args, path], check=True, capture_output=True, text=True).stdout


def foreign(binary, dest, sysroot, triplet):
    """Copies `binary`'s libraries from `sysroot` into the Debian multiarch layout under dest."""
    interp = re.search(r"Requesting program interpreter: (/\S+)\]", readelf(["-lW"], binary))
    if not interp:
        sys.exit(f"copy_libs: {binary}: no ELF interpreter (statically linked?)")
    interp = interp.group(1)
    libdir = os.path.join(dest, "usr/lib", triplet)
    os.makedirs(libdir, exist_ok=True)
    if not os.path.lexists(os.path.join(dest, "lib")):
        os.symlink("usr/lib", os.path.join(dest, "lib"))
    copied, todo = [], [binary, os.path.join(sysroot, os.path.basename(interp))]
    while todo:
        path = todo.pop()
        if path != binary:
            name = os.path.basename(path)
            if name in copied:
                continue
            if not os.path.isfile(path):
                sys.exit(f"copy_libs: {name}: not in {sysroot}")
            shutil.copyfile(path, os.path.join(libdir, name))   # follows the sysroot's symlinks
            os.chmod(os.path.join(libdir, name), 0o755)
            copied.append(name)
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf(["-dW"], path))
        todo += [os.path.join(sysroot, n) for n in needed]
    # The interpreter at the absolute path the binary names (/lib/ld-linux-aarch64.so.1 is
    # /usr/lib/ld-linux-aarch64.so.1 through /lib -> usr/lib, a link into the triplet directory).
    rel = os.path.relpath(interp, "/lib") if interp.startswith("/lib/") else None
    if rel is None:
        sys.exit(f"copy_libs: interpreter {interp} is not under /lib")
    link = os.path.join(dest, "usr/lib", rel)
    if os.path.dirname(link) != libdir and not os.path.lexists(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(libdir, os.path.basename(interp)), os.path.dirname(link)), link)
    print("\n".join(f"/usr/lib/{triplet}/{n}" for n in sorted(copied)))


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
    argv = sys.argv[1:]
    if argv[:1] == ["--sysroot"] and len(argv) == 6 and argv[2] == "--multiarch":
        foreign(argv[4], argv[5], argv[1], argv[3])
    elif len(argv) == 2:
        main(*argv)
    else:
        sys.exit(__doc__)
