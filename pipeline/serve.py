"""``retmask serve``: vLLM's own OpenAI-compatible server on one gated engine, with head masks chosen by name.

Anyone with an OpenAI client can then ask "the model with its retrieval heads off" and the plain model the
same question, from one engine load. Every route, chat template, streaming and error format is vLLM's: the
server is built with vLLM 0.32's own functions (``build_async_engine_client``, ``build_app``,
``init_app_state``, ``serve_http``, as its ``build_and_serve`` does), from the arguments ``vllm serve`` would
parse. retmask adds three things:

- The gated engine: the load format, worker extension, compile-cache marker and CPU defaults of
  ``GatedLLM.from_config`` (whole prompts per step, a 1 GiB KV cache, ``cpu_reserved_cores``), after the same
  checks of the model and memory, so a bad input fails in one line before any process starts.
- Named masks: ``retrieval_masked`` and ``random_masked`` picked from a score file by generation's rules, and
  ad-hoc ``NAME=layer-head,...`` masks. Each gets a slot of the workers' gate tables
  (``HeadGateExtension.retmask_register_mask``) and is proven by the gate canary before the socket accepts a
  request; the plain model is the name ``none``.
- ``MaskRouter``, an ASGI middleware. A request names its mask in ``vllm_xargs`` (``{"retmask_mask": NAME}``)
  or as the model ``<served-name>:NAME`` (the aliases ``/v1/models`` lists). The router rewrites the JSON
  body before vLLM parses it: the name becomes the mask's slot in ``vllm_xargs``, which vLLM hands on as
  ``SamplingParams.extra_args``, where the gate reads it; the mask's prefix-cache salt (the one ``GatedLLM``
  uses) goes into ``cache_salt``, so KV blocks are never shared across masks. Rewriting the body keeps every
  endpoint vLLM's own; wrapping a serving class would tie this module to vLLM's private methods. An unknown
  name is answered with HTTP 400 listing the known ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import uuid
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Any, Callable

from pipeline.engine import EngineConfig, EngineOptions
from pipeline.interrupts import interruptible_engine_start
from retrieval_heads.config import opt
from retrieval_heads.errors import RetmaskError
from retrieval_heads.models import EMBEDDED_ALIAS, ModelShape
from retrieval_heads.scores import Head

log = logging.getLogger(__name__)

PLAIN = "none"  # the mask name of the plain model (no head gated)
MASKED_PATHS = ("/v1/chat/completions", "/v1/completions")  # endpoints whose request maps vllm_xargs to extra_args
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class ServeConfig:
    """What ``retmask serve`` decides; ``jobs/configs/serve.yaml`` maps 1:1 onto these fields."""

    model: str = opt(EMBEDDED_ALIAS, "alias, local checkpoint or hub id")
    served_model_name: str | None = opt(None, "the name clients pass as `model` (None: --model as given); "
                                        "NAME:MASK selects a mask")
    scores: str | None = opt(None, "head scores (Wu JSON) of this model: serves every masked variant below, "
                             "selected exactly as `retmask generate` selects it")
    selection: str = opt("threshold", "threshold (mean score >= threshold) | top_k")
    threshold: float = opt(0.1, "selection threshold: every head with at least this mean score is masked")
    k: int = opt(5, "heads masked under selection top_k")
    variants: list[str] = opt(["normal", "retrieval_masked", "random_masked"],
                              "variants served by name (with --scores), as in a generate config")
    variant_rules: dict = opt({}, "graded negatives, as in a generate config: name -> {rule, threshold | k | "
                              "like, seed}")
    masks: list[str] = opt([], "more masks as NAME=layer-head,..., e.g. late=17-3,18-6,early=0-1")
    seed: int = opt(0, "engine seed and the random draws of variants (e.g. random_masked)")
    host: str = opt("127.0.0.1", "interface to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port")
    max_model_len: int = opt(4096, "prompt + completion tokens per request")
    tensor_parallel_size: int = opt(1, "must divide the query-head count")
    chat_template_kwargs: dict = opt({}, "the chat template's default kwargs, e.g. {enable_thinking: true} for "
                                     "Qwen3 (a request may set its own)")
    engine: EngineOptions = opt(EngineOptions, "engine settings (dtype, kv_cache_memory_bytes, max_num_seqs, ...)")

    def engine_config(self) -> EngineConfig:
        """The engine ``GatedLLM.from_config`` would build for the same settings."""
        return EngineConfig(**asdict(self.engine), model=self.model, max_model_len=self.max_model_len,
                            tensor_parallel_size=self.tensor_parallel_size, seed=self.seed,
                            chat_template_kwargs=dict(self.chat_template_kwargs))


@dataclass(frozen=True)
class ServedMask:
    """One mask a server offers: its heads, the gate-table slot requests name, and its prefix-cache salt."""

    name: str
    heads: tuple[Head, ...]
    slot: int  # 0: the plain model (row 0 of the gate tables stays all ones)
    salt: str | None


def parse_masks(items: list[str]) -> dict[str, str]:
    """``["late=17-3", "18-6", "early=0-1"]`` (the comma-split of ``late=17-3,18-6,early=0-1``) -> name -> spec."""
    groups: dict[str, list[str]] = {}
    name = None
    for item in (part.strip() for entry in items for part in entry.split(",")):
        if "=" in item:
            name, _, item = (s.strip() for s in item.partition("="))
            if not _NAME.fullmatch(name) or name == PLAIN or name in groups:
                raise RetmaskError(f"masks: {name!r} is not a new mask name (letters, digits, '_', '.', '-'; not "
                                   f"{PLAIN!r}); write NAME=layer-head,..., e.g. late=17-3,18-6")
            groups[name] = []
        elif item and name is None:
            raise RetmaskError(f"masks: {item!r} has no name; write NAME=layer-head,..., e.g. late=17-3,18-6")
        if item:
            groups[name].append(item)
    return {n: ",".join(heads) for n, heads in groups.items()}


def named_masks(config: ServeConfig, shape: ModelShape) -> dict[str, ServedMask]:
    """The masks a server offers, by name: ``none`` (alias ``normal``), the score file's masked variants (if
    any), then ``config.masks``."""
    from pipeline.engine import mask_salt
    from pipeline.placement import MAX_MASKS
    from pipeline.run_config import variant_masks
    from retrieval_heads.masking import HeadMask

    heads: dict[str, tuple[Head, ...]] = {}
    if config.scores:
        variants, _ = variant_masks(config, shape)  # the very heads a generation run gates under these names
        heads.update((v, tuple(hs)) for v, hs in variants.items() if hs)
    for name, spec in parse_masks(config.masks).items():
        if name in heads or name == "normal":
            raise RetmaskError(f"masks: {name!r} is already a variant's name; pick another name")
        heads[name] = HeadMask.parse(spec, shape).heads
        if not heads[name]:
            raise RetmaskError(f"masks: {name!r} names no head; write {name}=layer-head,..., e.g. {name}=17-3")
    if len(heads) > MAX_MASKS - 1:
        raise RetmaskError(f"{len(heads)} masks; the gate holds at most {MAX_MASKS - 1}: drop some variants or masks")
    plain = ServedMask(PLAIN, (), 0, None)
    served = {PLAIN: plain, "normal": plain}
    for slot, (name, hs) in enumerate(heads.items(), start=1):
        served[name] = ServedMask(name, hs, slot, mask_salt(hs, shape))
    return served


# ---------------------------------------------------------------------------------------------------
# the request side: mask names -> the gate's slot and the mask's cache salt


class _BadMask(Exception):
    pass


class MaskRouter:
    """ASGI middleware: rewrites a POST's JSON body so that a mask named by the request reaches the gate.

    Innermost in the app (after authentication and CORS), so only requests vLLM would serve see it.
    """

    def __init__(self, app, masks: dict[str, ServedMask], served_name: str):
        from pipeline.gate import MASK_ARG

        self.app, self.masks, self.served_name, self.mask_arg = app, masks, served_name, MASK_ARG

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            rewritten = self.rewrite(scope["path"], body)
        except _BadMask as err:
            return await _json_error(send, str(err))
        if rewritten is not None:
            body = rewritten
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client's disconnect, as vLLM expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def rewrite(self, path: str, body: bytes) -> bytes | None:
        """The body with its mask name turned into a slot and a cache salt; None: leave it as it is."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # vLLM answers a body that is not JSON itself
        if not isinstance(data, dict):
            return None
        names = []
        model = data.get("model")
        if isinstance(model, str) and model.startswith(self.served_name + ":"):
            names.append(model[len(self.served_name) + 1:])
            data["model"] = self.served_name
        xargs = data.get("vllm_xargs")
        if isinstance(xargs, dict) and self.mask_arg in xargs:
            if not isinstance(xargs[self.mask_arg], str):
                raise _BadMask(f"vllm_xargs.{self.mask_arg} must be a mask name, one of {self._known()}")
            names.append(xargs[self.mask_arg])
        sampling = data.get("sampling_params")
        if isinstance(sampling, dict) and self.mask_arg in (sampling.get("extra_args") or {}):
            raise _BadMask(f"name a mask with vllm_xargs.{self.mask_arg} on {' or '.join(MASKED_PATHS)}")
        if not names:
            return None
        if len(set(names)) > 1:
            raise _BadMask(f"the model names mask {names[0]!r} but vllm_xargs.{self.mask_arg} names {names[1]!r}; "
                           "name one")
        mask = self.masks.get(names[0])
        if mask is None:
            raise _BadMask(f"unknown mask {names[0]!r}; known masks: {self._known()}")
        if mask.slot and path not in MASKED_PATHS:
            raise _BadMask(f"head masks apply to {' and '.join(MASKED_PATHS)} only, not {path}")
        xargs = {k: v for k, v in (xargs or {}).items() if k != self.mask_arg}
        if mask.slot:
            xargs[self.mask_arg] = mask.slot
            own = data.get("cache_salt")  # a client's own salt (multi-user isolation) is kept, per mask
            data["cache_salt"] = f"{mask.salt}:{own}" if own else mask.salt
        if xargs:
            data["vllm_xargs"] = xargs
        else:
            data.pop("vllm_xargs", None)
        return json.dumps(data).encode()

    def _known(self) -> str:
        return ", ".join(self.masks)


