"""The demo poet through ONNX Runtime GenAI's builder, its KL statistics beside tangquant's IR and GGUF.

Builds into ``--workdir`` (unless there): the merged poet (fp32), its GPTQ checkpoint (the demo's
recipe and calibration), and tangquant's IR, GGUF and ONNX Runtime GenAI exports of it. Then the
KL block (``measure.kl``, as ``tangquant eval --data``) of each against base + LoRA (peft, fp32)
on the poet's held-out poems:

- ``gptq``: the checkpoint dequantised exactly (the common source of the three exports);
- ``ir``: tangquant's IR in exact mode; ``gguf``: tangquant's GGUF dequantised by gguf's code;
- ``ortgenai weights``: the ONNX Runtime GenAI directory's own weights in fp32 — the checkpoint's
  with every node the builder requantized (its int4 lm_head; with tied embeddings the lookup
  shares those blocks, and so does this model) put in, dequantised from the directory — so the
  row shows what the builder changed in the weights alone;
- ``ortgenai runtime``: the directory's ``model.onnx`` run by onnxruntime's CPU provider over
  whole sequences (its MatMulNBits at ``accuracy_level`` 4: int8 activations), what a user runs.

    PYTHONPATH=. python benchmarks/ortgenai_quality.py --workdir /tmp/ort-quality --out FILE.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from quality import environment  # noqa: E402


def build(work: Path) -> dict:
    from tangquant.export import export
    from tangquant.merge import merge
    from tangquant.poet import ASSETS, demo_paths
    from tangquant.quantize import quantize

    paths = demo_paths(ASSETS)
    if not (work / "merged").exists():
        merge(paths["base"], paths["adapter"], work / "merged", dtype="fp32")
    if not (work / "gptq").exists():
        quantize(work / "merged", work / "gptq", ASSETS / "int4-gptq-g128.yaml", calib=str(ASSETS / "calib.json"))
    for fmt in ("openvino", "gguf", "ortgenai"):
        if not (work / fmt).exists():
            export(work / "gptq", work / fmt, format=fmt)
    (gguf_file,) = (work / "gguf").glob("*.gguf")
    return {"paths": paths, "gptq": work / "gptq", "ir": work / "openvino", "gguf": gguf_file,
            "ortgenai": work / "ortgenai"}


def ort_weights_model(gptq: Path, ort_dir: Path):
    """The checkpoint's fp32 model with each builder-requantized node's weight as the directory holds it."""
    import torch

    from tangquant import load
    from tangquant.ortgenai import compare, model

    g = model.graph(ort_dir)
    inits = {t.name: t for t in g.initializer}
    m = load.torch_model(gptq)
    report = compare.compare(load.inspect(gptq).gptq, ort_dir)
    for node in (n for n in g.node if n.op_type == "MatMulNBits"):
        module, _ = compare.sources(node.name)
        if module in report["requantized"]:
            arrays = {i: model.array(ort_dir, inits[i]) for i in node.input[1:] if i in inits}
            w = compare.dequantized(compare.unpack(node, arrays))
            with torch.no_grad():  # a tied head shares its tensor with the embeddings, as the builder's blocks do
                m.get_submodule(module).weight.copy_(torch.from_numpy(w))
    return m, report


class OrtLogits:
    """``model(input_ids=…, attention_mask=…).logits`` of an ONNX Runtime GenAI decoder, whole sequences
    through onnxruntime's CPU provider with an empty KV cache."""

    def __init__(self, ort_dir: Path, threads: int):
        import onnxruntime as ort

        from tangquant.ortgenai import model

        cfg = model.config(ort_dir)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(ort_dir / cfg["decoder_file"]), so,
                                            providers=["CPUExecutionProvider"])
        self.kv = (cfg["num_key_value_heads"], cfg["head_size"])

    def __call__(self, input_ids, attention_mask):
        import numpy as np
        import torch

        types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                 "tensor(float16)": np.float16}
        feeds = {}
        for i in self.session.get_inputs():
            dtype = types[i.type]
            if i.name == "input_ids":
                feeds[i.name] = input_ids.numpy().astype(dtype)
            elif i.name == "attention_mask":
                feeds[i.name] = attention_mask.numpy().astype(dtype)
            else:  # past_key_values.N.key / .value: none yet
                feeds[i.name] = np.zeros((input_ids.shape[0], self.kv[0], 0, self.kv[1]), dtype)
        (logits,) = self.session.run(["logits"], feeds)
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits, dtype=np.float32)))


def kl(built: dict, samples: list, threads: int) -> tuple[dict, dict]:
    from tangquant import load
    from tangquant.measure.kl import compare, logprobs

    paths = built["paths"]
    ref = load.logits_model(paths["base"], adapter=paths["adapter"])
    ref_lp = logprobs(ref, samples, "reference")
    del ref
    out = {}
    for name in ("gptq", "ir", "gguf"):
        m = load.logits_model(built[name])
        out[name] = compare(logprobs(m, samples, name), ref_lp, samples)
        del m
        gc.collect()
    m, report = ort_weights_model(built["gptq"], built["ortgenai"])
    out["ortgenai weights"] = compare(logprobs(m, samples, "ortgenai weights"), ref_lp, samples)
    del m
    out["ortgenai runtime"] = compare(logprobs(OrtLogits(built["ortgenai"], threads), samples,
                                               "ortgenai runtime"), ref_lp, samples)
    return out, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)  # as benchmarks/quality.py and gguf_quality.py
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    from tangquant import load
    from tangquant.calib import eval_samples

    record = environment()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    built = build(work)
    paths = built["paths"]
    samples = eval_samples(paths["base"].parent / "heldout.json", load.tokenizer(paths["base"]),
                           args.num_samples, args.seq_len, 0)
    record["kl"], report = kl(built, samples, args.threads)
    record["ortgenai_kept"] = {k: report[k] for k in ("exact", "differs", "missing", "requantized", "embedding",
                                                     "accuracy_levels")}
    record["export_manifest_metrics"] = json.loads((built["ortgenai"] / "tangquant.json").read_text())["metrics"]
    record["loadavg_end"] = list(os.getloadavg())
    Path(args.out).write_text(json.dumps(record, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name, m in record["kl"].items():
        print(f"{name:18s} KLD {m['kld']:.5f} ± {m['kld_err']:.5f}  99% {m['kld_p99']:.4f}  same top "
              f"{100 * m['same_top']:.1f}%  PPL ratio {m['ppl_ratio']:.4f}")
    print(f"int4 nodes equal to the checkpoint's: {len(report['exact'])}; differ: {report['differs']}; "
          f"requantized by the builder: {json.dumps(report['requantized'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
