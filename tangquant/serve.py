"""Serve an exported model: an OpenAI-compatible API and a web chat page.

Routes: POST /v1/chat/completions and /v1/completions (streaming SSE ending in
`data: [DONE]`, or one JSON reply with `usage`; `response_format` json_schema and
json_object), GET /v1/models, GET /health, GET /metrics (Prometheus), and the
chat page at /. Generation runs on one openvino-genai ContinuousBatchingPipeline
shared by all requests: --max-num-seqs sequences at once (--max-concurrency is
its old name), up to --queue-size more requests wait, and beyond that the server
answers 429 with Retry-After. The scheduler flags carry OpenVINO Model Server's
names. A generation stops when its client disconnects or its --timeout passes.

A GGUF (tangquant export --format gguf) runs in llama.cpp instead, in a child
process, --max-num-seqs sequences batched together, behind the same API, limits
and /metrics; a deployment directory (tangquant tune --apply) runs the engine,
file and settings it chose. A flag or request field an engine cannot honour
(--adapter on llama.cpp, an OpenVINO-only setting) is refused in one line.

--adapter NAME=DIR (repeatable) serves a peft LoRA adapter on the same base IR:
a request with "model": NAME gets it, applied at run time (scale lora_alpha/r).
--ray deploys the same app on Ray Serve with --replicas N engines.

The server listens on 127.0.0.1 unless --allow-public is given. Give an API
key through the TANGQUANT_API_KEY environment variable (or --api-key, which
other users can see in `ps`); every /v1 route then needs
`Authorization: Bearer KEY`.

Example:
  TANGQUANT_API_KEY=secret tangquant serve --model out/ov --port 8000 \
      --adapter tang=saves/tang-lora --max-num-seqs 8
  tangquant serve --model out/poet    # the deployment tune --apply wrote
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from tangquant import draft, engines, load, recipe
from tangquant.errors import ServeError
from tangquant.generate import open_model
from tangquant.server.config import API_KEY_ENV, ServeConfig

logger = logging.getLogger(__name__)

HELP = "serve an exported model: OpenAI-compatible API and a web chat page"
PARAMS = ServeConfig


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an exported OpenVINO IR or GGUF (tangquant export), or a deployment "
                        "directory (tangquant tune --apply)")


def run(args) -> dict:
    cfg = recipe.from_args(ServeConfig, args)
    if cfg.api_key:
        logger.warning("warning: --api-key is visible in the process list; "
                       "prefer the %s environment variable", API_KEY_ENV)
    elif os.environ.get(API_KEY_ENV):
        cfg = recipe.resolve(ServeConfig, cfg, {"api_key": os.environ[API_KEY_ENV]})
    serve(args.model, cfg)
    return {}


def serve(model, params: ServeConfig | None = None, **overrides) -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM)."""
    cfg = recipe.resolve(ServeConfig, params, overrides)
    if cfg.ray:
        return _serve_on_ray(model, cfg)
    server = prepare(model, cfg)
    engine = server.engine
    models = ", ".join(engine.models())
    print(f"serving {models} at {server.url} ({engine.status()['engine']} engine, {cfg.max_num_seqs} "
          f"sequence(s), queue {cfg.queue_size}, API key "
          f"{'required' if cfg.api_key else 'not required'})", flush=True)
    if getattr(engine, "plan_", None) is not None:
        logger.info("%s", engine.plan_.describe())
    if engine.properties:
        logger.info("OpenVINO properties: %s", ", ".join(f"{k}={v}" for k, v in
                                                         sorted(engine.properties.items())))
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn has already shut down gracefully, then re-raised Ctrl-C / SIGTERM
    logger.info("server stopped")


def _serving_engine(model, cfg: ServeConfig):
    """(the checked model, its engine row, the settings and name it runs with): a deployment's
    choice or the engine the model's format runs in; what the settings ask for that the engine
    lacks is refused in one line."""
    engine, md, settings = open_model(model, "serve")
    if cfg.adapter:
        engine.require("multi_lora", "--adapter")
    if cfg.draft:  # the draft in the model's format, with its tokenizer and chat template
        engine.require("draft", "--draft")
        draft.check(md.path, load.inspect(cfg.draft, kinds=engine.models, what="draft").path)
    if engine.name == "ov" and settings:  # the OpenVINO factory takes them as --ov-config and flags
        cfg = ov_settings(cfg, settings)
        settings = {}
    if not cfg.model_name:  # the name the user gave the model by, not a file inside it
        cfg = recipe.resolve(ServeConfig, cfg, {"model_name": Path(model).resolve().name.removesuffix(".gguf")})
    return md, engine, cfg, settings


def ov_settings(cfg: ServeConfig, settings: dict) -> ServeConfig:
    """A deployment's OpenVINO choice as serve's own settings; the flags given win."""
    options, extra = dict(settings["options"]), {}
    if settings.get("threads"):
        options.setdefault("INFERENCE_NUM_THREADS", str(settings["threads"]))
    for key in ("cache_size", "enable_prefix_caching"):
        if key in options and getattr(cfg, key) == ServeConfig.__dataclass_fields__[key].default:
            value = options[key]
            extra[key] = int(value) if key == "cache_size" else engines.is_true(value)
    if options.pop("ATTENTION_BACKEND", "PA") != "PA":
        logger.warning("warning: the deployment chose ATTENTION_BACKEND for a single pipeline; the "
                       "server's continuous batching always runs paged attention")
    given = {s.partition("=")[0] for s in cfg.ov_config}
    props = [f"{k}={v}" for k, v in sorted(options.items())
             if k not in given and k not in ("cache_size", "enable_prefix_caching", "device")]
    return recipe.resolve(ServeConfig, cfg, {**extra, "ov_config": tuple(props) + cfg.ov_config})


def _serve_on_ray(model, cfg: ServeConfig) -> None:
    from tangquant.server import ray_env, runner

    runner.check_exposure(cfg)
    md, engine, cfg, _ = _serving_engine(model, cfg)
    if engine.name != "ov":
        raise ServeError(f"--ray runs OpenVINO IRs; this model runs in the {engine.name} engine, "
                         "on one machine")
    # Loopback and a token for a local instance: set before Ray is imported (it reads them once).
    with ray_env.prepared(cfg.ray_public_head) as instance:
        try:
            from tangquant.server import ray_app  # Ray Serve: the [ray] extra
        except ImportError as exc:
            raise ServeError(f"--ray needs Ray Serve ({exc.name} is missing): "
                             "pip install 'tangquant[ray]'") from None
        ray_app.serve_forever(md.path, cfg, instance)


def prepare(model, params: ServeConfig | None = None, **overrides):
    """Check the settings, load the model, bind the socket; return a ready ``Server``."""
    from tangquant.server import runner  # the engine: uvicorn, FastAPI, openvino-genai

    cfg = recipe.resolve(ServeConfig, params, overrides)
    runner.check_exposure(cfg)
    md, engine, cfg, settings = _serving_engine(model, cfg)
    factory = engines.entry(engine.serve)
    return runner.build(md.path, cfg, open_engine=functools.partial(factory, **settings) if settings else factory)
