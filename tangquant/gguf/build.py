"""The ``export --format gguf`` output directory, checked before it is published.

The GGUF is written (:mod:`tangquant.gguf.writer`), read back with gguf's reader
and compared tensor by tensor with the checkpoint — every Q4_0 tensor must
dequantise to exactly the checkpoint's dequantised weights (max |Δ| = 0), f32
and f16 tensors must equal the checkpoint's, and a quantized table (q8_0, q5_0 or
q4_0 embeddings or head) must be byte for byte gguf-py's round-to-nearest of the
checkpoint's fp16 weights —
then llama.cpp loads it in a separate process, must tokenize a chat prompt as
the Hugging Face tokenizer does, and generates tokens. The tokenizer files,
an ollama ``Modelfile``, the model card and the manifest go beside it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import gguf
import numpy as np
import torch

from tangquant import card, files, host
from tangquant.errors import ExportError, first_line
from tangquant.gguf import q4, reader, writer
from tangquant.gguf.names import gguf_name, name_map
from tangquant.gguf.modelcard import write_card, write_modelfile
from tangquant.gptq import GPTQCheckpoint

logger = logging.getLogger(__name__)

SMOKE_PROMPT = [{"role": "user", "content": "写一首唐诗"}]
SMOKE_TIMEOUT_S = 600


def file_name(ckpt: GPTQCheckpoint) -> str:
    """The conventional name (gguf.naming_convention) of the metadata the file will carry."""
    meta = writer.model_metadata(ckpt.config, files.final_name(ckpt.path), ckpt.path)
    return writer.file_name(meta, "Q4_0")


def check_exportable(ckpt: GPTQCheckpoint) -> None:
    """Everything knowable from config.json, before anything is written; each layer's
    groups and zero points are checked again as it is packed."""
    if ckpt.bits != 4:
        raise q4.NotQ4_0Error(f"{ckpt.path}: Q4_0 holds 4-bit GPTQ, not {ckpt.bits}-bit; quantize with --bits 4")
    if ckpt.desc_act:
        raise q4.NotQ4_0Error(f"{ckpt.path}: act-order (desc_act) GPTQ permutes the groups, which Q4_0 "
                              "blocks cannot hold; quantize again without --act-order")
    if not ckpt.sym:
        raise q4.NotQ4_0Error(f"{ckpt.path}: asymmetric GPTQ (zero points other than 8) has no Q4_0 form; "
                              "quantize again with --sym")
    if ckpt.group_size != -1 and ckpt.group_size % q4.BLOCK:
        raise q4.NotQ4_0Error(f"{ckpt.path}: group size {ckpt.group_size} is not a multiple of Q4_0's "
                              f"{q4.BLOCK}; quantize with --group-size 32, 64, 128 or -1")
    writer.check_config(ckpt.config, ckpt.path)


def write_gguf_dir(ckpt: GPTQCheckpoint, out_dir: Path, tokenizer, embeddings: str = "q8_0",
                   base_model_id: str | None = None, llama_check: bool = True,
                   head: str = "q5_0") -> dict:
    """The GGUF, tokenizer files, Modelfile, card and manifest in the empty ``out_dir``; metrics.
    ``tokenizer``: the checkpoint's Hugging Face tokenizer, opened once by the caller.

    The card's lineage is looked up last, so a layer refused while packing fails with its one line.
    """
    check_exportable(ckpt)
    start = time.perf_counter()
    path = Path(out_dir) / file_name(ckpt)
    metrics = writer.write(path, ckpt.config, tokenizer, ckpt.path, writer.checkpoint_tensors(ckpt),
                           embeddings, name=files.final_name(ckpt.path), head=head)
    metrics.update(verify(path, ckpt))
    metrics.update(smoke(path, tokenizer) if llama_check
                   else {"llama_cpp_check": "skipped (--no-llama-check)"})
    tied = bool(ckpt.config.get("tie_word_embeddings"))
    metrics.update(file=path.name, group_size=ckpt.group_size, head=head,
                   embeddings=f"tied: the head's {head}" if tied else embeddings,
                   gguf_version=host.package_versions(["gguf"]).get("gguf"), seconds=round(time.perf_counter() - start, 1))
    files.copy_aux_files(ckpt.path, Path(out_dir))
    write_modelfile(Path(out_dir), path.name)
    write_card(Path(out_dir), ckpt.path, metrics, card.lineage(ckpt.path, base_model_id))
    metrics["size_bytes"] = files.dir_size(out_dir)
    files.write_manifest(Path(out_dir), "export", {"format": "gguf", "gguf_embeddings": embeddings,
                                                   "gguf_head": head},
                         {"model": str(ckpt.path)}, metrics)
    return metrics


def verify(path: Path, ckpt: GPTQCheckpoint) -> dict:
    """Read the file back; every tensor against the checkpoint (see the module doc)."""
    r = reader.open_reader(path)
    by_name = {t.name: t for t in r.tensors}
    tmap = name_map(ckpt.config["num_hidden_layers"])
    exact = 0
    for module, layer, bias in ckpt.layers():
        got = _tensor(by_name, tmap, f"{module}.weight", path)
        if got.tensor_type != gguf.GGMLQuantizationType.Q4_0:
            raise ExportError(f"{path}: {got.name} is {got.tensor_type.name}, not Q4_0")
        _equal(got, layer.dequantize().numpy(), path)
        exact += 1
        if bias is not None:
            _equal(_tensor(by_name, tmap, f"{module}.bias", path), bias.float().numpy(), path)
    tied = bool(ckpt.config.get("tie_word_embeddings"))
    for name, tensor in ckpt.tensors():
        if name == "lm_head.weight" and tied:
            continue
        got = _tensor(by_name, tmap, name, path)
        want = tensor.float()
        if got.tensor_type in RTN_TABLES:
            _rtn_equal(got, want.numpy(), path)
        else:
            dtype = torch.float16 if got.tensor_type == gguf.GGMLQuantizationType.F16 else torch.float32
            _equal(got, want.to(dtype).float().numpy(), path)
    if len(by_name) != len(set(by_name)):
        raise ExportError(f"{path}: duplicated tensor names")
    return {"q4_0_tensors_exact": exact, "q4_0_max_abs_delta": 0.0}


RTN_TABLES = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0, gguf.GGMLQuantizationType.Q4_0)


def _rtn_equal(got, want: np.ndarray, path: Path) -> None:
    """A quantized table must hold exactly gguf-py's round-to-nearest of the fp16 weights."""
    rtn = gguf.quants.quantize(want.astype(np.float16).astype(np.float32), got.tensor_type)
    have = np.asarray(got.data)
    if have.shape != rtn.shape or not np.array_equal(have, rtn):
        raise ExportError(f"{path}: {got.name} ({got.tensor_type.name}) is not the round-to-nearest "
                          "quantization of the checkpoint's fp16 weights; the file is corrupt")


