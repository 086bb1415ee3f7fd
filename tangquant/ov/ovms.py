"""An OpenVINO Model Server model repository for exported IRs: what OVMS serves unchanged.

The layout is the one OVMS's own exporter writes (``ovms --pull --task
text_generation``, ``demos/common/export_models/export_model.py``, as of OVMS
2026.3): ``config.json`` with a ``model_config_list`` entry per servable whose
``base_path`` is a directory holding the IR and a ``graph.pbtxt``. The graph is
OVMS's text-generation graph (``HttpLLMCalculator`` with the LLM node resources
and execution contexts side packets) with the scheduler settings in
``LLMCalculatorOptions``, which carry the same names as ``tangquant serve``'s
flags. OVMS's LLM graphs have no LoRA option (LoRA adapters exist only for its
image-generation graphs), so a fine-tune is served by OVMS as its own merged IR:
one servable per IR.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tangquant.files import write_json

GRAPH = "graph.pbtxt"
CONFIG = "config.json"
GRAPH_TEMPLATE = """# OVMS_GRAPH_QUEUE_MAX_SIZE: AUTO
# written by tangquant ovms-repo: OpenVINO Model Server text generation graph
input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"

node: {{
  name: "LLMExecutor"
  calculator: "HttpLLMCalculator"
  input_stream: "LOOPBACK:loopback"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "LLM_NODE_RESOURCES:llm"
  input_side_packet: "LLM_NODE_EXECUTION_CONTEXTS:llm_ctx"
  output_stream: "LOOPBACK:loopback"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  input_stream_info: {{
    tag_index: 'LOOPBACK:0',
    back_edge: true
  }}
  node_options: {{
      [type.googleapis.com / mediapipe.LLMCalculatorOptions]: {{
{options}
      }}
  }}
  input_stream_handler {{
    input_stream_handler: "SyncSetInputStreamHandler",
    options {{
      [mediapipe.SyncSetInputStreamHandlerOptions.ext] {{
        sync_set {{
          tag_index: "LOOPBACK:0"
        }}
      }}
    }}
  }}
}}
"""


def _pbtxt_string(text: str, quote: str = '"') -> str:
    return quote + text.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def graph(options: dict) -> str:
    """``graph.pbtxt`` with ``options`` (LLMCalculatorOptions fields, in order) filled in."""
    lines = []
    for key, value in options.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif key == "plugin_config":  # a JSON object in single quotes, as OVMS writes it
            text = _pbtxt_string(value, "'")
        else:
            text = _pbtxt_string(value)
        lines.append(f"          {key}: {text},")
    return GRAPH_TEMPLATE.format(options="\n".join(lines).rstrip(","))


def calculator_options(p, plugin_config: dict) -> dict:
    """LLMCalculatorOptions from the stage parameters (OVMS's defaults where unset)."""
    options = {"models_path": "./", "device": p.device, "max_num_seqs": p.max_num_seqs,
               "cache_size": p.cache_size, "enable_prefix_caching": p.enable_prefix_caching}
    if p.max_num_batched_tokens:
        options["max_num_batched_tokens"] = p.max_num_batched_tokens
    if p.max_tokens_limit:
        options["max_tokens_limit"] = p.max_tokens_limit
    if plugin_config:
        options["plugin_config"] = json.dumps(plugin_config, sort_keys=True)
    return options


def _place(src: Path, dst: Path) -> None:
    """Hard-link each file of ``src`` into ``dst`` (a copy across file systems)."""
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_dir():
            _place(path, dst / path.name)
            continue
        try:
            os.link(path, dst / path.name)
        except OSError:
            shutil.copy2(path, dst / path.name)


def write_repo(tmp: Path, servables: dict[str, Path], graphs: dict[str, str]) -> dict:
    """Write the repository into ``tmp``: one directory per servable, then ``config.json``."""
    entries = []
    for name, ir in servables.items():
        _place(ir, tmp / name)
        (tmp / name / GRAPH).write_text(graphs[name], encoding="utf-8")
        entries.append({"config": {"name": name, "base_path": name}})
    config = {"model_config_list": entries}
    write_json(tmp / CONFIG, config)
    return config
