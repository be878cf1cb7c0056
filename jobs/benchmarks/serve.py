"""``python -m jobs.bench serve``: a bounded loopback load test of the generation API, with and without batching.

Starts a local Ray cluster and the Serve app on 127.0.0.1 (never any other address), sends a fixed number of requests
from a fixed number of concurrent clients, and prints requests/s and p50/p95 latency for each batching setting. Without
--model it builds tiny random models in a temporary folder (the CPU smoke configuration of docs/benchmarks.md).

``--fault kill-replica`` measures a replica's death instead: clients load the app for ``--duration`` seconds, the
sampler replica is killed (``ray.kill``, as an OOM kill or a lost node would end it) a third of the way in, and it prints
the requests lost, how long until the replacement served, and p50/p99 during the recovery against the same load's
before the kill.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import tempfile
import time

import torch

from jobs.runtime import free_port, init_ray

MAX_REQUESTS = 10_000  # the load is bounded in count as well as in time


def tiny_models(root: str) -> str:
    """A tiny random text encoder, VAE and Next-DiT folder (same builders as the tests)."""
    from models.tiny import make_tiny_model_folder, make_tiny_text_encoder, make_tiny_vae

    te, vae = make_tiny_text_encoder(os.path.join(root, "te")), make_tiny_vae(os.path.join(root, "vae"))
    return make_tiny_model_folder(os.path.join(root, "model"), te, vae)


def load(url: str, requests: int, concurrency: int, body: dict) -> dict:
    import httpx

    def one(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = client.post(url, json={**body, "seed": i})
        return response.status_code, time.perf_counter() - started

    with httpx.Client(timeout=300) as client:
        one(0)  # warm-up (first batch compiles caches)
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(1, requests + 1)))
        wall = time.perf_counter() - began
    latencies = sorted(t for status, t in results if status == 200)
    ok = len(latencies)
    return {"ok": ok, "errors": requests - ok, "rps": ok / wall, "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95)}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def kill_replica_run(url: str, concurrency: int, duration_s: float, max_requests: int, body: dict) -> dict:
    """Closed-loop clients for ``duration_s`` (at most ``max_requests`` requests), the sampler replica killed at a
    third of it. Each request is (sent, answered, status); a connection error or a non-JSON answer is status 0."""
    import threading

    import httpx
    import ray

    records: list[tuple[float, float, int]] = []
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                with lock:
                    if len(records) >= max_requests:
                        return
                sent = time.perf_counter()
                try:
                    response = http.post(url, json=body)
                    json_body = response.headers.get("content-type") == "application/json"
                    status = response.status_code if json_body else 0
                except httpx.TransportError:
                    status = 0
                with lock:
                    records.append((sent, time.perf_counter(), status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(duration_s / 3)
    replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and "SamplerReplica" in a["name"]]
    killed_at = time.perf_counter()
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=False)
    time.sleep(max(0.0, began + duration_s - time.perf_counter()))
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    # recovered: the first 200 to a request sent after the kill (the replacement, not the old replica, served it)
    served_after = [answered for sent, answered, status in records if sent > killed_at and status == 200]
    recovered_at = min(served_after) if served_after else float("inf")
    before = [answered - sent for sent, answered, status in records if answered < killed_at and status == 200]
    during = [answered - sent for sent, answered, _ in records if answered >= killed_at and sent < recovered_at]
    statuses = [status for *_, status in records]
    return {"requests": len(records), "ok": statuses.count(200), "json_503": statuses.count(503),
            "other": len(records) - statuses.count(200) - statuses.count(503), "recovery_s": recovered_at - killed_at,
            "before_p50": percentile(before, 0.5), "before_p99": percentile(before, 0.99), "during": len(during),
            "during_p50": percentile(during, 0.5), "during_p99": percentile(during, 0.99)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: tiny random models)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4", help="max_batch_size settings to compare")
    parser.add_argument("--fault", choices=["kill-replica"],
                        help="kill the sampler replica under load and measure the recovery (one batching setting: the "
                             "largest of --batch-sizes)")
    parser.add_argument("--duration", type=float, default=30.0, help="--fault: seconds of load (the kill at a third)")
    args = parser.parse_args(argv)
    if args.requests > MAX_REQUESTS or args.concurrency > 256 or args.duration > 600:
        parser.error("the load is bounded: at most 10000 requests, 256 concurrent clients and 600 s")

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serve.app import Ingress, SamplerReplica

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as root:
        model = args.model or tiny_models(root)
        init_ray()
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        print(f"device: {device} | {args.requests} requests, {args.concurrency} concurrent clients, size {args.size}, "
              f"{args.steps} euler steps | loopback only")
        batches = [int(b) for b in args.batch_sizes.split(",")]
        try:
            for batch in batches[-1:] if args.fault else batches:
                config = {"models": {"m": {"path": model}}, "request_timeout_s": 300.0,
                          "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05 if batch > 1 else 0.0},
                          "sampler": {"steps": args.steps, "solver": "euler"},
                          "limits": {"max_steps": max(args.steps, 1)}}
                app = Ingress.bind(SamplerReplica.options(max_ongoing_requests=max(8, 2 * batch),
                                                          max_queued_requests=-1).bind(config), config)
                serve.run(app, name="bench", route_prefix="/")
                url = f"http://127.0.0.1:{port}/v1/images/generations"
                body = {"prompt": "a red circle on a blue background", "size": args.size}
                if args.fault:
                    load(url, 1, 1, body)  # warm-up
                    f = kill_replica_run(url, args.concurrency, args.duration, MAX_REQUESTS, body)
                    print(f"kill-replica, max_batch_size {batch}: {f['requests']} requests: {f['ok']} ok, "
                          f"{f['json_503']} JSON 503 (Retry-After), {f['other']} lost (no JSON answer) | recovery "
                          f"{f['recovery_s']:.1f} s to the replacement's first 200 | during recovery {f['during']} "
                          f"answers, p50 {f['during_p50'] * 1000:.0f} ms, p99 {f['during_p99'] * 1000:.0f} ms | before "
                          f"the kill p50 {f['before_p50'] * 1000:.0f} ms, p99 {f['before_p99'] * 1000:.0f} ms")
                    serve.delete("bench")
                    continue
                stats = load(url, args.requests, args.concurrency, body)
                print(f"max_batch_size {batch}: {stats['rps']:.2f} req/s | p50 {stats['p50'] * 1000:.0f} ms | "
                      f"p95 {stats['p95'] * 1000:.0f} ms | {stats['ok']} ok, {stats['errors']} errors")
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
