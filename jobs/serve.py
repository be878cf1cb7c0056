"""``python -m jobs.serve --model PATH``: run the generation API locally (Ray Serve on this machine or RAY_ADDRESS).

The model folder names its text encoder and VAE; --text-encoder / --vae override them, as in jobs.generate. Bearer
tokens come from SERVE_API_TOKEN (comma-separated) or `api_tokens` in the config. For clusters use serve/config.yaml with
``serve deploy`` or the KubeRay RayService (infra/kuberay/rayservice.yaml).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from jobs.cli import make_parser, resolve_config, run_main, setup_logging
from jobs.runtime import init_ray
from models.config_io import ConfigError
from serve.config import ServeConfig

log = logging.getLogger("jobs.serve")
DEFAULT_MODEL_NAME = "default"


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("python -m jobs.serve", __doc__, ServeConfig, set_example="batching.max_batch_size=8")
    parser.add_argument("--model", help="model folder (ours / official / diffusers; local or s3://)")
    parser.add_argument("--name", default=DEFAULT_MODEL_NAME, help="the model's name in the API")
    parser.add_argument("--text-encoder", help="text encoder path (default: the folder's reference)")
    parser.add_argument("--vae", help="VAE path (default: the folder's reference)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    flags = {}
    if args.model:
        flags[f"models.{args.name}.path"] = args.model
        flags[f"models.{args.name}.text_encoder"] = args.text_encoder
        flags[f"models.{args.name}.vae"] = args.vae
    elif args.text_encoder or args.vae:
        raise ConfigError("--text-encoder / --vae need --model")
    config = resolve_config(ServeConfig, args, flags)
    if not config.tokens():
        log.warning("no API token configured (SERVE_API_TOKEN or api_tokens): the API is open to anyone who can "
                    "reach %s:%d", args.host, args.port)
    if args.dry_run:
        log.info("config is valid: models %s, default %s", list(config.models), config.default_model)
        return 0

    from ray import serve

    from models.config_io import to_dict
    from serve.app import build_app

    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(to_dict(config)), name="lumina", route_prefix="/")
    log.info("serving %s on http://%s:%d (OpenAPI: /docs); Ctrl-C stops", list(config.models), args.host, args.port)
    wait_for_stop_signal()
    shut_down(config.graceful_shutdown_s)
    return 0


def wait_for_stop_signal() -> None:
    """Block until SIGTERM (Kubernetes, systemd, `kill`) or SIGINT (Ctrl-C). A second one ends the process at once."""
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():  # the second signal: the user will not wait for the graceful shutdown
            log.warning("%s again: stopping now", signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    stop.wait()


def shut_down(grace_s: float) -> None:
    """Stop the app within ``grace_s`` seconds (docs/architecture.md#shutdown).

    Serve drains its deployments one after the other, each for up to its graceful-shutdown timeout, so an Ingress
    request waiting on a long solve holds the shutdown for that timeout twice. Past ``grace_s`` the local cluster this
    process started is stopped, which ends the solves; a joined cluster (RAY_ADDRESS) goes on draining without us.
    The drain is awaited on this thread and cancelled at the bound: a thread of ours still inside Ray while
    ``ray.shutdown`` tears the connection down can crash the process (seen: SIGSEGV).
    """
    import asyncio

    import ray
    from ray import serve

    log.info("draining in-flight requests for up to %.0f s", grace_s)
    try:
        asyncio.run(asyncio.wait_for(serve.shutdown_async(), timeout=grace_s))
    except TimeoutError:
        log.warning("in-flight requests did not finish within graceful_shutdown_s=%.0f s: stopping them", grace_s)
    ray.shutdown()  # a local cluster goes with the driver; a joined one keeps running and finishes the drain


if __name__ == "__main__":
    run_main(main)
