"""Fidelity of a model against its reference on held-out text.

Reports the perplexity of both models, the mean KL divergence
KL(reference || model) of the next-token distributions and the top-1
agreement, on text in the calibration formats (see ``tangquant.calib``).
Models: a full-precision Hugging Face directory, a GPTQ checkpoint (loaded with
the exact fp32 dequantising reference loader) or an OpenVINO IR directory
(compiled with fp32 inference precision and no dynamic quantization).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tangquant.ov import ir as ov_ir
from tangquant.errors import InputError

logger = logging.getLogger(__name__)

HELP = "fidelity of a (quantized) model against its reference: perplexity, KL divergence, top-1"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model to evaluate (HF dir, GPTQ dir or OpenVINO IR dir)")
    parser.add_argument("--reference", required=True, help="the full-precision model it came from")
    parser.add_argument("--data", required=True, help="held-out text in a calibration format")
    parser.add_argument("--num-samples", type=int, default=8, help="samples to evaluate (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")


def run(args) -> int:
    metrics = evaluate(args.model, args.reference, args.data, num_samples=args.num_samples,
                       seq_len=args.seq_len, seed=args.seed)
    for line in format_report(metrics):
        print(line)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def format_report(m: dict) -> list[str]:
    return [f"perplexity: model {m['ppl_model']:.4f}, reference {m['ppl_reference']:.4f}",
            f"KL(reference || model): {m['kld']:.6f} nats/token (max {m['kld_max']:.4f})",
            f"top-1 agreement: {100 * m['top1_agreement']:.2f}% over {m['tokens']} tokens "
            f"in {m['samples']} samples"]


def check_model_dir(path: str | Path) -> Path:
    """The directory of an OpenVINO IR or a Hugging Face model (refusing adapters), or an error."""
    from tangquant.checkpoint import load_config
    from tangquant.files import existing_dir

    path = existing_dir(path, "model directory")
    if not ov_ir.is_ir_dir(path):
        load_config(path)
    return path


def load_causal_lm(path: str | Path):
    """A model whose ``model(input_ids=...).logits`` works: HF fp32, GPTQ (exact fp32) or OpenVINO."""
    import torch

    from tangquant.checkpoint import load_config, weight_files
    from tangquant.files import existing_dir

    path = existing_dir(path, "model directory")
    if ov_ir.is_ir_dir(path):
        from optimum.intel import OVModelForCausalLM

        ov_ir.check_ir_files(path)  # a truncated .bin gets a clear error, not OpenVINO's
        return OVModelForCausalLM.from_pretrained(str(path), ov_config=ov_ir.EXACT_CONFIG, compile=True,
                                                  trust_remote_code=False)
    config = load_config(path)
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
        from tangquant.gptq import load_dequantized

        return load_dequantized(path)
    if qc:
        raise InputError(f"{path} is quantized with {qc.get('quant_method', 'an unknown method')}; "
                         "eval reads full-precision, GPTQ and OpenVINO IR models")
    weight_files(path)  # refuses pickle-only directories with a clear message
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                trust_remote_code=False).eval()


def _logprobs(model, samples, desc: str):
    """Per-sample next-token log-probabilities [len-1, vocab] (fp32)."""
    import torch
    from tqdm import tqdm

    out = []
    with torch.no_grad():
        for s in tqdm(samples, desc=desc, unit="sample", leave=False):
            ids = s.unsqueeze(0)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            logits = torch.as_tensor(logits)[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def tokenize_samples(data, tokenizer, num_samples: int, seq_len: int, seed: int):
    from tangquant.calib import load_documents, pack

    docs = load_documents(data) if isinstance(data, (str, Path)) else list(data)
    return pack(docs, tokenizer, seq_len, num_samples, seed, allow_partial=True,
                what="evaluation data").samples


def compare(model_lp: list, ref_lp: list, samples: list) -> dict:
    nll_m = nll_r = kld_sum = kld_max = 0.0
    agree = n = 0
    for lm, lr, s in zip(model_lp, ref_lp, samples):
        if lm.shape != lr.shape:
            raise InputError(f"the models' vocabularies differ ({lm.shape[-1]} vs {lr.shape[-1]})")
        target = s[1:].unsqueeze(1)
        nll_m -= float(lm.gather(1, target).sum())
        nll_r -= float(lr.gather(1, target).sum())
        kl = (lr.exp() * (lr - lm)).sum(dim=-1).clamp_min(0)
        kld_sum += float(kl.sum())
        kld_max = max(kld_max, float(kl.max()))
        agree += int((lm.argmax(-1) == lr.argmax(-1)).sum())
        n += lm.shape[0]
    return {"samples": len(samples), "tokens": n, "ppl_model": math.exp(nll_m / n),
            "ppl_reference": math.exp(nll_r / n), "kld": kld_sum / n, "kld_max": kld_max,
            "top1_agreement": agree / n}


def evaluate(model, reference, data, num_samples: int = 8, seq_len: int = 512, seed: int = 0,
             tokenizer=None) -> dict:
    """Compare ``model`` with ``reference`` (each a path or a loaded model) on ``data``.

    ``data`` is a file in a calibration format or a list of ``calib.Document``.
    Given paths, the reference is run and released before the model is loaded,
    so only one model is in memory at a time.
    """
    import gc

    from tangquant.calib import load_tokenizer

    for m in (model, reference):
        if isinstance(m, (str, Path)):
            check_model_dir(m)  # refuse a wrong path before any heavy work
    if tokenizer is None:
        src = reference if isinstance(reference, (str, Path)) else model
        if not isinstance(src, (str, Path)):
            raise InputError("evaluate needs a tokenizer when neither model is given as a path")
        tokenizer = load_tokenizer(Path(src))
    samples = tokenize_samples(data, tokenizer, num_samples, seq_len, seed)
    ref = load_causal_lm(reference) if isinstance(reference, (str, Path)) else reference
    ref_lp = _logprobs(ref, samples, "eval reference")
    del ref
    gc.collect()
    mod = load_causal_lm(model) if isinstance(model, (str, Path)) else model
    model_lp = _logprobs(mod, samples, "eval model")
    return compare(model_lp, ref_lp, samples)


def _heads(source, skeleton) -> list:
    """[(final norm, LM head)] as stored in the source, then rounded to fp16 as the checkpoint holds them."""
    import torch

    def norm(weight):
        n = type(skeleton.model.norm)(skeleton.config.hidden_size, eps=skeleton.config.rms_norm_eps)
        n.weight.data = weight.float()
        return n

    w_norm = source.get("model.norm.weight")
    head = source.get("lm_head.weight" if "lm_head.weight" in source.where else "model.embed_tokens.weight")
    return [(norm(w_norm), head), (norm(w_norm.to(torch.float16)), head.to(torch.float16))]


def _logits(hidden, weight, rows: int = 16384):
    """``hidden @ weight.T`` in fp32, upcasting ``rows`` vocabulary rows at a time: a 7B
    head in fp32 is 2.5 GB, in its stored 16 bits half that."""
    import torch

    return torch.cat([hidden @ weight[v:v + rows].float().t() for v in range(0, weight.shape[0], rows)],
                     dim=-1)


def streamed_fidelity(source, skeleton, ref: list, quant: list, held: list, chunk: int = 128) -> dict:
    """:func:`compare`'s metrics from final hidden states, ``chunk`` positions at a time.

    For tangquant's layer-by-layer quantization, which runs the held-out samples
    through the source layers (``ref``) and the quantized ones (``quant``) as it
    goes: only the final norm and LM head (read from ``source``, a
    :class:`tangquant.checkpoint.TensorReader`) are applied here, and a 7B
    vocabulary's logits are never held for a whole sample.
    """
    import math

    import torch

    parts = []
    with torch.no_grad():
        heads = _heads(source, skeleton)
        for r, q, ids in zip(ref, quant, held):
            for a in range(0, len(ids) - 1, chunk):
                b = min(a + chunk, len(ids) - 1)
                lps = [torch.log_softmax(_logits(norm(h[:, a:b])[0], w), dim=-1)
                       for (norm, w), h in zip(heads, (r, q))]
                parts.append(compare([lps[1]], [lps[0]], [ids[a:b + 1]]))
    n = sum(p["tokens"] for p in parts)

    def weighted(key):
        return sum(p[key] * p["tokens"] for p in parts) / n

    return {"samples": len(held), "tokens": n,
            "ppl_model": math.exp(sum(math.log(p["ppl_model"]) * p["tokens"] for p in parts) / n),
            "ppl_reference": math.exp(sum(math.log(p["ppl_reference"]) * p["tokens"] for p in parts) / n),
            "kld": weighted("kld"), "kld_max": max(p["kld_max"] for p in parts),
            "top1_agreement": weighted("top1_agreement")}