async def _json_error(send, message: str) -> None:
    # vLLM's own error body, so OpenAI clients raise BadRequestError with this message
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": "model", "code": 400}})
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body.encode()})


# ---------------------------------------------------------------------------------------------------
# the server


def serve(config: ServeConfig, ready: Callable[[str], Any] = log.info) -> int | None:
    """Check everything, load the gated engine, register and prove the masks, then serve until SIGINT or
    SIGTERM; return the signal that stopped the server. ``ready`` gets the address and masks once it listens."""
    from pipeline.engine import gated_engine_args

    engine = config.engine_config()
    path, shape, kwargs = gated_engine_args(engine)  # the checks and settings of GatedLLM.from_config
    masks = named_masks(config, shape)
    _check_port(config.host, config.port)
    served = config.served_model_name or config.model
    aliases = [served] + [f"{served}:{n}" for n in masks if n not in (PLAIN, "normal")]
    args = _server_args(config, path, kwargs, aliases)
    with interruptible_engine_start(), asyncio.Runner(loop_factory=_SignalRecordingLoop) as runner:
        runner.run(_serve(args, masks, served, shape, engine.gate_canary, ready))
        signum = runner.get_loop().received
    if signum is None:
        raise RuntimeError("the server stopped without a signal: the engine died (see the log above)")
    return signum


