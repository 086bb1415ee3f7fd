"""The table of engines: every runtime tangquant runs a model in, declared once.

A row says what an engine is called (the bench kind in ``--candidate NAME=KIND:PATH``), which
model formats it reads (names :func:`tangquant.load.inspect` gives), the options it takes and
how each is checked, where its bytes-per-token count and its bench runner live, which Python
runs it, what it can do (streaming, several LoRAs, continuous batching, JSON-schema output, a
draft model), and — where it has them — the entry points ``chat`` and ``serve`` open it with.
``bench``, ``tune``, ``chat``, ``serve`` and the bench worker read this table and nothing else
to know an engine; adding one is a row here plus its runner module (docs/design.md).

Standard library only: the bench worker imports this in the seed baseline's Python. Entry
points are ``"module:function"`` strings, imported only when called (:func:`entry`), so the
table costs nothing at import and names upper layers without importing them.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from tangquant.errors import EngineError

# What an engine can do; chat and serve refuse a request for a capability its engine lacks.
CAPABILITIES = {
    "stream": "token streaming",
    "adapter": "run-time LoRA adapter support",
    "multi_lora": "support for several LoRA adapters on one base, chosen per request",
    "batching": "continuous batching of concurrent requests",
    "json_schema": "JSON-schema constrained output (response_format)",
    "draft": "speculative decoding with a draft model in chat and serve",
}
_PROPERTY = re.compile(r"^[A-Z][A-Z0-9_]*$")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Option:
    """One ``key=value`` an engine takes; :meth:`check` refuses a bad value before any run."""

    name: str
    kind: str                  # int, float, bool, choice, path or text
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    needs: str | None = None   # another option this one means nothing without

    def check(self, value: str) -> str:
        text = str(value).strip()
        if self.kind == "int":
            ok = re.fullmatch(r"-?\d{1,12}", text) is not None and self._above(int(text))
        elif self.kind == "float":
            try:
                number = float(text)
            except ValueError:
                number = float("nan")
            ok = number == number and abs(number) != float("inf") and self._above(number)
        elif self.kind == "bool":
            ok = text.lower() in _TRUE + _FALSE
        elif self.kind == "choice":
            ok = text.lower() in self.choices
            text = text.lower()
        else:  # path, text
            ok = bool(text) and "\x00" not in text
        if not ok:
            raise EngineError(f"option {self.name}={value!r}: {self.expects()}")
        return text

    def _above(self, number: float) -> bool:
        return self.minimum is None or number >= self.minimum

    def expects(self) -> str:
        if self.kind == "choice":
            return f"takes one of {', '.join(self.choices)}"
        if self.kind == "bool":
            return "takes 0 or 1 (true or false)"
        if self.kind in ("int", "float"):
            word = "an integer" if self.kind == "int" else "a finite number"
            return f"takes {word}" + (f" >= {self.minimum:g}" if self.minimum is not None else "")
        return "takes a non-empty path" if self.kind == "path" else "takes a non-empty value"


def is_true(value) -> bool:
    """A checked ``bool`` option's value as a bool."""
    return str(value).strip().lower() in _TRUE


