"""The ``export --format ortgenai`` directory: ONNX Runtime GenAI's own model builder on the GPTQ
checkpoint, then what it kept checked before anything is published.

The builder (``python -m onnxruntime_genai.models.builder -i GPTQ -o OUT -p int4 -e cpu``) reads a
``quant_method: gptq`` checkpoint's integers straight into ``MatMulNBits`` int4 nodes
(``accuracy_level`` 4: int8 activations on the CPU). It runs in its own process, offline, with
Hugging Face remote code off (its default). Its output is then read back
(:mod:`tangquant.ortgenai.compare`): every GPTQ layer must hold the checkpoint's integers, zero
points and scales; the lm_head, which the checkpoint keeps in fp16, the builder requantizes to
int4 round-to-nearest, and the report says by how much it moved. Last, ONNX Runtime GenAI loads the
directory in a separate process, tokenizes a chat prompt and generates tokens.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from tangquant import card, files, host
from tangquant.card import RANDOM_WEIGHTS
from tangquant.errors import ExportError, first_line
from tangquant.gptq import GPTQCheckpoint
from tangquant.ortgenai import compare

logger = logging.getLogger(__name__)

NO_ORTGENAI = "onnxruntime-genai is not installed: pip install 'tangquant[ortgenai]'"
BUILDER = "onnxruntime_genai.models.builder"
ARCHITECTURES = ("qwen2",)  # the layouts compare.py maps back to the checkpoint's modules
TIMEOUT_S = 6 * 3600
SMOKE_PROMPT = [{"role": "user", "content": "写一首唐诗"}]


def check_exportable(ckpt: GPTQCheckpoint) -> None:
    """Everything knowable before the builder runs."""
    if find_spec("onnxruntime_genai") is None or find_spec("onnx_ir") is None:
        raise ExportError(NO_ORTGENAI)
    if ckpt.bits != 4:
        raise ExportError(f"{ckpt.path}: the ONNX Runtime GenAI export writes int4 MatMulNBits from 4-bit "
                          f"GPTQ, not {ckpt.bits}-bit; quantize with --bits 4")
    if ckpt.desc_act:
        raise ExportError(f"{ckpt.path}: act-order (desc_act) GPTQ permutes the groups, which the int4 blocks "
                          "compared here cannot hold; quantize again without --act-order")
    if ckpt.config.get("model_type") not in ARCHITECTURES:
        raise ExportError(f"{ckpt.path}: model_type {ckpt.config.get('model_type')!r}; the ONNX Runtime GenAI "
                          f"export is checked for {', '.join(ARCHITECTURES)} only")


def write_dir(ckpt: GPTQCheckpoint, out_dir: Path, tokenizer, lineage: dict) -> dict:
    """The builder's directory, checked, with a card and manifest, in the empty ``out_dir``."""
    check_exportable(ckpt)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    run_builder(ckpt.path, out_dir)
    kept = compare.compare(ckpt, out_dir)
    if kept["differs"] or kept["missing"]:
        raise ExportError(f"ONNX Runtime GenAI's builder changed the checkpoint's int4 layers: "
                          f"{', '.join((kept['differs'] + kept['missing'])[:4])} differ or are missing")
    metrics = {"int4_layers_exact": len(kept["exact"]), "requantized": kept["requantized"],
               "embedding": kept["embedding"], "accuracy_levels": kept["accuracy_levels"],
               "group_size": ckpt.group_size}
    metrics.update(smoke(out_dir, tokenizer, ckpt.config["vocab_size"]))
    metrics.update(seconds=round(time.perf_counter() - start, 1),
                   onnxruntime_genai=host.package_versions(["onnxruntime-genai"]).get("onnxruntime-genai"))
    write_card(out_dir, ckpt, metrics, lineage)
    metrics["size_bytes"] = files.dir_size(out_dir)
    files.write_manifest(out_dir, "export", {"format": "ortgenai", "precision": "int4", "provider": "cpu"},
                         {"model": str(ckpt.path)}, metrics)
    return metrics


