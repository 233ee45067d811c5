"""Load test of the explanation service on loopback: N requests from C concurrent clients, bounded in time.

    python benchmarks/service_load.py                      # 200 requests, 8 clients, 32 px phantom model
    python benchmarks/service_load.py --size 64 --json load.json
    python benchmarks/service_load.py --stalled 0 --bombs 0   # the normal phase only

Starts the service in this process (uvicorn in a thread, a free port on
127.0.0.1) with a smallcnn and a NEMt explainer trained for one epoch on
phantoms, then sends phantom PNGs (``format=png``, all labels) from client
threads, each with its own HTTP connection. Prints the latency percentiles,
the throughput, the errors, the lost requests (sent without an answer; must
be 0), the server's own time split, the process's peak resident memory
(VmHWM) before and after the load, and whether any upload folder was left
behind.

Then a hostile phase: the same normal load again while ``--stalled``
connections (default 24, more than workers + queue) send their headers and
the start of a body, then one byte a second, reconnecting when answered,
and ``--bombers`` clients post, in a loop, a 69-byte PNG that declares
10000x10000 pixels. The normal requests must all be answered as before; each
stalled body must be answered 408 once ``--body-timeout`` has passed, each
bomb 413 from its header (the peak memory shows nothing was decoded).

Exits 1 when a normal request is lost or gets an error, or a hostile one
gets another answer than expected, or an upload folder is left behind.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import torch


def vm(field: str) -> float:
    """A /proc/self/status memory figure in MiB (VmHWM: peak resident; VmRSS: resident now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build(root: Path, size: int) -> tuple:
    from typer.testing import CliRunner

    from nemt.cli import app as cli
    from nemt.data import write_phantom_dataset

    manifest = write_phantom_dataset(root / "data", 48, size, seed=0)
    runner = CliRunner()
    for args in (["train", "--data", str(manifest), "--out", str(root / "m"), "--arch", "smallcnn",
                  "--size", str(size), "--epochs", "1", "--batch-size", "8", "--no-progress"],
                 ["fit", "--model", str(root / "m"), "--data", str(manifest), "--out", str(root / "e"),
                  "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw", "--no-progress"]):
        res = runner.invoke(cli, args)
        if res.exit_code:
            raise SystemExit(res.output)
    return root / "m", root / "e", sorted((root / "data" / "images").glob("*.png"))


def png_bomb(width: int = 10000, height: int = 10000) -> bytes:
    """A valid PNG header declaring width x height grey pixels, with a few bytes of data (69 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def normal_load(url: str, payloads: list, n: int, clients: int, deadline: float) -> tuple[list[dict], float]:
    """``n`` explain requests from ``clients`` threads (one connection each); the records and the wall time."""
    counter = itertools.count()
    lock = threading.Lock()
    records: list[dict] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= n:
                    return
                name, data = payloads[i % len(payloads)]
                rec = {"i": i, "sent": True}
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/explain", files={"file": (name, data)})
                    rec.update(status=r.status_code, ms=(time.perf_counter() - t0) * 1000)
                    if r.status_code == 200:
                        rec["server"] = r.json()["ms"]
                except httpx.HTTPError as exc:
                    rec.update(status=None, error=f"{type(exc).__name__}: {exc}")
                with lock:
                    records.append(rec)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t_start


def summarise(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    lat = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r.get("status"))
        statuses[key] = statuses.get(key, 0) + 1
    server = {k: round(float(np.median([r["server"][k] for r in ok])), 2)
              for k in ("receive", "queue", "read", "predict", "explain", "encode", "total")} if ok else {}
    return {"requests_sent": len(records), "ok": len(ok), "errors": len(records) - len(ok), "statuses": statuses,
            "lost": sum(1 for r in records if r.get("status") is None),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                           "p90": round(float(np.percentile(lat, 90)), 1),
                           "p99": round(float(np.percentile(lat, 99)), 1), "max": round(float(lat.max()), 1)},
            "throughput_rps": round(len(ok) / wall, 1), "wall_s": round(wall, 2), "server_median_ms": server}


def _status(answer: bytes) -> str:
    """The status code of a raw HTTP answer ('closed' when the server closed without one)."""
    parts = answer.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 and answer.startswith(b"HTTP/") else "closed"


def stalled_client(url: str, stop: threading.Event, out: list, lock: threading.Lock) -> None:
    """Headers and the start of a multipart body, then one byte a second until answered; again until ``stop``."""
    u = urlparse(url)
    head = (f"POST /v1/explain HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Length: 1000000\r\n"
            "Content-Type: multipart/form-data; boundary=nemtb\r\n\r\n--nemtb\r\n"
            "Content-Disposition: form-data; name=\"file\"; filename=\"slow.png\"\r\n\r\n\x89PNG").encode()
    while not stop.is_set():
        t0 = time.monotonic()
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(head)
            s.settimeout(1.0)
            answer = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    if stop.is_set() and not answer:
                        outcome = "stopped"  # the phase ended before the server's timeout: not counted
                        break
                    try:
                        s.sendall(b"x")  # one byte a second
                    except OSError:
                        outcome = _status(answer)
                        break
                    continue
                except OSError:
                    outcome = _status(answer)
                    break
                if not chunk:
                    outcome = _status(answer)
                    break
                answer += chunk
        if outcome != "stopped":
            with lock:
                out.append({"status": outcome, "held_s": time.monotonic() - t0})


def bomber(url: str, stop: threading.Event, out: list, lock: threading.Lock) -> None:
    """Posts a small PNG declaring 10000x10000 pixels, again and again until ``stop``."""
    data = png_bomb()
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/explain", files={"file": ("bomb.png", data)})
                rec = {"status": r.status_code, "ms": (time.perf_counter() - t0) * 1000}
            except httpx.HTTPError as exc:
                rec = {"status": None, "error": f"{type(exc).__name__}: {exc}"}
            with lock:
                out.append(rec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="phantom and model input size (px)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase; no request is started after it")
    ap.add_argument("--stalled", type=int, default=24, help="hostile phase: stalled connections (0: no hostile phase)")
    ap.add_argument("--bombers", type=int, default=2, help="hostile phase: clients posting oversized-dimension PNGs")
    ap.add_argument("--body-timeout", type=float, default=3.0, help="the service's body timeout (s)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from nemt.deploy.service import build_explainers, create_app, running
    from nemt.models import load_model

    hostile: dict = {}
    with tempfile.TemporaryDirectory(prefix="nemt-load-") as tmp:
        model_dir, explainer_dir, images = build(Path(tmp), args.size)
        payloads = [(p.name, p.read_bytes()) for p in images]
        clf = load_model(model_dir)
        app = create_app(clf, build_explainers(clf, explainer_dir), workers=args.workers, queue=args.queue,
                         body_timeout=args.body_timeout)
        upload_root = Path(tempfile.gettempdir())
        left_before = set(upload_root.glob("nemt-upload-*"))
        with running(app) as url:
            with httpx.Client(base_url=url, timeout=60) as warm:  # first requests build caches
                for name, data in payloads[:3]:
                    warm.post("/v1/explain", files={"file": (name, data)}).raise_for_status()
            hwm_before, rss_before = vm("VmHWM"), vm("VmRSS")
            records, wall = normal_load(url, payloads, args.requests, args.clients,
                                        time.monotonic() + args.time_limit)
            hwm_after, rss_after = vm("VmHWM"), vm("VmRSS")
            if args.stalled or args.bombers:
                stop, lock = threading.Event(), threading.Lock()
                stalled: list[dict] = []
                bombs: list[dict] = []
                hostiles = ([threading.Thread(target=stalled_client, args=(url, stop, stalled, lock), daemon=True)
                             for _ in range(args.stalled)]
                            + [threading.Thread(target=bomber, args=(url, stop, bombs, lock), daemon=True)
                               for _ in range(args.bombers)])
                for t in hostiles:
                    t.start()
                time.sleep(0.5)  # the stalled connections are in before the normal clients start
                with httpx.Client(base_url=url, timeout=60) as http:
                    receiving = http.get("/health").json()["receiving"]
                h_records, h_wall = normal_load(url, payloads, args.requests, args.clients,
                                                time.monotonic() + args.time_limit)
                # keep the pressure on until every stalled connection has met the body timeout at least once
                t_end = time.monotonic() + args.body_timeout + 2
                while time.monotonic() < t_end and len(stalled) < args.stalled:
                    time.sleep(0.1)
                stop.set()
                for t in hostiles:
                    t.join(args.body_timeout + 5)
                held = np.array([r["held_s"] for r in stalled]) if stalled else np.array([np.nan])
                bomb_ms = np.array([r["ms"] for r in bombs if "ms" in r]) if bombs else np.array([np.nan])
                hostile = {
                    "normal": summarise(h_records, h_wall),
                    "stalled_connections": args.stalled, "receiving_at_start": receiving,
                    "stalled_answers": _count(r["status"] for r in stalled),
                    "stalled_held_s": {"min": round(float(held.min()), 2), "max": round(float(held.max()), 2)},
                    "bombs": len(bombs), "bomb_answers": _count(str(r["status"]) for r in bombs),
                    "bomb_ms": {"p50": round(float(np.percentile(bomb_ms, 50)), 1),
                                "max": round(float(bomb_ms.max()), 1)},
                    "peak_mib_after": round(vm("VmHWM"), 1),
                }
        left_after = set(upload_root.glob("nemt-upload-*")) - left_before

    result = {"requests_planned": args.requests, "clients": args.clients, "workers": args.workers,
              "queue": args.queue, "input_size": args.size, "torch_threads": args.threads,
              **summarise(records, wall),
              "memory_mib": {"peak_before": round(hwm_before, 1), "peak_after": round(hwm_after, 1),
                             "rss_before": round(rss_before, 1), "rss_after": round(rss_after, 1),
                             "ru_maxrss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
              "upload_folders_left": len(left_after)}
    if hostile:
        result["hostile"] = hostile
    print(f"{result['requests_sent']}/{args.requests} requests from {args.clients} clients in {wall:.1f} s "
          f"({result['throughput_rps']} req/s); {result['ok']} ok, {result['errors']} errors {result['statuses']}, "
          f"{result['lost']} lost")
    print("latency ms: " + ", ".join(f"{k} {v}" for k, v in result["latency_ms"].items()))
    print("server median ms: " + ", ".join(f"{k} {v}" for k, v in result["server_median_ms"].items()))
    m = result["memory_mib"]
    print(f"peak RSS (VmHWM) {m['peak_before']} MiB before the load, {m['peak_after']} MiB after "
          f"(RSS {m['rss_before']} -> {m['rss_after']} MiB)")
    ok = result["requests_sent"] == args.requests and not result["lost"] and not result["errors"]
    if hostile:
        h, hn = hostile, hostile["normal"]
        print(f"hostile phase: {args.stalled} stalled connections ({h['receiving_at_start']} receiving at the start), "
              f"{args.bombers} bomb posters, body timeout {args.body_timeout:g} s")
        print(f"  normal: {hn['requests_sent']}/{args.requests} in {hn['wall_s']} s ({hn['throughput_rps']} req/s); "
              f"{hn['ok']} ok, {hn['errors']} errors {hn['statuses']}, {hn['lost']} lost; latency ms "
              + ", ".join(f"{k} {v}" for k, v in hn["latency_ms"].items()))
        print(f"  stalled bodies answered {h['stalled_answers']} after {h['stalled_held_s']['min']}-"
              f"{h['stalled_held_s']['max']} s; bombs answered {h['bomb_answers']} of {h['bombs']} "
              f"(p50 {h['bomb_ms']['p50']} ms); peak RSS {h['peak_mib_after']} MiB after")
        ok = (ok and hn["requests_sent"] == args.requests and not hn["lost"] and not hn["errors"]
              and set(h["stalled_answers"]) <= {"408"} and (not args.stalled or h["stalled_answers"])
              and set(h["bomb_answers"]) <= {"413"} and (not args.bombers or h["bombs"]))
    print(f"upload folders left: {len(left_after)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok and not left_after else 1


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


if __name__ == "__main__":
    sys.exit(main())