@dataclass(frozen=True)
class Engine:
    name: str
    runtime: str                        # the library that runs it, for tables and errors
    models: tuple[str, ...]             # model formats it reads (load.inspect's kinds)
    runner: str                         # the bench worker's entry: run(spec) -> metrics
    bytes_per_token: str                # (path, options) -> {"bytes_per_token", ...}
    help: str
    options: tuple[Option, ...] = ()
    properties: bool = False            # also takes OpenVINO properties (UPPER_CASE keys)
    required: tuple[str, ...] = ()
    python: str = "tangquant"           # or "baseline": the seed's own environment (--baseline-python)
    capabilities: frozenset[str] = frozenset()
    chat: str | None = None             # generator class for `tangquant chat`
    serve: str | None = None            # engine factory for `tangquant serve`
    tune_grid: str | None = None        # (threads, flags) -> axes for `tangquant tune`
    tune_gate: str | None = None        # tune's fidelity worker: run(spec) -> KLD and greedy checks
    adapter_option: str | None = None   # the option naming a LoRA directory, if any
    instead: tuple[tuple[str, str], ...] = ()  # (capability, what to do instead) for a refusal
    extras: tuple[str, ...] = field(default=())  # the pip extra(s) that install its runtime

    def option(self, key: str) -> Option | None:
        return next((o for o in self.options if o.name == key), None)

    def check_options(self, options: dict) -> dict[str, str]:
        """``options`` checked against this row: unknown or ignored keys and bad values refused."""
        out = {}
        for key, value in options.items():
            opt = self.option(key)
            if opt is not None:
                out[key] = opt.check(value)
            elif self.properties and _PROPERTY.match(key):
                if not str(value).strip():
                    raise EngineError(f"OpenVINO property {key} needs a value")
                out[key] = str(value).strip()
            else:
                raise EngineError(f"the {self.name} engine takes no option {key!r}; it takes "
                                  f"{self.accepted()}")
        lone = [k for k in out if self.option(k) and self.option(k).needs not in (None, *out)]
        if lone:
            raise EngineError(f"option {lone[0]} needs {self.option(lone[0]).needs}=…")
        missing = [k for k in self.required if k not in out]
        if missing:
            raise EngineError(f"kind {self.name} needs {', '.join(f'{k}=…' for k in missing)}"
                              .replace("adapter=…", "adapter=DIR"))
        return out

    def accepted(self) -> str:
        names = [o.name for o in self.options] + (["OpenVINO properties (UPPER_CASE=value)"]
                                                  if self.properties else [])
        return ", ".join(names) or "no options"

    def has(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, asked_by: str) -> None:
        """Refuse, in one line, a feature this engine lacks (never drop it silently)."""
        if capability not in self.capabilities:
            hint = dict(self.instead).get(capability)
            raise EngineError(f"{asked_by}: the {self.name} engine ({self.runtime}) has no "
                              f"{CAPABILITIES[capability]}" + (f"; {hint}" if hint else ""))


