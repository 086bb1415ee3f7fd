"""tangquant: ship a LoRA fine-tune of a Qwen chat model to Xeon CPUs as a faithful INT4 model.

The Python API is the commands' own stage functions and their parameter dataclasses::

    from tangquant import merge, quantize, export, QuantRecipe
    merge("Qwen1.5-7B-Chat", "saves/tang-lora", "work/merged")
    q = quantize("work/merged", "work/int4", QuantRecipe(calib="data/tang/tang_calib.json"))
    export(q["checkpoint"], "work/int4/openvino")

Each returns the metrics the command prints a summary of (``summary`` is that line). The names
resolve when first used (module ``__getattr__``), so ``import tangquant`` loads nothing heavy;
``tangquant.export`` is the function, the module is ``importlib.import_module("tangquant.export")``.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# name -> (module, attribute): the stages, their parameters, and what a caller catches.
API = {
    "data": ("tangquant.data", "data"), "DataParams": ("tangquant.data", "DataParams"),
    "merge": ("tangquant.merge", "merge"), "MergeParams": ("tangquant.merge", "MergeParams"),
    "quantize": ("tangquant.quantize", "quantize"),
    "QuantRecipe": ("tangquant.quant.recipe", "QuantRecipe"),
    "evaluate": ("tangquant.evaluate", "evaluate"), "EvalParams": ("tangquant.evaluate", "EvalParams"),
    "export": ("tangquant.export", "export"), "ExportParams": ("tangquant.export", "ExportParams"),
    "check_template": ("tangquant.check_template", "check_template"),
    "bench": ("tangquant.bench", "bench"), "BenchRecipe": ("tangquant.bench", "BenchRecipe"),
    "tune": ("tangquant.tune", "tune"), "TuneParams": ("tangquant.tune", "TuneParams"),
    "chat": ("tangquant.chat", "chat"), "ChatParams": ("tangquant.chat", "ChatParams"),
    "serve": ("tangquant.serve", "serve"), "ServeConfig": ("tangquant.server.config", "ServeConfig"),
    "run_pipeline": ("tangquant.pipeline", "run_pipeline"), "demo": ("tangquant.demo", "demo"),
    "Sampling": ("tangquant.generate", "Sampling"), "TangquantError": ("tangquant.errors", "TangquantError"),
}
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'tangquant' has no attribute {name!r}")
    module, attribute = API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(API))


class _Package(types.ModuleType):
    """Importing a submodule binds its name on the package (``tangquant.export`` = the module); for
    the API's names the stage function is meant, so that binding is not kept. Code that wants the
    module imports it by its full name (``from tangquant.export import export``,
    ``importlib.import_module("tangquant.export")``)."""

    def __setattr__(self, name, value):
        if name in API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
