"""The quantized model's card (``README.md``) and manifest (``tangquant.json``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tangquant import card
from tangquant.files import write_manifest
from tangquant.host import package_versions


EXPORT_API = """from tangquant import export, evaluate
ir = export("THIS_DIR", "OUT/openvino")                  # the same integers; format="gguf" for llama.cpp
print(evaluate(ir["output"], "SOURCE_DIR", "heldout.json")["kld"])"""


def _fidelity_lines(f: dict | None, data: str | None) -> list[str]:
    from tangquant.measure.klstats import format_block  # numpy: quantize's module stays light

    if not f:
        return ["Not measured: no held-out data (give `--calib` with at least 10 documents, "
                "or `--eval-data`)."]
    return [f"Held-out data: {data}; {f['samples']} samples, {f['tokens']} predicted tokens. "
            "The statistics of `llama-perplexity --kl-divergence` (Q: this checkpoint, base: the "
            "source; KL(source ‖ quantized) in nats/token); `tangquant eval` prints the same block.", "",
            "```text", *format_block(f), "```"]


def write_card(out_dir: Path, source: Path, r, m: dict, lineage: dict) -> None:
    params = dataclasses.asdict(r)
    lines = [
        f"# {source.name} — INT{r.bits} {r.algo.upper()} (GPTQ layout)", "",
        f"Weight-only INT{r.bits} quantization of `{source}` made with tangquant using Intel "
        f"neural-compressor {package_versions().get('neural-compressor-pt', '?')} ({r.algo}; "
        f"driver: {m.get('driver', 'INC whole model')}).",
        f"Checkpoint layout: AutoGPTQ `{m['checkpoint_format']}` (qweight/qzeros/scales/g_idx, "
        "fp16 scales), as Qwen's own `*-GPTQ-Int4` releases; embeddings and lm_head in fp16.", "",
        "## Parameters", "", "| key | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in params.items()], "",
        f"Calibration: {m['calibration']}.", "",
        f"Quantized layers: {m['quantized_layers']}; {m['bits_per_weight']:.3f} bits per quantized "
        "weight (qweight + qzeros + scales bytes).", "",
        "## Fidelity against the source", "", *_fidelity_lines(m.get("fidelity"), m.get("fidelity_data")),
        "", f"Quantization took {m['seconds_quantize']:.1f} s (peak RSS "
        f"{m['peak_rss_bytes'] / 2**30:.2f} GiB).", "",
        card.use_section(EXPORT_API),
    ]
    meta = card.front_matter(lineage, "quantized", card.LIBRARY["gptq"],
                             tags=("gptq", f"int{r.bits}", f"{r.bits}-bit", r.algo))
    card.write(out_dir, meta, "\n".join(lines))


def write_quant_manifest(out_dir: Path, source: Path, r, m: dict) -> dict:
    inputs = {"model": str(source)}
    if r.calib:
        inputs["calib"] = str(Path(r.calib).resolve())
    if r.eval_data:
        inputs["eval_data"] = str(Path(r.eval_data).resolve())
    return write_manifest(out_dir, "quantize", dataclasses.asdict(r), inputs, metrics=m)
