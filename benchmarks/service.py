"""Service benchmark: /attack and /encode over HTTP at 1, 8 and 32 concurrent clients, next to
the same pipeline (decode, attack, hash, search, encode the answer) called in-process with the
same batching.

    python benchmarks/service.py                       # starts `hashaudit serve` itself
    python benchmarks/service.py --url http://host:8000 --model fmnist-dpsh-32

The load generator speaks HTTP/1.1 over raw keep-alive sockets with pre-built requests, so the
client costs little CPU (it shares the machine with the server). Each concurrency level runs
for ``--seconds`` after a warm-up; latency is measured per request (send to last byte).
The in-process figure is measured twice: at the batch size the server actually formed in
that run ("same batching") and at ``min(clients, max_batch)`` (the pipeline's best case).
When this script starts the server, it also reads the server's own CPU time (user + system,
from ``/proc``, the server process and every process under it, so ``--workers N`` counts all N)
before and after each load run and reports **server CPU ms per request**: that CPU time
divided by the requests answered in the run (warm-up included, as its CPU is included).
Prints a table and writes ``benchmarks/results/service.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_device_arg,
    add_precision_arg,
    machine,
    pick_device,
    pick_precision,
    print_table,
    wait_ready,
    write_json,
)
from service.api.workers import torch_threads  # noqa: E402
from service.config import Settings  # noqa: E402
from service.images import decode_upload, encode_png  # noqa: E402
from service.serving import BundleService, Query  # noqa: E402
from service.store import ModelStore  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def multipart_request(host: str, path: str, fields: dict[str, str], image: bytes) -> bytes:
    """A complete HTTP/1.1 POST with a multipart body (one image plus text fields)."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                     .encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="q.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    body = b"".join(parts)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length)
    return status, body


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and the processes under it, now."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def load(host: str, port: int, requests: list[bytes], clients: int, seconds: float,
               warmup: float) -> dict[str, Any]:
    """``clients`` keep-alive connections sending ``requests`` round-robin for ``seconds``."""
    answered = [0]  # every response, warm-up included (for CPU per request)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[int, int] = {}
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + seconds

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        i = n
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                writer.write(requests[i % len(requests)])
                i += clients
                status, body = await _read_response(reader)
                t1 = time.perf_counter()
                answered[0] += 1
                if t0 < t_measure:
                    continue
                if status != 200:
                    errors[status] = errors.get(status, 0) + 1
                    continue
                latencies.append(t1 - t0)
                bs = body.find(b'"batch_size":')
                if bs >= 0:
                    batch_sizes.append(int(body[bs + 13:body.find(b",", bs)]))
        finally:
            writer.close()

    await asyncio.gather(*[client(n) for n in range(clients)])
    lat = np.array(latencies) * 1e3
    return {
        "clients": clients, "requests": len(latencies), "answered": answered[0],
        "errors": errors,
        "throughput": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else None,
    }