def _check_port(host: str, port: int) -> None:
    # Before the engine loads (minutes on a big model): vLLM binds the same way, SO_REUSEADDR set.
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        raise RetmaskError(f"cannot listen on {host}:{port} ({err.strerror or err}); pick another port or host") \
            from None


def _server_args(config: ServeConfig, path: str, kwargs: dict, names: list[str]):
    """The arguments ``vllm serve`` would parse for the gated engine (``gated_engine_args``'s settings)."""
    import argparse

    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    flags: dict[str, Any] = {"model": path, "served_model_name": names, "host": config.host, "port": config.port,
                             **kwargs, "default_chat_template_kwargs": config.chat_template_kwargs or None}
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            argv += [flag, *value]
        elif value is not None:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    try:
        return make_arg_parser(FlexibleArgumentParser(exit_on_error=False)).parse_args(argv)
    except argparse.ArgumentError as err:
        raise RetmaskError(f"vLLM refuses the engine settings: {err}") from None


class _SignalRecordingLoop(asyncio.SelectorEventLoop):
    """An event loop that remembers the first signal its handlers got: vLLM's ``serve_http`` installs them and
    drains the engine on SIGINT or SIGTERM, then returns normally; the exit code must still say which one."""

    received: int | None = None

    def add_signal_handler(self, sig, callback, *args):
        def record(*cb_args):
            if self.received is None:
                self.received = sig
            callback(*cb_args)

        super().add_signal_handler(sig, record, *args)


