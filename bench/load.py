"""HTTP load benchmark: starts the release server on an INT8 artifact (bench/serve.py: loopback,
a free port, stopped at the end), then POSTs /embed at each concurrency with two request kinds,
one fixture sentence per request and 32 per request (closed loop: every client sends its next
request when the last one answered), and prints requests/s, sentences/s, p50/p99 latency and
the non-200 count per row, then the server's peak RSS. Standard library only (asyncio,
HTTP/1.1 keep-alive).

Usage: python3 bench/load.py [ARTIFACT_DIR] [--concurrency 1,8,64,256] [--batches 1,32]
    [--seconds 3] [--inference-threads 2]
"""
import argparse
import asyncio
import json
import time
from pathlib import Path

from serve import ROOT, serve

# A row's warm-up lasts until every client has had one answer (a closed loop is in its steady
# state from then on), at least MIN_WARMUP_S and at most MAX_WARMUP_S; its measured window is
# --seconds, or WINDOW_PER_WARMUP x the warm-up where that is longer: a row whose latency is
# that long answers in waves (the queue takes everything waiting as one round), and the window
# must hold one.
MIN_WARMUP_S, MAX_WARMUP_S, WINDOW_PER_WARMUP = 1.0, 30.0, 1.5


class Row:
    """One row's shared state: the measured window (unset during the warm-up), what was answered
    in it, and the clients answered at least once."""

    def __init__(self, concurrency):
        self.start_at = self.stop_at = None
        self.latencies, self.errors = [], []
        self.waiting = concurrency
        self.warm = asyncio.Event()

    def answered(self, sent, done, status, first):
        """Counts a request answered inside the window, whenever it was sent (counting only
        those sent inside it would count none where latency exceeds the window)."""
        if first:
            self.waiting -= 1
            if not self.waiting:
                self.warm.set()
        if self.start_at is not None and self.start_at <= done <= self.stop_at:
            if b" 200 " in status:
                self.latencies.append(done - sent)
            else:
                self.errors.append(status.decode().strip())


async def client(host, port, bodies, row, k):
    """One closed-loop client on its own connection, until cancelled."""
    reader, writer = await asyncio.open_connection(host, port)
    i, first = k, True
    try:
        while True:
            body = bodies[i % len(bodies)]
            i += 7
            req = (f"POST /embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            sent = time.perf_counter()
            writer.write(req)
            await writer.drain()
            status = await reader.readline()
            if not status:
                raise ConnectionError("the server closed the connection")
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            row.answered(sent, time.perf_counter(), status, first)
            first = False
    finally:
        writer.close()


async def level(host, port, bodies, concurrency, seconds):
    """One row: `concurrency` clients, the warm-up, then the measured window; requests still
    unanswered at the end are dropped with their connections (the server skips inputs whose
    client is gone), so a row lasts no longer. Returns requests/s, p50 and p99 ms, answered,
    non-200, warm-up and window seconds."""
    row = Row(concurrency)
    started = time.perf_counter()
    clients = [asyncio.create_task(client(host, port, bodies, row, k)) for k in range(concurrency)]
    warm = asyncio.create_task(row.warm.wait())
    await asyncio.wait([warm, *clients], timeout=MAX_WARMUP_S,
                       return_when=asyncio.FIRST_COMPLETED)
    warm.cancel()
    await asyncio.sleep(max(0.0, started + MIN_WARMUP_S - time.perf_counter()))
    row.start_at = time.perf_counter()
    warmup = row.start_at - started
    window = max(seconds, WINDOW_PER_WARMUP * warmup)
    row.stop_at = row.start_at + window
    await asyncio.wait(clients, timeout=window)
    for task in clients:
        task.cancel()
    for result in await asyncio.gather(*clients, return_exceptions=True):
        if not isinstance(result, asyncio.CancelledError):
            raise result  # a client failed (connection refused, reset): the run fails
    if not row.latencies:
        return 0.0, float("nan"), float("nan"), 0, len(row.errors), warmup, window
    lat = sorted(row.latencies)
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3
    return len(lat) / window, pct(50), pct(99), len(lat), len(row.errors), warmup, window


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", nargs="?", default=ROOT / "bench" / "out" / "artifact-int8")
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--batches", default="1,32", help="sentences per request, one row kind each")
    ap.add_argument("--seconds", type=float, default=3, help="measured seconds per row")
    ap.add_argument("--inference-threads", type=int, default=2)
    a = ap.parse_args()
    levels = [int(v) for v in a.concurrency.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    sentences = json.loads((ROOT / "server/tests/fixtures/sentences.json").read_text())
    # Short and mid-length sentences (the fixtures' longest exceed the model's 256 tokens).
    texts = [s for s in sentences if 0 < len(s) <= 400]
    # Every client has at most one request in flight, so this many admissions never 429.
    admission = max(512, max(levels))
    flags = ["--inference-threads", a.inference_threads, "--max-concurrent-requests", admission,
             "--max-client-batch-size", max(32, max(batches))]
    print(f"server: {Path(a.artifact)}, --inference-threads {a.inference_threads}; admission "
          f"limit --max-concurrent-requests {admission} (429 beyond it) >= {max(levels)} "
          f"clients with one request in flight each, so none is refused for it; "
          f"per row, a warm-up until every client has had an answer ({MIN_WARMUP_S:g}-"
          f"{MAX_WARMUP_S:g} s), then a measured window of {a.seconds:g} s or "
          f"{WINDOW_PER_WARMUP:g} x the warm-up if longer: the requests answered in it\n")
    with serve(a.artifact, flags, ROOT / "bench" / "out" / "load-server.log") as server:
        print("| sentences / request | concurrency | requests/s | sentences/s | p50 ms | p99 ms "
              "| answered | non-200 | warm-up + window s |\n" + "|---" * 9 + "|", flush=True)
        for batch in batches:
            bodies = [json.dumps({"inputs": [texts[(i + j) % len(texts)] for j in range(batch)]
                                  if batch > 1 else texts[i]}).encode()
                      for i in range(len(texts))]
            for c in levels:
                rps, p50, p99, answered, errors, warmup, window = asyncio.run(
                    level(server.host, server.port, bodies, c, a.seconds))
                print(f"| {batch} | {c} | {rps:,.1f} | {rps * batch:,.1f} | {p50:.2f} | "
                      f"{p99:.2f} | {answered} | {errors} | {warmup:.1f} + {window:.1f} |",
                      flush=True)
        print(f"\nserver peak RSS (VmHWM): {server.peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
