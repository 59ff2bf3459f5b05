# Sourced by models/bake and models/bake-operator.
# distroless_base BINARY ROOT: fills ROOT with what gcr.io/distroless/cc-debian12:nonroot holds
# for BINARY (the shared libraries ldd names: libc, libm, libgcc_s, ld-linux; /etc/passwd and
# /etc/group with nonroot 65532; /tmp; /home/nonroot) plus BINARY itself, stripped, at
# /usr/local/bin/<its name>. The image config gives /tmp mode 1777 and /home/nonroot to 65532.
# ARCH (third argument, default amd64, this machine's): arm64 takes the libraries from Debian's
# libc6-arm64-cross (/usr/aarch64-linux-gnu/lib) and strips with its cross binutils.
distroless_base() {
  local binary=$1 root=$2 arch=${3:-amd64} tools
  tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  mkdir -p "$root/etc" "$root/tmp" "$root/home/nonroot" "$root/usr/local/bin"
  local installed=$root/usr/local/bin/$(basename "$binary")
  case "$arch" in
    amd64)
      strip -o "$installed" "$binary"
      python3 "$tools/copy_libs.py" "$installed" "$root" >/dev/null ;;
    arm64)
      local sysroot=/usr/aarch64-linux-gnu/lib
      command -v aarch64-linux-gnu-strip >/dev/null && [ -f "$sysroot/libc.so.6" ] || {
        echo "distroless_base: arm64 needs Debian's binutils-aarch64-linux-gnu and libc6-arm64-cross (apt-get install gcc-aarch64-linux-gnu)" >&2
        return 1
      }
      aarch64-linux-gnu-strip -o "$installed" "$binary"
      python3 "$tools/copy_libs.py" --sysroot "$sysroot" --multiarch aarch64-linux-gnu "$installed" "$root" >/dev/null ;;
    *) echo "distroless_base: architecture $arch: expected amd64 or arm64" >&2; return 1 ;;
  esac
  chmod 0755 "$installed"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$root/etc/group"
}
