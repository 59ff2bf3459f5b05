# Sourced by models/bake and models/bake-operator.
# distroless_base BINARY ROOT: fills ROOT with what gcr.io/distroless/cc-debian12:nonroot holds
# for BINARY (the shared libraries ldd names: libc, libm, libgcc_s, ld-linux; /etc/passwd and
# /etc/group with nonroot 65532; /tmp; /home/nonroot) plus BINARY itself, stripped, at
# /usr/local/bin/<its name>. The image config gives /tmp mode 1777 and /home/nonroot to 65532.
distroless_base() {
  local binary=$1 root=$2 tools
  tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  mkdir -p "$root/etc" "$root/tmp" "$root/home/nonroot" "$root/usr/local/bin"
  local installed=$root/usr/local/bin/$(basename "$binary")
  strip -o "$installed" "$binary"
  chmod 0755 "$installed"
  python3 "$tools/copy_libs.py" "$installed" "$root" >/dev/null
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
}
