"""Load test of the explanation service on loopback: N requests from C concurrent clients, bounded in time.

    python benchmarks/service_load.py                      # 200 requests, 8 clients, 32 px phantom model
    python benchmarks/service_load.py --size 64 --json load.json

Starts the service in this process (uvicorn in a thread, a free port on
127.0.0.1) with a smallcnn and a NEMt explainer trained for one epoch on
phantoms, then sends phantom PNGs (``format=png``, all labels) from client
threads, each with its own HTTP connection. Prints the latency percentiles,
the throughput, the errors, the lost requests (sent without an answer; must
be 0), the server's own time split, the process's peak resident memory
(VmHWM) before and after the load, and whether any upload folder was left
behind. Exits 1 when a request is lost or errors occur.
"""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--queue", type=int, default=16)
    ap.add_argument("--size", type=int, default=32, help="phantom and model input size (px)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds; no request is started after it")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from nemt.deploy.service import build_explainers, create_app, running
    from nemt.models import load_model

    with tempfile.TemporaryDirectory(prefix="nemt-load-") as tmp:
        model_dir, explainer_dir, images = build(Path(tmp), args.size)
        payloads = [(p.name, p.read_bytes()) for p in images]
        clf = load_model(model_dir)
        app = create_app(clf, build_explainers(clf, explainer_dir), workers=args.workers, queue=args.queue)
        upload_root = Path(tempfile.gettempdir())
        left_before = set(upload_root.glob("nemt-upload-*"))
        with running(app) as url:
            with httpx.Client(base_url=url, timeout=60) as warm:  # first requests build caches
                for name, data in payloads[:3]:
                    warm.post("/v1/explain", files={"file": (name, data)}).raise_for_status()
            hwm_before, rss_before = vm("VmHWM"), vm("VmRSS")

            counter = itertools.count()
            lock = threading.Lock()
            records: list[dict] = []
            deadline = time.monotonic() + args.time_limit

            def client() -> None:
                with httpx.Client(base_url=url, timeout=60) as http:
                    while time.monotonic() < deadline:
                        i = next(counter)
                        if i >= args.requests:
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
            threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t_start
            hwm_after, rss_after = vm("VmHWM"), vm("VmRSS")
        left_after = set(upload_root.glob("nemt-upload-*")) - left_before

    ok = [r for r in records if r.get("status") == 200]
    lat = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r.get("status"))
        statuses[key] = statuses.get(key, 0) + 1
    server = {k: round(float(np.median([r["server"][k] for r in ok])), 2)
              for k in ("receive", "queue", "read", "predict", "explain", "encode", "total")} if ok else {}
    result = {
        "requests_planned": args.requests, "requests_sent": len(records), "clients": args.clients,
        "workers": args.workers, "queue": args.queue, "input_size": args.size, "torch_threads": args.threads,
        "ok": len(ok), "errors": len(records) - len(ok), "statuses": statuses,
        "lost": sum(1 for r in records if r.get("status") is None),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p90": round(float(np.percentile(lat, 90)), 1),
                       "p99": round(float(np.percentile(lat, 99)), 1), "max": round(float(lat.max()), 1)},
        "throughput_rps": round(len(ok) / wall, 1), "wall_s": round(wall, 2),
        "server_median_ms": server,
        "memory_mib": {"peak_before": round(hwm_before, 1), "peak_after": round(hwm_after, 1),
                       "rss_before": round(rss_before, 1), "rss_after": round(rss_after, 1),
                       "ru_maxrss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "upload_folders_left": len(left_after),
    }
    print(f"{result['requests_sent']}/{args.requests} requests from {args.clients} clients in {wall:.1f} s "
          f"({result['throughput_rps']} req/s); {result['ok']} ok, {result['errors']} errors {statuses}, "
          f"{result['lost']} lost")
    print("latency ms: " + ", ".join(f"{k} {v}" for k, v in result["latency_ms"].items()))
    print("server median ms: " + ", ".join(f"{k} {v}" for k, v in server.items()))
    m = result["memory_mib"]
    print(f"peak RSS (VmHWM) {m['peak_before']} MiB before the load, {m['peak_after']} MiB after "
          f"(RSS {m['rss_before']} -> {m['rss_after']} MiB); upload folders left: {len(left_after)}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    complete = result["requests_sent"] == args.requests
    return 0 if complete and not result["lost"] and not result["errors"] and not left_after else 1


if __name__ == "__main__":
    sys.exit(main())
