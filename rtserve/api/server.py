"""`rtserve serve`: parse arguments, build the EngineConfig and the app, run uvicorn (uvloop + httptools).

The engine core runs in its own process (the engine client starts it in the app's lifespan, before the
socket is bound, so /health answers only once the model is loaded).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys

from rtserve.api.app import ServerSettings, build_app
from rtserve.api.batches.settings import BatchSettings, default_data_dir
from rtserve.api.http_protocol import guarded_httptools
from rtserve.api.logging import configure_access_log
from rtserve.api.shutdown import GracefulServer
from rtserve.config import (SOFT_OVERLOAD_MODES, CacheConfig, EngineConfig, HygieneConfig, LimitsConfig,
                            RTClassDefaults, RTConfig, SchedulerConfig, SpeculativeConfig)
from rtserve.engine.backend import probe_summary as probe_backend
from rtserve.engine.backend import resolve as resolve_backend
from rtserve.engine.rt_hygiene import apply_api_hygiene
from rtserve.model.generation_config import SamplingDefaults, resolve_sampling_defaults

logger = logging.getLogger("rtserve.api")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtserve serve", description="OpenAI/Anthropic-compatible server.")
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", default="", help="GGUF file, HF directory, or an installed model package's name "
                   "(rtserve models lists them; default: the embedded SmolLM2)")
    m.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                   help="sampling defaults for fields a request leaves unset: auto (an HF directory's "
                        "generation_config.json; a GGUF's documented family defaults), none (OpenAI's), or a "
                        "generation_config.json path")
    m.add_argument("--override-generation-config", type=_json_object, default=None, metavar="JSON",
                   help='sampling defaults set over those, e.g. \'{"temperature": 0.5}\'')
    m.add_argument("--served-model-name", nargs="+", default=None, help="model ids to answer to (first is listed)")
    m.add_argument("--preload-grammar", action="store_true",
                   help="build the grammar engine before ready, not on the first constrained request")
    m.add_argument("--tool-call-parser", choices=("auto", "hermes", "llama3_json", "mistral"), default="auto",
                   help="how the model writes tool calls (auto: read from its chat template)")
    m.add_argument("--dtype", default=None, help="reference-path dtype (float32, bfloat16)")
    m.add_argument("--quantization", choices=("auto", "none"), default=None,
                   help="auto: quantized CPU fast path for Q4_1 GGUFs (default); none: fp32 reference")
    m.add_argument("--device", default=None, metavar="cpu|cuda|cuda:N")
    m.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda"), default=None,
                   help="what runs the model: reference (fp32, exact vs transformers), cpu (the quantized fast "
                        "path; an error for a model it cannot run), cuda (bf16 on a GPU; not yet verified on "
                        "one), auto (cuda with --device cuda, else the fast path where it applies; default). "
                        + probe_backend())
    m.add_argument("--num-threads", type=int, default=None, help="torch threads in the engine process")
    m.add_argument("--no-adaptive-threads", dest="adaptive_threads", action="store_false",
                   help="keep the thread count fixed even while other processes hold cores")
    m.add_argument("--seed", type=int, default=None)
    m.add_argument("--max-model-len", type=int, default=None)
    m.add_argument("--max-num-seqs", type=int, default=None)
    m.add_argument("--max-num-batched-tokens", type=int, default=None)
    m.add_argument("--block-size", type=int, default=None)
    m.add_argument("--num-blocks", type=int, default=None)
    m.add_argument("--kv-cache-bytes", type=int, default=None)
    m.add_argument("--no-prefix-caching", action="store_true")
    m.add_argument("--in-process", action="store_true", help="run the engine core on a thread of this process")
    m.add_argument("--engine-restart", action="store_true",
                   help="when the engine process dies, start a new one (counted in /metrics) instead of exiting "
                        "with status 3")
    sp = p.add_argument_group("speculative decoding")
    sp.add_argument("--speculative-method", default=None, choices=("off", "ngram", "draft"))
    sp.add_argument("--num-speculative-tokens", type=int, default=None, help="largest k per verify step")
    sp.add_argument("--draft-model", default=None, help="GGUF file or HF directory (method 'draft')")
    sp.add_argument("--no-adaptive-speculation", action="store_true",
                    help="always verify k drafts instead of choosing k from acceptance and load")
    rt = p.add_argument_group("real-time scheduling (rtserve/engine/rt_policy.py)")
    rt.add_argument("--policy", choices=("deadline", "fcfs"), default=None,
                    help="deadline: tiered EDF, ITL-sized steps and running set, firm admission and drops "
                         "(default); "
                         "fcfs: arrival order, no admission or expiry (baseline)")
    for cls, (ttft, itl) in (("firm", (500, 50)), ("soft", (500, 50))):
        rt.add_argument(f"--rt-{cls}-ttft-ms", type=float, default=None, help=f"default {cls} TTFT budget ({ttft})")
        rt.add_argument(f"--rt-{cls}-itl-ms", type=float, default=None, help=f"default {cls} ITL budget ({itl})")
        rt.add_argument(f"--rt-{cls}-deadline-ms", type=float, default=None,
                        help=f"default {cls} whole-response deadline (none)")
    rt.add_argument("--rt-batch-max-wait-s", type=float, default=None, help="batch waits at most this long (30)")
    rt.add_argument("--max-num-waiting", type=int, default=None, help="bounded waiting queue, requests (256)")
    rt.add_argument("--max-waiting-tokens", type=int, default=None, help="bounded waiting queue, prompt tokens")
    rt.add_argument("--max-buffered-outputs", type=int, default=None,
                    help="deltas held for a stream whose client stopped reading before it is paused (64)")
    rt.add_argument("--slow-reader-timeout-s", type=float, default=None,
                    help="a paused (unread) stream is aborted after this long (30)")
    rt.add_argument("--min-prefill-chunk", type=int, default=None,
                    help="prefill tokens per step even when streams have no ITL slack left (8)")
    rt.add_argument("--rt-step-slack-fraction", type=float, default=None,
                    help="plan each step to end within this share of the tightest ITL slack, at most; less "
                         "when measured steps overrun their prediction (0.8)")
    rt.add_argument("--rt-rescue-step-fraction", type=float, default=None,
                    help="a step stretched past soft streams' ITL to save a prompt's TTFT lasts at most this "
                         "share of the interactive TTFT budget (0.6; 0 never stretches)")
    rt.add_argument("--rt-background-slot-share", type=float, default=None,
                    help="late and batch work joins the running set only below this share of its ITL cap (0.5)")
    rt.add_argument("--rt-min-running", type=int, default=None,
                    help="the ITL-based cap on running sequences never goes below this (8)")
    rt.add_argument("--rt-firm-delivery-margin-ms", type=float, default=None,
                    help="firm deadlines are this much earlier in the engine than their budgets, for "
                         "the token's way to the client (10)")
    rt.add_argument("--rt-soft-overload", choices=SOFT_OVERLOAD_MODES, default=None,
                    help="a soft request predicted to start later than its TTFT budget: serve-late admits it; "
                         "reject refuses it (429 / Anthropic 529 with Retry-After) when more than "
                         f"--rt-soft-overload-bound-ms late (deadline policy; default {RTConfig.soft_overload})")
    rt.add_argument("--rt-soft-overload-bound-ms", type=float, default=None,
                    help="how late past its TTFT budget a soft request may be predicted to start before "
                         f"reject refuses it ({RTConfig.soft_overload_bound_s * 1000:.0f})")
    rt.add_argument("--rt-cost-min-samples", type=int, default=None,
                    help="measured steps before the step-time model is trusted (8)")
    rt.add_argument("--no-rt-calibrate", action="store_true",
                    help="start the step-time model from its prior: no warm-up steps before ready, no cache")
    rt.add_argument("--rt-calibration-budget-s", type=float, default=None,
                    help=f"warm-up steps that measure the step-time model stop after this long "
                         f"({RTConfig.calibration_budget_s:g})")
    rt.add_argument("--rt-calibration-cache-dir", default=None,
                    help="where calibrated step-time models are kept between starts "
                         "(default: <weights cache>/calibration)")
    hy = p.add_argument_group("real-time hygiene (rtserve/engine/rt_hygiene.py; a refused measure is logged and skipped)")
    hy.add_argument("--no-rt-hygiene", action="store_true",
                    help="turn off the default measures: the engine's heap frozen after warm-up with garbage "
                         "collection only between steps (the API process's start-up heap frozen too), and the "
                         "KV cache pre-faulted")
    hy.add_argument("--rt-mlock", action="store_true", help="mlockall the engine process after warm-up")
    hy.add_argument("--rt-engine-cpus", default=None, help="CPU list for the engine process, e.g. 2-7")
    hy.add_argument("--rt-api-cpus", default=None, help="CPU list for the API process, e.g. 0-1")
    hy.add_argument("--rt-sched", choices=("fifo", "rr", "nice"), default=None,
                    help="engine process scheduling: SCHED_FIFO / SCHED_RR at --rt-sched-priority, or nice")
    hy.add_argument("--rt-sched-priority", type=int, default=None, help="real-time priority for fifo/rr (1)")
    hy.add_argument("--rt-omp-wait-policy", choices=("passive", "active"), default=None,
                    help="OMP_WAIT_POLICY for the engine process: passive makes idle OpenMP threads sleep at once "
                         "instead of spinning (default: the environment's, else OpenMP's)")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens a request may ask")
    lim.add_argument("--max-n", type=int, default=None, help="largest n (choices per request)")
    lim.add_argument("--max-logprobs", type=int, default=None)
    lim.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413")
    lim.add_argument("--max-concurrent-per-key", type=int, default=0,
                     help="HTTP requests one API key may have in flight; more get 429 (needs --api-key; 0: no limit)")
    b = p.add_argument_group("batch API (OpenAI /v1/files + /v1/batches, Anthropic /v1/messages/batches)")
    b.add_argument("--data-dir", default=None,
                   help="where batches and files are kept (SQLite + file bodies; default $RTSERVE_DATA_DIR, "
                        "else $XDG_DATA_HOME/rtserve or ~/.local/share/rtserve)")
    b.add_argument("--no-batch-api", action="store_true", help="serve no batch or file routes, keep no data dir")
    b.add_argument("--max-file-bytes", type=int, default=None,
                   help=f"larger uploads get 413 ({BatchSettings.max_file_bytes})")
    b.add_argument("--max-batch-requests", type=int, default=None,
                   help=f"more requests in one batch get 400 ({BatchSettings.max_batch_requests})")
    b.add_argument("--batch-max-in-flight", type=int, default=None,
                   help=f"batch items submitted to the engine at once ({BatchSettings.max_in_flight})")
    b.add_argument("--batch-retention-s", type=float, default=None,
                   help=f"files and finished batches' results are deleted after this long "
                        f"({BatchSettings.retention_s:.0f})")
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--port", type=int, default=8000)
    h.add_argument("--api-key", action="append", default=None,
                   help="require this key (Bearer or x-api-key) on every route but /health; repeat to accept "
                        "several (each sees only its own batches and files); default $RTSERVE_API_KEY")
    h.add_argument("--api-key-file", default=None,
                   help="more accepted keys, one per line (# comments); with --api-key or alone")
    h.add_argument("--timeout-keep-alive", type=int, default=5, help="idle keep-alive timeout, seconds")
    h.add_argument("--limit-concurrency", type=int, default=None,
                   help="connection cap: a request while this many connections are open or requests answered "
                        "gets 503 (Anthropic routes 529) with Retry-After, an error object (plain text with "
                        "--http h11/auto); /health is always answered")
    h.add_argument("--backlog", type=int, default=2048)
    h.add_argument("--timeout-graceful-shutdown", type=int, default=10,
                   help="after the drain, uvicorn's wait for connections to close, seconds")
    h.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, requests in flight may finish within this; then they are aborted "
                        "(new requests get 503 meanwhile; a second signal exits at once)")
    h.add_argument("--max-header-bytes", type=int, default=64 * 1024,
                   help="request line + headers cap (431 beyond; h11: h11_max_incomplete_event_size)")
    h.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="a connection must send complete headers within this (httptools)")
    h.add_argument("--http", default="httptools", choices=("httptools", "h11", "auto"))
    h.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio", "auto"))
    h.add_argument("--ping-interval-s", type=float, default=10.0, help="Anthropic SSE ping when idle this long")
    h.add_argument("--send-timeout-s", type=float, default=60.0, help="drop a stream reader stalled this long")
    h.add_argument("--ready-timeout-s", type=float, default=10.0)
    h.add_argument("--log-level", default="info")
    h.add_argument("--no-access-log", action="store_true")
    return p


def _replace_given(obj, **fields):
    """dataclasses.replace with only the fields that were given on the command line."""
    given = {k: v for k, v in fields.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    base = EngineConfig()
    cache = _replace_given(CacheConfig(), block_size=args.block_size, num_blocks=args.num_blocks,
                           kv_cache_bytes=args.kv_cache_bytes,
                           enable_prefix_caching=False if args.no_prefix_caching else None)
    scheduler = _replace_given(SchedulerConfig(), max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                               max_num_batched_tokens=args.max_num_batched_tokens)
    limits = _replace_given(LimitsConfig(), max_tokens_cap=args.max_tokens_cap, max_n=args.max_n,
                            max_logprobs=args.max_logprobs)
    rt = rt_config_from_args(args)
    speculative = _replace_given(SpeculativeConfig(), method=args.speculative_method,
                                 num_speculative_tokens=args.num_speculative_tokens, draft_model=args.draft_model,
                                 adaptive=False if args.no_adaptive_speculation else None)
    hygiene = _replace_given(HygieneConfig(), gc=False if args.no_rt_hygiene else None,
                             prefault_kv=False if args.no_rt_hygiene else None, mlock=args.rt_mlock or None,
                             cpus=args.rt_engine_cpus, sched=args.rt_sched, sched_priority=args.rt_sched_priority)
    return _replace_given(base, model=args.model, dtype=args.dtype, quantization=args.quantization,
                          device=args.device, backend=args.backend, num_threads=args.num_threads,
                          preload_grammar=True if args.preload_grammar else None,
                          adaptive_threads=args.adaptive_threads, seed=args.seed, cache=cache,
                          scheduler=scheduler, limits=limits, rt=rt, speculative=speculative, hygiene=hygiene)


def rt_config_from_args(args: argparse.Namespace) -> RTConfig:
    """`--policy` and the per-class defaults (milliseconds on the command line, seconds inside)."""
    def budgets(cls: str, base: RTClassDefaults) -> RTClassDefaults:
        ms = {k: getattr(args, f"rt_{cls}_{k}_ms") for k in ("ttft", "itl", "deadline")}
        return _replace_given(base, **{f"{k}_s": None if v is None else v / 1000.0 for k, v in ms.items()})
    base = RTConfig()
    return _replace_given(base, policy=args.policy, firm=budgets("firm", base.firm), soft=budgets("soft", base.soft),
                          batch_max_wait_s=args.rt_batch_max_wait_s, max_num_waiting=args.max_num_waiting,
                          max_waiting_tokens=args.max_waiting_tokens, max_buffered_outputs=args.max_buffered_outputs,
                          slow_reader_timeout_s=args.slow_reader_timeout_s, min_prefill_chunk=args.min_prefill_chunk,
                          cost_min_samples=args.rt_cost_min_samples, step_slack_fraction=args.rt_step_slack_fraction,
                          calibrate=False if args.no_rt_calibrate else None,
                          calibration_budget_s=args.rt_calibration_budget_s,
                          calibration_cache_dir=args.rt_calibration_cache_dir,
                          rescue_step_fraction=args.rt_rescue_step_fraction,
                          background_slot_share=args.rt_background_slot_share, min_running=args.rt_min_running,
                          firm_delivery_margin_s=None if args.rt_firm_delivery_margin_ms is None
                          else args.rt_firm_delivery_margin_ms / 1000.0, soft_overload=args.rt_soft_overload,
                          soft_overload_bound_s=None if args.rt_soft_overload_bound_ms is None
                          else args.rt_soft_overload_bound_ms / 1000.0)


def batch_settings_from_args(args: argparse.Namespace) -> BatchSettings | None:
    if args.no_batch_api:
        return None
    return _replace_given(BatchSettings(args.data_dir or default_data_dir()), max_file_bytes=args.max_file_bytes,
                          max_batch_requests=args.max_batch_requests, max_in_flight=args.batch_max_in_flight,
                          retention_s=args.batch_retention_s)


def read_api_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped (ValueError if unreadable)."""
    try:
        with open(path, encoding="utf-8") as f:
            keys = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file: cannot read {path}: {type(exc).__name__}") from exc
    if not keys:
        raise ValueError(f"--api-key-file: {path} holds no key")
    return keys


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    keys = [k for k in (args.api_key or [os.environ.get("RTSERVE_API_KEY")]) if k]
    keys += read_api_key_file(args.api_key_file) if args.api_key_file else []
    return ServerSettings(served_model_names=tuple(args.served_model_name or ()),
                          api_key=keys[0] if keys else None, api_keys=tuple(keys[1:]),
                          batches=batch_settings_from_args(args),
                          max_body_bytes=args.max_body_bytes, ping_interval_s=args.ping_interval_s,
                          send_timeout_s=args.send_timeout_s, ready_timeout_s=args.ready_timeout_s,
                          max_concurrent_per_key=args.max_concurrent_per_key, tool_call_parser=args.tool_call_parser)


