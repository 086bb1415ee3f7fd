"""Write an OpenVINO Model Server model repository for one or more exported IRs.

Each ``--model [NAME=]DIR`` becomes a servable: ``OUTPUT/NAME/`` holds the IR
(hard-linked where possible) and a ``graph.pbtxt`` for text generation with
the scheduler settings below (the same names as ``tangquant serve``'s and
OVMS's), and ``OUTPUT/config.json`` lists them in ``model_config_list``. The
IR's own ``runtime_options`` that the device takes, and ``--ov-config``, go into
the graph's ``plugin_config``. OVMS applies no LoRA adapter to an LLM graph, so
a fine-tune is served as its merged IR (``tangquant merge`` + ``quantize`` +
``export``) under its own name.

Serve it and call it:
  tangquant ovms-repo --model tang=out/tang-ov --model base=out/base-ov --output repo
  ovms --rest_port 8000 --config_path repo/config.json
  # OpenAI client: base_url="http://localhost:8000/v3", model="tang"
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tangquant import files, load, recipe
from tangquant.errors import InputError
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "write an OpenVINO Model Server model repository (config.json + graph.pbtxt) for IRs"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# The files the repository itself holds beside the servables' directories (ov/ovms.CONFIG).
RESERVED = ("config.json", files.MANIFEST)


@dataclass(frozen=True)
class OvmsParams:
    max_num_seqs: int = param(256, "sequences generated at once (OVMS max_num_seqs)", metavar="N")
    cache_size: int = param(0, "KV cache in GB (0: grows as needed, OVMS's default)",
                            metavar="GB")
    max_num_batched_tokens: int | None = param(None, "tokens one step may process (OVMS's "
                                               "default 256)", metavar="N")
    enable_prefix_caching: bool = param(False, "keep the KV blocks of earlier prompts for reuse")
    max_tokens_limit: int | None = param(None, "largest max_tokens a request may ask for",
                                         metavar="N")
    device: str = param("CPU", "OpenVINO device OVMS runs the model on")
    ov_config: tuple[str, ...] = param((), "OpenVINO property for plugin_config (repeatable), on "
                                       "top of the IR's runtime_options", metavar="KEY=VALUE",
                                       repeat=True)

    def __post_init__(self):
        require(not isinstance(self.max_num_seqs, bool) and self.max_num_seqs >= 1,
                f"--max-num-seqs must be >= 1, got {self.max_num_seqs}")
        require(self.cache_size >= 0, f"--cache-size must be >= 0, got {self.cache_size}")
        for name in ("max_num_batched_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1")
        for spec in self.ov_config:
            key, sep, value = spec.partition("=")
            require(sep and re.match(r"^[A-Z][A-Z0-9_]*$", key) and value,
                    f"--ov-config must be KEY=VALUE with an upper-case KEY, got {spec[:80]!r}")


PARAMS = OvmsParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, action="append", metavar="[NAME=]DIR",
                        help="an exported OpenVINO IR, served as NAME (default: the directory's "
                        "name); repeatable")
    parser.add_argument("--output", required=True, help="the model repository to write")
    parser.add_argument("--adapter", action="append", metavar="NAME=DIR",
                        help="refused: OVMS's LLM graphs take no LoRA adapter (see above)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> dict:
    if args.adapter:
        raise InputError("OpenVINO Model Server applies no LoRA adapter to a text-generation "
                         "graph; merge the adapter (tangquant merge, quantize, export) and pass "
                         "the merged IR as another --model NAME=DIR")
    return ovms_repo(args.model, args.output, recipe.from_args(OvmsParams, args),
                     force=args.force)


def _servables(specs) -> dict[str, Path]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=") if "=" in spec else ("", "", spec)
        md = load.inspect(path, kinds=("ir",))
        name = name if sep else md.path.name
        if not NAME.match(name):
            raise InputError(f"servable name {name[:80]!r} must be letters, digits and ._- "
                             "(it becomes a directory)")
        if name in RESERVED:
            raise InputError(f"servable name {name!r} is the name of the repository's own {name}; "
                             "give the IR another NAME=DIR")
        if name in out:
            raise InputError(f"two servables are named {name!r}; give them NAME=DIR")
        out[name] = md.path
    return out


def ovms_repo(models, output, params: OvmsParams | None = None, force: bool = False,
              **overrides) -> dict:
    """Write the repository for ``models`` (``[NAME=]DIR`` strings) to ``output``."""
    from tangquant.ov import options, ovms  # the layout (standard library), OpenVINO's checks
    from tangquant.server import sizing  # which runtime options the device takes (OpenVINO)

    p = recipe.resolve(OvmsParams, params, overrides)
    servables = _servables([models] if isinstance(models, (str, Path)) else models)
    out = files.check_output(output, list(servables.values()), force)
    explicit = dict(s.partition("=")[::2] for s in p.ov_config)
    graphs = {}
    for name, ir in servables.items():
        plugin, skipped = sizing.plugin_properties(ir, p.device, explicit)
        for key, why in skipped.items():
            logger.debug("%s: runtime option %s left out of plugin_config: %s", name, key, why)
        # The IR's runtime options are input: a value OVMS would refuse is refused here.
        options.check_values(p.device, plugin, f"{ir} (runtime_options or --ov-config)")
        graphs[name] = ovms.graph(ovms.calculator_options(p, plugin))
    with files.atomic_output_dir(out) as tmp:
        config = ovms.write_repo(tmp, servables, graphs)
        files.write_manifest(tmp, "ovms-repo", dataclasses.asdict(p),
                             {n: str(d) for n, d in servables.items()})
    names = ", ".join(servables)
    return {"output": str(out), "servables": list(servables), "config": config,
            "summary": f"{out}  OVMS repository: {names}  (ovms --rest_port 8000 "
                       f"--config_path {out / ovms.CONFIG})"}
