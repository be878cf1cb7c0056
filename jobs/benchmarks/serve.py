"""``python -m jobs.bench serve``: a bounded loopback load test of the generation API, with and without batching.

Starts a local Ray cluster and the Serve app on 127.0.0.1 (never any other address), sends a fixed number of requests
from a fixed number of concurrent clients, and prints requests/s and p50/p95 latency for each batching setting. Without
--model it builds tiny random models in a temporary folder (the CPU smoke configuration of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time

import torch

from jobs.runtime import free_port, init_ray


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
    return dict(ok=ok, errors=requests - ok, rps=ok / wall, p50=statistics.median(latencies) if ok else float("nan"),
                p95=latencies[min(ok - 1, int(0.95 * ok))] if ok else float("nan"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: tiny random models)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,4", help="max_batch_size settings to compare")
    args = parser.parse_args(argv)
    if args.requests > 10_000 or args.concurrency > 256:
        parser.error("the load is bounded: at most 10000 requests and 256 concurrent clients")

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
        try:
            for batch in [int(b) for b in args.batch_sizes.split(",")]:
                config = {"models": {"m": {"path": model}}, "request_timeout_s": 300.0,
                          "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.05 if batch > 1 else 0.0},
                          "sampler": {"steps": args.steps, "solver": "euler"},
                          "limits": {"max_steps": max(args.steps, 1)}}
                app = Ingress.bind(SamplerReplica.options(max_ongoing_requests=max(8, 2 * batch),
                                                          max_queued_requests=-1).bind(config), config)
                serve.run(app, name="bench", route_prefix="/")
                stats = load(f"http://127.0.0.1:{port}/v1/images/generations", args.requests, args.concurrency,
                             {"prompt": "a red circle on a blue background", "size": args.size})
                print(f"max_batch_size {batch}: {stats['rps']:.2f} req/s | p50 {stats['p50'] * 1000:.0f} ms | "
                      f"p95 {stats['p95'] * 1000:.0f} ms | {stats['ok']} ok, {stats['errors']} errors")
                serve.delete("bench")
        finally:
            serve.shutdown()
            ray.shutdown()
    return 0
