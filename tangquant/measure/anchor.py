"""What a llama.cpp user makes of the same merged model: f16 GGUF, then llama-quantize Q4_0 / Q4_K_M.

The anchor of every speed and quality claim against llama.cpp. From a
full-precision (merged) Qwen2 Hugging Face directory this writes

  OUT/<name>-F16.gguf     every matrix f16, norms and biases f32 (tangquant.gguf.writer: the
                          metadata and tokenizer `tangquant export --format gguf` writes, so the
                          three files differ only in their weights)
  OUT/<name>-Q4_0.gguf    llama_model_quantize(F16, Q4_0), llama-quantize's defaults
  OUT/<name>-Q4_K_M.gguf  llama_model_quantize(F16, Q4_K_M), llama-quantize's defaults

through llama-cpp-python's binding of llama.cpp's own quantizer (round-to-nearest, no imatrix),
and prints one JSON line: the files, their sizes and tensor types. llama.cpp's
``convert_hf_to_gguf.py`` is not used: it refuses tokenizers it does not know by hash (the
random-shape models' and the demo poet's small trained ones).

Usage:
  python -m tangquant.measure.anchor --model W/merged --output W/anchor [--types q4_0,q4_k_m] [--table-type q8_0]
  python -m tangquant.measure.anchor --from-gguf W/gguf/x-Q4_0.gguf --output W/anchor   (speed rows only)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from pathlib import Path

import gguf
import llama_cpp

from tangquant import checkpoint, files, load
from tangquant.gguf import reader, writer

FTYPES = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
SUFFIX = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}


def hf_tensors(model_dir: Path):
    for path in checkpoint.weight_files(model_dir):
        yield from checkpoint.iter_tensors(path)


def write_f16(model_dir: Path, out: Path) -> Path:
    config = checkpoint.load_config(model_dir)
    path = out / f"{files.final_name(model_dir)}-F16.gguf"
    # Stamped as the anchor's: llama-quantize copies the stamp into Q4_0/Q4_K_M but not the stamped
    # tensor's bytes, so those files read as llama-quantize's (tangquant.gguf.reader.origin).
    writer.write(path, config, load.tokenizer(model_dir), model_dir, hf_tensors(model_dir), embeddings="f16",
                 file_type=gguf.LlamaFileType.MOSTLY_F16, name=files.final_name(model_dir),
                 origin="tangquant.measure.anchor F16 (llama-quantize's input)")
    return path


TABLE_TYPES = {"q8_0": 8, "f16": 1}  # GGML_TYPE_Q8_0, GGML_TYPE_F16 (ggml.h)


def quantize(src: Path, dst: Path, kind: str, threads: int, table: str | None = None,
             requantize: bool = False) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.allow_requantize = FTYPES[kind], threads, requantize
    if table:  # llama-quantize --token-embedding-type/--output-tensor-type: equal bytes with tangquant's file
        params.token_embedding_type = params.output_tensor_type = TABLE_TYPES[table]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed ({rc})")


def types(path: Path) -> dict:
    counts: dict[str, int] = {}
    for t in reader.open_reader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="full-precision (merged) Qwen2 HF directory")
    src.add_argument("--from-gguf", metavar="FILE", help="requantize this GGUF instead (llama-quantize "
                     "--allow-requantize): the tensor types and bytes an f16 source gives, not its values; "
                     "for random-weight speed rows where a 15 GB f16 file does not fit the disk")
    ap.add_argument("--output", required=True, help="directory for the GGUF files (created)")
    ap.add_argument("--types", default="q4_0,q4_k_m", help="comma list of q4_0, q4_k_m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--table-type", choices=sorted(TABLE_TYPES), help="token embedding and output tensor type "
                    "(default: llama-quantize's choice, Q6_K for Q4_0); q8_0 gives tangquant's export's bytes")
    args = ap.parse_args(argv)
    model, out = Path(args.model or args.from_gguf).resolve(), Path(args.output)
    out.mkdir(parents=True, exist_ok=False)
    t0 = time.time()
    source = model if args.from_gguf else write_f16(model, out)
    stem = re.sub(r"-(F16|Q4_0|Q8_0)$", "", source.name.removesuffix(".gguf"))
    made = {} if args.from_gguf else {"f16": source}
    for kind in [k.strip() for k in args.types.split(",") if k.strip()]:
        suffix = SUFFIX[kind] + (f"-table-{args.table_type}" if args.table_type else "")
        made[kind] = out / f"{stem}-{suffix}.gguf"
        quantize(source, made[kind], kind, args.threads, args.table_type, requantize=bool(args.from_gguf))
    print(json.dumps({"model": str(model), "seconds": round(time.time() - t0, 1),
                      "llama_cpp_python": llama_cpp.__version__,
                      "files": {k: {"path": str(p), "bytes": p.stat().st_size, "tensor_types": types(p)}
                                for k, p in made.items()}}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