def sampling_defaults_from_args(args: argparse.Namespace, config: EngineConfig) -> SamplingDefaults:
    """--generation-config and --override-generation-config for the model `config` names (ValueError,
    one line, for a bad file or field)."""
    from rtserve.client.async_llm import model_path
    return resolve_sampling_defaults(args.generation_config, model_path(config), args.override_generation_config)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.limit_concurrency is not None and args.limit_concurrency < 1:
        print("rtserve serve: --limit-concurrency must be >= 1", file=sys.stderr)
        return 2
    import uvicorn

    from rtserve.client.async_llm import AsyncLLM

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.no_access_log:
        logging.getLogger("rtserve.access").disabled = True
    else:
        configure_access_log(sys.stderr)
    try:
        config = engine_config_from_args(args)
        resolve_backend(config)  # a backend this machine cannot run (CUDA without a GPU): a usage error
        settings = settings_from_args(args)
        HygieneConfig(cpus=args.rt_api_cpus or "")  # a bad CPU list is a usage error
        defaults = sampling_defaults_from_args(args, config)
        settings = dataclasses.replace(settings, sampling_defaults=defaults)
        logger.info("sampling defaults for unset request fields: %s", defaults.as_dict())
        engine = AsyncLLM(config, in_process=args.in_process)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rtserve serve: {exc}", file=sys.stderr)
        return 2
    if args.preload_grammar:  # the API checks each grammar with xgrammar too: import it now, not on first use
        importlib.import_module("xgrammar")
    try:
        app = build_app(engine, settings)
    except RuntimeError as exc:  # the batch data directory is held by another server
        if args.data_dir is not None or settings.batches is None:
            print(f"rtserve serve: {exc}", file=sys.stderr)
            return 2
        # the default directory, taken by another server the user started: serve without the batch API
        print(f"rtserve serve: {exc}; serving WITHOUT the batch API (give --data-dir to have it)", file=sys.stderr)
        settings = dataclasses.replace(settings, batches=None)
        app = build_app(engine, settings)
    if settings.batches is not None:
        print(f"rtserve serve: batch API data directory {settings.batches.data_dir}", file=sys.stderr)
    guarded = args.http == "httptools"  # the guarded protocol enforces the connection cap itself
    http = guarded_httptools(args.max_header_bytes, args.header_timeout_s, args.limit_concurrency) if guarded else args.http
    uvicorn_config = uvicorn.Config(
        app, host=args.host, port=args.port, loop=args.loop, http=http, ws="websockets-sansio",
        lifespan="on", access_log=False, log_level=args.log_level, timeout_keep_alive=args.timeout_keep_alive,
        limit_concurrency=None if guarded else args.limit_concurrency, backlog=args.backlog,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        h11_max_incomplete_event_size=args.max_header_bytes,
        ws_max_size=max(args.max_body_bytes, 64 * 1024), server_header=False)
    if args.max_concurrent_per_key and not settings.api_key:
        print("rtserve serve: --max-concurrent-per-key needs --api-key", file=sys.stderr)
        return 2
    if args.shutdown_timeout_s < 0:
        print("rtserve serve: --shutdown-timeout-s must be >= 0", file=sys.stderr)
        return 2
    apply_api_hygiene(args.rt_api_cpus or "", freeze_heap=not args.no_rt_hygiene,
                      omp_wait_policy=args.rt_omp_wait_policy or "")
    server = GracefulServer(uvicorn_config, app.state.rtserve, args.shutdown_timeout_s, args.engine_restart)
    server.run()
    return server.exit_status if server.started else 3
