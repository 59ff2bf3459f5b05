"""HTTP load benchmark of a running server: POST /embed with one sentence per request, at
each concurrency (closed loop: every client sends its next request when the last answered),
printing requests/s and p50/p99 latency. Standard library only (asyncio, HTTP/1.1 keep-alive).

Usage: python bench/load.py --url http://127.0.0.1:8080 [--concurrency 1,8,64] [--seconds 10]
"""
import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]


async def client(host, port, bodies, start_at, stop_at, latencies, errors, k):
    reader, writer = await asyncio.open_connection(host, port)
    i = k
    try:
        while time.perf_counter() < stop_at:
            body = bodies[i % len(bodies)]
            i += 7
            req = (f"POST /embed HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            t = time.perf_counter()
            writer.write(req)
            await writer.drain()
            status = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            if t >= start_at:
                if b" 200 " in status:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors.append(status.decode().strip())
    finally:
        writer.close()


async def level(host, port, bodies, concurrency, seconds, warmup=1.0):
    latencies, errors = [], []
    now = time.perf_counter()
    start_at, stop_at = now + warmup, now + warmup + seconds
    await asyncio.gather(*(client(host, port, bodies, start_at, stop_at, latencies, errors, k)
                           for k in range(concurrency)))
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3
    return len(latencies) / seconds, pct(50), pct(99), len(errors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    u = urlparse(a.url)
    sentences = json.loads((ROOT / "server/tests/fixtures/sentences.json").read_text())
    # Short and mid-length sentences (the fixtures' longest exceed the model's 256 tokens).
    bodies = [json.dumps({"inputs": s}).encode() for s in sentences if 0 < len(s) <= 400]
    print("| concurrency | requests/s | p50 ms | p99 ms | non-200 |\n|---|---|---|---|---|")
    for c in (int(v) for v in a.concurrency.split(",")):
        rps, p50, p99, errors = asyncio.run(level(u.hostname, u.port or 80, bodies, c, a.seconds))
        print(f"| {c} | {rps:,.1f} | {p50:.2f} | {p99:.2f} | {errors} |", flush=True)


if __name__ == "__main__":
    main()