def _tensor(by_name: dict, tmap, hf_name: str, path: Path):
    name = gguf_name(tmap, hf_name)
    if name not in by_name:
        raise ExportError(f"{path}: {name} ({hf_name}) is missing")
    return by_name[name]


def _equal(got, want: np.ndarray, path: Path) -> None:
    have = reader.dequantized(got)
    if have.shape != want.shape or not np.array_equal(have, want):
        delta = float(np.abs(have - want).max()) if have.shape == want.shape else float("nan")
        raise ExportError(f"{path}: {got.name} does not read back as the checkpoint's weights "
                          f"(shape {have.shape} vs {want.shape}, max |Δ| {delta:.3g})")


def smoke(path: Path, tok, n: int = 4) -> dict:
    """llama.cpp loads the file, tokenizes the chat prompt as Hugging Face does, generates ``n``."""
    if find_spec("llama_cpp") is None:
        logger.warning("llama-cpp-python is not installed: the GGUF was checked tensor by tensor but not "
                       "loaded in llama.cpp (pip install 'tangquant[llamacpp]')")
        return {"llama_cpp_check": "skipped: llama-cpp-python not installed"}
    text = tok.apply_chat_template(SMOKE_PROMPT, tokenize=False, add_generation_prompt=True)
    hf_ids = tok(text)["input_ids"]
    res, note = _run_smoke(path, text, n, repack=True), ""
    if not res["ok"] and res.get("crashed"):
        # llama.cpp 0c1e570's CPU weight repacking (its default) segfaults on some CPUs (seen with an AMX
        # build on an AMX Xeon): the file is not at fault if the plain path runs it, so say how to run it.
        first = res["error"]
        res = _run_smoke(path, text, n, repack=False)
        note = (f" with weight repacking off: llama.cpp {first} with its default repacking on this CPU "
                "(run llama-server / llama-cli with --no-repack here)")
        if res["ok"]:
            logger.warning("llama.cpp %s loading %s with its default weight repacking; it runs with "
                           "repacking off (--no-repack)", first, path.name)
    if not res["ok"]:
        # Every tensor read back exact before this: a crash on both paths is this machine's llama.cpp
        # (seen on a 16-core Xeon whose build crashed on every file, one that runs elsewhere too).
        hint = (" with repacking on and off, though every tensor read back exact"
                f"{_libstdcxx_hint()}; if this machine's llama-cpp-python crashes on any GGUF, "
                "--no-llama-check publishes the file without this check") if res.get("crashed") else ""
        raise ExportError(f"llama.cpp cannot run {path.name}: {first_line(Exception(res['error']))}{hint}")
    if res["ids"] != hf_ids:
        raise ExportError(f"llama.cpp tokenizes the chat prompt as {res['ids'][:12]}…, the model's tokenizer "
                          f"as {hf_ids[:12]}…; the GGUF's tokenizer metadata is wrong")
    return {"llama_cpp_check": f"loaded{note}, chat prompt tokenized as by the model's tokenizer "
                               f"({len(hf_ids)} ids), generated {len(res['tokens'])} tokens",
            "llama_cpp_repack_crashed": bool(note),
            "llama_cpp_tokens": res["tokens"], "llama_cpp_version": host.package_versions(["llama-cpp-python"]).get("llama-cpp-python")}


