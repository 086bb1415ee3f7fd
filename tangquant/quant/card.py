"""The quantized model's card (``README.md``) and manifest (``tangquant.json``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tangquant.files import package_versions, write_manifest


def _fidelity_lines(f: dict | None, data: str | None) -> list[str]:
    if not f:
        return ["Not measured: no held-out data (give `--calib` with at least 10 documents, "
                "or `--eval-data`)."]
    return [f"Held-out data: {data}; {f['samples']} samples, {f['tokens']} predicted tokens.", "",
            "| metric | value |", "|---|---|",
            f"| perplexity, quantized | {f['ppl_model']:.4f} |",
            f"| perplexity, source | {f['ppl_reference']:.4f} |",
            f"| mean KL(source ‖ quantized), nats/token | {f['kld']:.6f} |",
            f"| top-1 agreement | {100 * f['top1_agreement']:.2f}% |"]


def write_card(out_dir: Path, source: Path, r, m: dict) -> None:
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
    ]
    (Path(out_dir) / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_quant_manifest(out_dir: Path, source: Path, r, m: dict) -> dict:
    inputs = {"model": str(source)}
    if r.calib:
        inputs["calib"] = str(Path(r.calib).resolve())
    if r.eval_data:
        inputs["eval_data"] = str(Path(r.eval_data).resolve())
    return write_manifest(out_dir, "quantize", dataclasses.asdict(r), inputs, metrics=m)