def entry(ref: str):
    """The object a ``"module:attribute"`` entry point names (imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- the rows -------------------------------------------------------------------------------

_OV_RUNTIME = (Option("device", "text", "OpenVINO device (CPU)"),
               Option("cache_size", "int", "paged-attention KV cache, GB (openvino-genai's scheduler)",
                      minimum=1),
               Option("enable_prefix_caching", "bool", "openvino-genai's prefix caching"))
_LORA = (Option("adapter", "path", "a peft LoRA adapter directory"),
         Option("alpha", "float", "the LoRA scale (default lora_alpha / r)"),
         Option("lora_mode", "choice", "openvino-genai's adapter mode",
                choices=("auto", "dynamic", "static_rank")))
_DTYPE = Option("dtype", "choice", "load dtype", choices=("bf16", "fp16", "fp32"))
_KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")  # gguf.runtime.KV_TYPES
_LLAMACPP = (Option("repack", "bool", "llama.cpp's CPU weight repacking (use_extra_bufts; AMX's buffer too)"),
             Option("ctk", "choice", "the K cache's type (llama.cpp -ctk; default f16)", choices=_KV_TYPES),
             Option("ctv", "choice", "the V cache's type (llama.cpp -ctv; default f16; quantized needs fa)",
                    choices=_KV_TYPES),
             Option("fa", "choice", "flash attention (llama.cpp -fa on|off|auto, or llama-bench's 1|0; "
                    "default auto)", choices=("auto", "on", "off", "1", "0")))

# Speculative decoding (tangquant/draft.py checks the pair; the runners record the acceptance).
_DRAFT = (Option("draft", "path", "a draft model with the target's tokenizer, in the same format "
                 "(an IR for ov, a GGUF for llamacpp), for speculative decoding"),
          Option("draft_tokens", "int", "tokens the draft proposes per target step (default 4)",
                 minimum=1, needs="draft"))

ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("ov", "openvino-genai", ("ir",), "tangquant.measure.runners.ov:run",
           "tangquant.measure.roofline:ir_per_token",
           "an OpenVINO IR directory through openvino-genai (the merged INT4 model)",
           options=_OV_RUNTIME + _DRAFT, properties=True,
           capabilities=frozenset({"stream", "multi_lora", "batching", "json_schema", "draft"}),
           chat="tangquant.generators:OVGenerator", serve="tangquant.server.runner:open_engine",
           tune_grid="tangquant.ov.options:tune_grid", tune_gate="tangquant.ov.gate:run"),
    Engine("ov+lora", "openvino-genai", ("ir",), "tangquant.measure.runners.ov:run",
           "tangquant.measure.roofline:ir_per_token",
           "an OpenVINO base IR plus adapter=DIR through genai's Adapter (alpha = lora_alpha/r)",
           options=_OV_RUNTIME + _LORA, properties=True, required=("adapter",),
           capabilities=frozenset({"stream", "adapter", "multi_lora", "batching", "json_schema"}),
           adapter_option="adapter"),
    Engine("torch-gptq+lora", "transformers + gptqmodel", ("gptq",), "tangquant.measure.runners.hf:run",
           "tangquant.measure.roofline:checkpoint_per_token",
           "the seed baseline: a GPTQ checkpoint plus the un-merged peft adapter=DIR, transformers + "
           "gptqmodel in bf16, run in the baseline environment's python",
           options=(_DTYPE, _LORA[0]), python="baseline",
           capabilities=frozenset({"stream", "adapter"}), adapter_option="adapter"),
    Engine("torch", "transformers", ("hf", "gptq"), "tangquant.measure.runners.hf:run",
           "tangquant.measure.roofline:checkpoint_per_token",
           "any Hugging Face directory via transformers (dtype=bf16|fp32, adapter=DIR)",
           options=(_DTYPE, _LORA[0]), capabilities=frozenset({"stream", "adapter"}),
           chat="tangquant.generators:HFGenerator", adapter_option="adapter"),
    Engine("llamacpp", "llama.cpp", ("gguf",), "tangquant.measure.runners.llamacpp:run",
           "tangquant.measure.roofline:gguf_per_token",
           "a GGUF file (or a directory holding one) through llama.cpp (llama-cpp-python's low-level "
           "API); repack=0|1 turns its CPU weight repacking (AMX's too) off or on, ctk/ctv set the KV "
           "cache types and fa flash attention (llama-bench's -ctk/-ctv/-fa; defaults as llama.cpp)",
           options=_LLAMACPP + _DRAFT,
           capabilities=frozenset({"stream", "batching", "json_schema"}), extras=("llamacpp",),
           instead=(("draft", "draft with an IR pair, or measure a GGUF pair with `tangquant bench "
                              "--candidate NAME=llamacpp:T.gguf,draft=D.gguf`"),),
           chat="tangquant.generators:LlamaCppGenerator", serve="tangquant.server.llamacpp:open_engine",
           tune_grid="tangquant.gguf.options:tune_grid", tune_gate="tangquant.gguf.gate:run"),
    Engine("iklcpp", "ik_llama.cpp", ("gguf",), "tangquant.measure.runners.iklcpp:run",
           "tangquant.measure.roofline:gguf_per_token",
           "a GGUF file (or a directory holding one) through ik_llama.cpp, llama.cpp's CPU fork (natively "
           "built: sh .ci/install-iklcpp); rtr, mqkv, fa, gr as its -rtr, -mqkv, -fa, -gr (unset: its defaults)",
           options=(Option("rtr", "bool", "run-time repacking of the weights (ik_llama.cpp -rtr; default off)"),
                    Option("mqkv", "bool", "Q, K and V merged into one tensor (-mqkv; default off)"),
                    Option("fa", "bool", "flash attention (-fa; default on)"),
                    Option("gr", "bool", "graph reuse between decode steps (-gr; default on)"),
                    Option("threads_batch", "int", "the prefill's threads (-tb; default -t)", minimum=1))),
    Engine("ortgenai", "onnxruntime-genai", ("ortgenai",), "tangquant.measure.runners.ortgenai:run",
           "tangquant.ortgenai.model:per_token",
           "an ONNX Runtime GenAI model directory (tangquant export --format ortgenai) on ONNX Runtime's CPU "
           "provider, -t intra-op threads", extras=("ortgenai",)),
)}


def describe() -> str:
    """The kinds and their options, for ``tangquant bench --help``."""
    lines = []
    for e in ENGINES.values():
        lines.append(f"  {e.name:<16} {e.help}")
        if e.options or e.properties:
            lines.append(f"  {'':<16} options: {e.accepted()}")
    return "\n".join(lines)


def get(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown kind {name!r}; choose one of {', '.join(ENGINES)}") from None


def for_model(kind: str, use: str) -> Engine:
    """The engine ``chat`` or ``serve`` (``use``) runs a model of format ``kind`` in."""
    for engine in ENGINES.values():
        if kind in engine.models and getattr(engine, use):
            return engine
    users = sorted({k for e in ENGINES.values() if getattr(e, use) for k in e.models})
    raise EngineError(f"`tangquant {use}` runs {' or '.join(users)} models, not {kind}")