def in_process(svc: BundleService, pngs: list[bytes], labels: np.ndarray, kind: str,
               method: str | None, eps: float, batch: int, seconds: float) -> dict[str, Any]:
    """Same pipeline without HTTP: decode each PNG, run batches of ``batch``, dump JSON."""
    n_done, t0 = 0, time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        queries = []
        for _ in range(batch):
            pixels, info = decode_upload(pngs[i % len(pngs)], svc.transform, 1 << 24)
            queries.append(Query(pixels, labels[i % len(pngs)], None, 10, info))
            i += 1
        out = (svc.attack(method, eps, queries) if kind == "attack"
               else svc.encode(queries))
        for o in out:
            orjson.dumps(o, option=orjson.OPT_SERIALIZE_NUMPY)
        n_done += batch
    return {"batch": batch, "images": n_done, "throughput": n_done / (time.perf_counter() - t0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument("--model", default="fmnist-dpsh-32")
    p.add_argument("--store", type=Path, default=REPO / "model_store")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--methods", nargs="+", default=["untargeted_gan", "pgd"],
                   help="attack methods to load-test (plus /encode)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1,
                   help="server worker processes (hashaudit serve --workers)")
    p.add_argument("--port", type=int, default=8790, help="port of the server started here")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-in-process", dest="in_process", action="store_false",
                   help="skip the in-process comparison (it does not change with --workers)")
    add_device_arg(p)
    add_precision_arg(p)
    args = p.parse_args()
    # the in-process pipeline, and the server this script starts, run on this device
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)

    # the in-process pipeline gets the CPU threads of one server process (HASHAUDIT_TORCH_THREADS)
    threads = torch_threads(Settings(), args.workers)
    torch.set_num_threads(threads)
    bundle = ModelStore(args.store, device, precision).get(args.model)
    svc = BundleService(bundle)
    q = bundle.queries
    n = min(256, len(q))
    pngs = [encode_png(q.images[i]) for i in range(n)]
    names = bundle.manifest.class_names
    label_fields = [",".join(names[j] for j in np.flatnonzero(q.labels[i])) for i in range(n)]

    server = None
    if args.url is None:
        port = args.port
        env = {**os.environ, "HASHAUDIT_MODEL_STORE": str(args.store),
               "HASHAUDIT_DEFAULT_BUNDLE": args.model, "HASHAUDIT_DEVICE": device,
               "HASHAUDIT_PRECISION": precision,
               "HASHAUDIT_MAX_BATCH": str(args.max_batch),
               "HASHAUDIT_MAX_DELAY_MS": str(args.max_delay_ms)}
        workers = ["--workers", str(args.workers)] if args.workers != 1 else []
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
             "--no-access-log", "--log-level", "warning", *workers], env=env, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
    else:
        url = args.url.rstrip("/")
    host, port = url.split("//", 1)[1].split(":")
    port = int(port)

    rows: list[dict[str, Any]] = []
    try:
        for kind, method in [("attack", m) for m in args.methods] + [("encode", None)]:
            reqs = []
            for i in range(n):
                fields = {"model": args.model, "top_k": "10", "labels": label_fields[i]}
                if kind == "attack":
                    fields.update(method=method, eps="8/255")
                reqs.append(multipart_request(host, f"/{kind}", fields, pngs[i]))
            for c in args.clients:
                la0 = load_avg()
                cpu0 = cpu_seconds(server.pid) if server is not None else None
                r = asyncio.run(load(host, port, reqs, c, args.seconds, args.warmup))
                if server is not None:
                    r["server_cpu_ms_per_request"] = (
                        (cpu_seconds(server.pid) - cpu0) * 1e3 / max(1, r["answered"]))
                r["load_avg_before"], r["load_avg_after"] = la0, load_avg()
                r["load_1m"] = f"{la0[0]}, {r['load_avg_after'][0]}"
                # "same batching": the batch size the server actually formed in this run;
                # also the full max batch, the best the pipeline does in-process
                same = max(1, round(r["mean_batch"] or 1))
                full = min(c, args.max_batch)
                row = {"endpoint": f"/{kind}", "method": method or "-", **r,
                       "same_batch": same, "full_batch": full}
                if args.in_process:
                    t_ip = min(args.seconds, 6.0)
                    ip_same = in_process(svc, pngs, q.labels[:n], kind, method, 8 / 255, same,
                                         t_ip)["throughput"]
                    ip_full = (ip_same if full == same else in_process(
                        svc, pngs, q.labels[:n], kind, method, 8 / 255, full, t_ip)["throughput"])
                    row.update(in_process_same=ip_same, in_process_full=ip_full,
                               ratio_same=r["throughput"] / ip_same,
                               ratio_full=r["throughput"] / ip_full)
                rows.append(row)
                cpu = r.get("server_cpu_ms_per_request")
                line = (f"{row['endpoint']} {row['method']} c={c}: {r['throughput']:.1f} req/s, "
                        f"server CPU {cpu if cpu is None else round(cpu, 2)} ms/request, "
                        f"load average {r['load_avg_before']} -> {r['load_avg_after']}")
                if args.in_process:
                    line += (f", in-process {ip_same:.1f} img/s at batch {same} (ratio "
                             f"{row['ratio_same']:.2f}), {ip_full:.1f} at batch {full} (ratio "
                             f"{row['ratio_full']:.2f})")
                print(line, flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)

    print()
    table = print_table(rows, [
        ("endpoint", "endpoint", ""), ("method", "method", ""), ("clients", "clients", "d"),
        ("throughput", "HTTP req/s", ".1f"), ("p50_ms", "p50 ms", ".1f"),
        ("p95_ms", "p95 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
        ("mean_batch", "server mean batch", ".1f"),
        ("server_cpu_ms_per_request", "server CPU ms/request", ".2f"),
        ("load_1m", "load avg 1 min (before, after)", ""),
        ("in_process_same", "in-process img/s (same batch)", ".1f"),
        ("ratio_same", "HTTP / in-process (same batch)", ".2f"),
        ("full_batch", "max batch", "d"), ("in_process_full", "in-process img/s (max batch)",
                                            ".1f"),
        ("ratio_full", "HTTP / in-process (max batch)", ".2f"),
    ])
    write_json("service", {
        "machine": machine(device, precision), "model": args.model, "url": url,
        "server": "started here" if server is not None else "given by --url",
        "seconds": args.seconds, "workers": args.workers, "in_process_torch_threads": threads,
        "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms, "rows": rows,
        "table": table,
    }, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