def run_builder(src: Path, out_dir: Path) -> None:
    """ONNX Runtime GenAI's builder in its own process; its cache removed from the output after."""
    cache = out_dir / ".builder-cache"
    cmd = [sys.executable, "-m", BUILDER, "-i", str(src), "-o", str(out_dir), "-p", "int4", "-e", "cpu",
           "-c", str(cache)]
    env = files.child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ExportError(f"ONNX Runtime GenAI's builder did not finish within {TIMEOUT_S} s") from None
    shutil.rmtree(cache, ignore_errors=True)
    for line in proc.stderr.splitlines()[-40:]:
        logger.debug("builder: %s", line)
    if proc.returncode != 0:
        lines = [l.strip() for l in proc.stderr.splitlines() if l.strip()]
        why = lines[-1][:300] if lines else f"exit code {proc.returncode}"
        raise ExportError(f"ONNX Runtime GenAI's builder failed on {src}: {why}")


def smoke(out_dir: Path, tok, vocab: int, n: int = 4) -> dict:
    """ONNX Runtime GenAI loads the directory, tokenizes the chat prompt and generates ``n`` tokens."""
    text = tok.apply_chat_template(SMOKE_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    spec = json.dumps({"path": str(out_dir), "ids": ids, "text": text, "n": n, "threads": 2, "vocab": vocab})
    try:
        proc = subprocess.run([sys.executable, "-m", "tangquant.ortgenai.runtime", spec], capture_output=True,
                              text=True, timeout=3600, env=files.child_env())
    except subprocess.TimeoutExpired:
        raise ExportError("ONNX Runtime GenAI did not load the exported model within 3600 s") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    res = json.loads(lines[-1]) if lines else {
        "ok": False, "error": f"its process died (code {proc.returncode})"}
    if not res["ok"]:
        raise ExportError(f"ONNX Runtime GenAI cannot run the exported model: {first_line(Exception(res['error']))}")
    if res["tokenizer_matches"] is False:
        logger.warning("ONNX Runtime GenAI's tokenizer encodes the chat prompt differently from the "
                       "model's tokenizer; the bench feeds token ids, so its figures are unaffected")
    return {"ortgenai_check": f"loaded, generated {len(res['tokens'])} tokens", "ortgenai_tokens": res["tokens"],
            "ortgenai_tokenizer_matches": res["tokenizer_matches"]}


def write_card(out_dir: Path, ckpt: GPTQCheckpoint, metrics: dict, lineage: dict) -> None:
    name = files.final_name(ckpt.path)
    meta = card.front_matter(lineage, "quantized", "onnxruntime-genai",
                             tags=("onnx", "onnxruntime-genai", "int4", "gptq"))
    head = "; ".join(f"{m}: int4 round-to-nearest by the builder (block {r['block_size']}, relative RMS "
                     f"error {r['relative_rms_error']:.3g} against the checkpoint's {r['from']})"
                     for m, r in metrics["requantized"].items()) or "none"
    random = f"\n> {RANDOM_WEIGHTS}: this model's weights are random.\n" if ckpt.config.get(
        "tangquant_random_weights") else ""
    body = f"""# {name} — ONNX Runtime GenAI int4 (GPTQ integers, MatMulNBits)
{random}
Exported by `tangquant export --format ortgenai`: ONNX Runtime GenAI's own model builder
(`python -m {BUILDER} -i {name} -o OUT -p int4 -e cpu`, onnxruntime-genai
{metrics.get('onnxruntime_genai')}) on the GPTQ checkpoint `{name}`.

- Linear layers: all {metrics['int4_layers_exact']} MatMulNBits nodes hold the checkpoint's own 4-bit
  integers, zero points and scales (group size {metrics['group_size']}; q/k/v fused into one node),
  read back on export; `accuracy_level` {metrics['accuracy_levels']} (int8 activations on the CPU).
- Requantized by the builder: {head}.
- Embeddings: {metrics['embedding']}.
- Check on export: {metrics['ortgenai_check']}.

## Use

```python
import onnxruntime_genai as og
model = og.Model("{name}")
```
"""
    card.write(out_dir, meta, body)