def _run_smoke(path: Path, text: str, n: int, repack: bool) -> dict:
    """One smoke run of llama.cpp in its own process (a segfault must not take the export down)."""
    spec = json.dumps({"path": str(path), "text": text, "n": n, "threads": min(4, os.cpu_count() or 1),
                       "repack": repack})
    try:
        proc = subprocess.run([sys.executable, "-m", "tangquant.gguf.runtime", spec], capture_output=True,
                              text=True, timeout=SMOKE_TIMEOUT_S, env=files.child_env())
    except subprocess.TimeoutExpired:
        raise ExportError(f"llama.cpp did not load {path.name} within {SMOKE_TIMEOUT_S} s") from None
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    return {"ok": False, "error": _died(proc), "crashed": proc.returncode < 0}


def installed_libggml() -> Path | None:
    """llama-cpp-python's ``lib/libggml.so``, found without importing (and so loading) llama.cpp."""
    spec = find_spec("llama_cpp")
    for location in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(location) / "lib" / "libggml.so"
        if lib.exists():
            return lib
    return None


def _libstdcxx_hint() -> str:
    """Name the one cause of "crashes on any GGUF" seen so far, if this installation shows it.

    A toolchain that links libstdc++ statically (the lent Xeon's /opt/gcc, 2026-12-02) builds a
    libggml.so that runs inside llama.cpp's own tools but segfaults in a Python process on every
    model load; the same source built with the distribution's g++ runs.
    """
    lib = installed_libggml()
    if lib is None:
        return ""
    try:
        needed = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if "libstdc++" in needed:
        return ""
    return ("; its libggml.so links no libstdc++ (the compiler that built it linked it statically): "
            "rebuild it with the system compiler, CC=gcc CXX=g++ pip install --force-reinstall "
            "--no-cache-dir llama-cpp-python")


def _died(proc) -> str:
    if proc.returncode < 0:
        return f"crashed (signal {-proc.returncode})"
    tail = [l for l in proc.stderr.splitlines() if l.strip()]
    return f"exited with code {proc.returncode}" + (f": {tail[-1][:300]}" if tail else "")
