"""The release server for bench.py's HTTP part and load.py: `target/release/qmodel-server
serve` on 127.0.0.1 at a free port, stopped when the `with` block ends, whatever happens (an
exception or Ctrl-C: the `finally`; the benchmark itself killed, even by SIGKILL: the kernel's
parent-death signal). Standard library only.
"""
import contextlib
import ctypes
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "target" / "release" / "qmodel-server"
PR_SET_PDEATHSIG = 1


class Server:
    def __init__(self, port, pid):
        self.host, self.port, self.pid = "127.0.0.1", port, pid
        self.url = f"http://{self.host}:{port}"

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def metrics(self):
        """Prometheus text exposition as {series (name and labels): value}."""
        series = {}
        for line in self.get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                series[name] = float(value)
        return series

    def peak_rss_mb(self):
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(kb) / 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the child before exec: SIGTERM it when this process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def serve(artifact, flags, log_path, ready_timeout_s=120):
    """Yields a `Server` once /ready answers 200; `flags` are more `serve` flags."""
    if not SERVER.exists():
        raise SystemExit(f"{SERVER} is missing: cargo build --release -p qmodel-server")
    port = free_port()
    cmd = [str(SERVER), "serve", "--model", str(artifact), "--host", "127.0.0.1",
           "--port", str(port), *map(str, flags)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    try:
        server = Server(port, proc.pid)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready in {ready_timeout_s} s; "
                                   f"see {log_path}")
            try:
                server.get("/ready")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