async def _serve(args, masks: dict[str, ServedMask], served: str, shape: ModelShape, canary: bool,
                 ready: Callable[[str], Any]) -> None:
    # vLLM 0.32's run_server_worker + build_and_serve, with the masks registered and the router added
    # between the engine start and the first request.
    from starlette.middleware import Middleware
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    try:
        listen_address, sock = setup_server(args, reuse_port=False)
    except OSError as err:
        raise RetmaskError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err}); pick another port") \
            from None
    try:
        async with build_async_engine_client(args) as client:
            await _register(client, masks)
            if canary and len(masks) > 1:
                await asyncio.to_thread(_prove, client, asyncio.get_running_loop(), masks, shape)
            tasks = await client.get_supported_tasks()
            app = build_app(args, tasks, client.model_config)
            # Innermost, after vLLM's authentication and CORS. build_app has already built the middleware stack
            # (its SageMaker bootstrap does), so rebuild it, as that bootstrap does after adding its own.
            app.user_middleware.append(Middleware(MaskRouter, masks=masks, served_name=served))
            app.middleware_stack = app.build_middleware_stack()
            await init_app_state(client, app.state, args, tasks)
            ready(_describe(listen_address, served, masks))
            log_config = get_uvicorn_log_config(args)
            shutdown = await serve_http(
                app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host, port=args.port,
                log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
                ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                ssl_ciphers=args.ssl_ciphers, h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count,
                **({"log_config": log_config} if log_config is not None else {}))
        await shutdown  # after the engine is gone, as vLLM's run_server_worker does
    finally:
        sock.close()


async def _register(client, masks: dict[str, ServedMask]) -> None:
    from pipeline.engine import check_held

    for mask in masks.values():
        if mask.slot:
            held = await client.collective_rpc("retmask_register_mask", args=(mask.slot, list(mask.heads)))
            check_held(held, mask.heads, f"of mask {mask.name}")


def _prove(client, loop, masks: dict[str, ServedMask], shape: ModelShape) -> None:
    """The gate canary's per-request check (``GateCanary.check_slots``), run from a worker thread."""
    from pipeline.canary import GateCanary
    from pipeline.gate import MASK_ARG

    canary = GateCanary(_BlockingEngine(client, loop), None, None, shape.num_layers)
    canary.check_slots({m.heads: m.slot for m in masks.values() if m.slot}, MASK_ARG)


class _BlockingEngine:
    """What ``GateCanary`` reads of a ``vllm.LLM``, over the server's async engine client; for a worker thread
    while the event loop runs."""

    def __init__(self, client, loop):
        self.client, self.loop = client, loop
        self.llm_engine = SimpleNamespace(model_config=client.model_config)

    def get_tokenizer(self):
        return self.client.get_tokenizer()

    def generate(self, items: list, params: list, use_tqdm: bool = False) -> list:
        async def one(item, p):
            final = None
            async for out in self.client.generate(item, p, request_id=f"retmask-canary-{uuid.uuid4().hex}"):
                final = out
            return final

        async def batch():
            return await asyncio.gather(*(one(item, p) for item, p in zip(items, params)))

        return asyncio.run_coroutine_threadsafe(batch(), self.loop).result()


def _describe(address: str, served: str, masks: dict[str, ServedMask]) -> str:
    from pipeline.canary import mask_label

    lines = [f"serving {served} at {address}/v1 (OpenAI API); masks by name, as vllm_xargs "
             f"{{\"retmask_mask\": NAME}} or model {served}:NAME:"]
    for name, mask in masks.items():
        lines.append(f"  {name:>18}: {mask_label(mask.heads) if mask.heads else 'the plain model'}")
    return "\n".join(lines)
