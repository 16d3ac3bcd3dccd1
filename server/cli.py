"""`dsv4`: the console entry point. Subcommands: `serve`, `make-tiny`, `bench serve`.

argparse -> `EngineConfig` + `ServeConfig` -> uvicorn. Heavy imports (torch, the engine,
FastAPI) happen inside the subcommand that needs them, so `dsv4 --help` stays fast. Bad flag
values exit with status 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from `1073741824`, `512MiB`, `2GB`, `1.5G` (K/M/G/T; `i` = powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 2GB)")
    number, unit, binary = match.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    value = int(float(number) * (1024 if binary else 1000) ** power)
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


def _size_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else parse_size(text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _flag(args: argparse.Namespace, name: str) -> int:
    """A positive integer flag; ValueError naming it otherwise."""
    value = getattr(args, name)
    if value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return value


def _add_serve(subparsers) -> None:
    from server.limits import RequestLimits

    p = subparsers.add_parser("serve", help="run the OpenAI/DeepSeek-compatible HTTP server")
    p.add_argument("--model", default=None,
                   help="checkpoint directory (default: the embedded demo model shipped in engine/assets/demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: loopback only); any other address needs an API key "
                        "or --allow-no-api-key")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--api-key", action="append", default=[], dest="api_keys", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (repeat for several keys; the environment "
                        "variable DSV4_API_KEY adds one more)")
    p.add_argument("--allow-no-api-key", action="store_true",
                   help="serve a non-loopback --host without any API key (an open endpoint: only behind "
                        "your own authenticating proxy)")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients use (default: deepseek-v4-flash); DeepSeek's names are aliases")
    engine = p.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=64, help="requests decoded together (default: 64)")
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens per engine step, prefill chunks included (default: 2048)")
    engine.add_argument("--max-model-len", type=int, default=None,
                        help="context window cap in tokens (default: the checkpoint's)")
    engine.add_argument("--kv-cache-memory", type=parse_size, default=None,
                        help="KV cache bytes, e.g. 8GiB (default: share of free GPU memory / 256 MiB on CPU)")
    engine.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="auto: the model dtype; fp8: DeepSeek's FP8 KV layout (half the bytes)")
    engine.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    engine.add_argument("--prefix-cache-unit", type=int, default=2048,
                        help="checkpoint interval in tokens inside long prompts (multiple of 64)")
    engine.add_argument("--prefix-cache-snapshot-share", type=float, default=0.25,
                        help="share of the KV cache memory for prefix-cache snapshot slots (window + state + "
                             "tail blocks per checkpoint), in [0, 1); the rest holds compressed blocks")
    engine.add_argument("--prefix-cache-host-memory", type=_size_or_zero, default=1 << 30,
                        help="host memory for checkpoints evicted from the device (default 1GiB; 0: none)")
    engine.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                        help="directory for prefix-cache checkpoints that survives restarts (default: none)")
    engine.add_argument("--prefix-cache-dir-size", type=parse_size, default=16 << 30,
                        help="size bound of --prefix-cache-dir (default 16GiB; oldest checkpoints go first)")
    engine.add_argument("--dtype", default="auto",
                        help="auto | bfloat16 | float16 | float32 (auto: bfloat16 on CUDA, float32 on CPU)")
    engine.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (auto: CUDA when present)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="shard the model over N ranks (docs/PARALLEL.md; default: 1)")
    engine.add_argument("--enable-expert-parallel", action="store_true",
                        help="with --tensor-parallel-size: place whole experts per rank instead of slicing them")
    engine.add_argument("--seed", type=int, default=0,
                        help="seed of the sampler shared by requests that give no seed (default: 0)")
    engine.add_argument("--compile", action="store_true",
                        help="run decode steps through torch.compile(fullgraph=True) (any device)")
    engine.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps on CUDA")
    engine.add_argument("--fp8-activations", action="store_true",
                        help="round activations to FP8 per 128 channels before FP8-weight GEMMs (DeepSeek's "
                             "reference numerics; default: unquantised, as transformers)")
    engine.add_argument("--speculative-tokens", type=int, default=0,
                        help="draft tokens per greedy sequence, verified in one forward (0 = off)")
    engine.add_argument("--speculative-method", choices=("ngram", "mtp"), default="ngram",
                        help="where drafts come from: 'mtp' = the checkpoint's multi-token-prediction layer "
                             "(V4 ships one), 'ngram' = prompt lookup")
    engine.add_argument("--speculative-max-batch", type=int, default=32,
                        help="no speculation while more sequences than this run")
    engine.add_argument("--engine-in-process", action="store_true",
                        help="run the engine's step loop on a thread of the HTTP process instead of its own "
                             "process (debugging; the default is a separate engine process)")
    engine.add_argument("--max-queue", type=int, default=1024,
                        help="waiting requests before new ones get HTTP 429")
    server = p.add_argument_group("server")
    server.add_argument("--keep-alive-interval", type=float, default=10.0,
                        help="seconds of silence after which a request gets a keep-alive (SSE ': keep-alive' "
                             "comment, or a blank line before non-streaming JSON): while queued, during a "
                             "long prefill or long reasoning (default: 10)")
    server.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds from SIGTERM to exit: /health and new requests get 503 at once, running "
                             "requests finish or, just before the deadline, end with an error event")
    server.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level (default: info)")
    server.add_argument("--tool-parse-errors", choices=("content", "error"), default="content",
                        help="tool-call markup the parser cannot decode, or a call to a tool the request did "
                             "not offer: 'content' returns the text as content with the reason in "
                             "tool_call_error (default); 'error' fails the request (HTTP 500)")
    server.add_argument("--stats-interval", type=float, default=5.0,
                        help="seconds between one-line stats logs (throughput, queues, KV, cache hits); 0: off")
    limits = p.add_argument_group("request limits (per request unless noted; server/limits.py)")
    default = RequestLimits()
    limits.add_argument("--max-body-bytes", type=parse_size, default=default.max_body_bytes, metavar="SIZE",
                        help="largest request body, e.g. 8MiB; larger bodies get 413 before parsing (default: 8MiB)")
    limits.add_argument("--max-stop-strings", type=int, default=default.max_stop_strings,
                        help=f"stop strings per request (default: {default.max_stop_strings})")
    limits.add_argument("--max-stop-length", type=int, default=default.max_stop_length,
                        help=f"characters per stop string (default: {default.max_stop_length})")
    limits.add_argument("--max-messages", type=int, default=default.max_messages,
                        help=f"messages per chat request (default: {default.max_messages})")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="prompt tokens per request, checked before the engine sees it "
                             "(default: the context window minus one)")
    limits.add_argument("--max-connections", type=int, default=default.max_connections,
                        help=f"open HTTP connections, server-wide; beyond, 503 (default: {default.max_connections})")
    limits.add_argument("--header-timeout", type=float, default=default.header_timeout,
                        help="seconds a client has to send the request line and headers; then 408 and the "
                             f"connection is closed (default: {default.header_timeout:g})")
    limits.add_argument("--body-timeout", type=float, default=default.body_timeout,
                        help=f"seconds a client has to send its whole body; then 408 (default: {default.body_timeout:g})")
    prices = p.add_argument_group("pricing (USD per 1M tokens; see server/pricing.py)")
    prices.add_argument("--price-table", default=None, metavar="FILE", help="JSON or YAML price table")
    prices.add_argument("--price-cache-hit", type=float, default=None,
                        help="price of prompt tokens served from the context cache")
    prices.add_argument("--price-cache-miss", type=float, default=None, help="price of the other prompt tokens")
    prices.add_argument("--price-output", type=float, default=None, help="price of generated tokens")
    p.set_defaults(func=run_serve)


def _add_make_tiny(subparsers) -> None:
    p = subparsers.add_parser("make-tiny", help="write a tiny random V4 checkpoint (for tests and demos)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write the checkpoint into")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors shards (default: 1)")
    p.set_defaults(func=run_make_tiny)


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks")
    kinds = p.add_subparsers(dest="bench_kind", required=True)
    # The flags belong to bench/bench_serve.py, parsed there, so `dsv4 --help` needn't import it.
    serve = kinds.add_parser("serve", add_help=False,
                             help="load-test an OpenAI-compatible server (dsv4 bench serve --help)")
    serve.add_argument("bench_args", nargs=argparse.REMAINDER, help="bench flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 serving daemon")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_make_tiny(subparsers)
    _add_bench(subparsers)
    return parser


def build_configs(args: argparse.Namespace):
    """(EngineConfig, ServeConfig, max_queue) from parsed `serve` flags; ValueError names the flag."""
    from engine.engine_config import EngineConfig
    from server.pricing import load_price_table
    from server.limits import RequestLimits
    from server.serve_config import DEFAULT_SERVED_MODEL_NAME, ServeConfig

    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    engine_config = EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory=args.kv_cache_memory,
        kv_cache_dtype=args.kv_cache_dtype, enable_prefix_cache=not args.no_prefix_cache,
        prefix_cache_unit=args.prefix_cache_unit, prefix_cache_snapshot_share=args.prefix_cache_snapshot_share,
        prefix_cache_host_memory=args.prefix_cache_host_memory, prefix_cache_dir=args.prefix_cache_dir,
        prefix_cache_dir_size=args.prefix_cache_dir_size,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        seed=args.seed, compile=args.compile, enforce_eager=args.enforce_eager,
        fp8_activations=args.fp8_activations, speculative_tokens=args.speculative_tokens, speculative_method=args.speculative_method,
        speculative_max_batch=args.speculative_max_batch)
    api_keys = tuple(args.api_keys) + ((os.environ["DSV4_API_KEY"],) if os.environ.get("DSV4_API_KEY") else ())
    if not api_keys and not args.allow_no_api_key and not _is_loopback(args.host):
        raise ValueError(f"--host {args.host} serves beyond this machine: give --api-key KEY (or set DSV4_API_KEY), "
                         f"or pass --allow-no-api-key to serve an open endpoint deliberately")
    limits = RequestLimits(
        max_body_bytes=args.max_body_bytes, max_stop_strings=_flag(args, "max_stop_strings"),
        max_stop_length=_flag(args, "max_stop_length"), max_messages=_flag(args, "max_messages"),
        max_prompt_tokens=args.max_prompt_tokens, max_connections=_flag(args, "max_connections"),
        header_timeout=args.header_timeout, body_timeout=args.body_timeout)
    served_name = args.served_model_name or DEFAULT_SERVED_MODEL_NAME
    price_table = load_price_table(args.price_table, served_name, args.price_cache_hit, args.price_cache_miss,
                                   args.price_output)
    serve_config = ServeConfig(
        host=args.host, port=args.port, api_keys=api_keys, served_model_name=served_name,
        keep_alive_interval=args.keep_alive_interval, drain_timeout=args.drain_timeout, price_table=price_table,
        log_level=args.log_level, stats_interval=args.stats_interval, tool_parse_errors=args.tool_parse_errors,
        limits=limits)
    return engine_config, serve_config, args.max_queue


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from engine.distributed.worker import run_worker_from_env

    if run_worker_from_env():  # a non-zero torchrun rank: serve the driver's steps, no HTTP
        return 0
    try:
        engine_config, serve_config, max_queue = build_configs(args)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.async_engine import AsyncEngine
    from server.app import create_app
    from server.lifecycle import build_server

    engine = AsyncEngine(engine_config, max_queue=max_queue, engine_process=False if args.engine_in_process else None)
    app = create_app(engine, serve_config)
    server = build_server(app, serve_config.host, serve_config.port, serve_config.log_level,
                          serve_config.drain_timeout, serve_config.limits)
    server.run()  # returns after a drain (SIGTERM/SIGINT): exit status 0
    return 0 if server.started else 1


def run_make_tiny(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from engine.tiny.make_tiny import make_tiny

    if args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    make_tiny(args.out, seed=args.seed, shards=args.shards)
    print(f"wrote a tiny DeepSeek-V4 checkpoint to {args.out}")
    return 0


def run_bench_serve(bench_argv: list[str]) -> int:
    from bench import bench_serve

    bench_parser = argparse.ArgumentParser(prog="dsv4 bench serve", description=bench_serve.__doc__.split("\n\n")[0])
    bench_serve.add_arguments(bench_parser)
    bench_args = bench_parser.parse_args(bench_argv)
    try:
        bench_serve.run(bench_args)
    except ValueError as err:
        bench_parser.error(str(err))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:  # its flags are parsed by bench_serve itself
        return run_bench_serve(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, parser)


if __name__ == "__main__":
    sys.exit(main())
