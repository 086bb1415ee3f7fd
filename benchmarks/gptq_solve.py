"""GPTQ's solve at a model's linear shapes: INC's ``fasterquant`` one linear at a time against
tangquant's (``tangquant/quant/fasterquant.py``: the same arithmetic, a true-sequential group's
linears stacked into one call), with one Hessian per group from random calibration inputs.

    python benchmarks/gptq_solve.py --shape 7b --threads 2 --out solve.json

Prints one line per group and writes JSON (host, versions, seconds, whether every integer and
scale is equal). Random weights, speed only.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from neural_compressor.torch.quantization import GPTQConfig

from tangquant.host import record as host_record
from tangquant.poet.shapes import qwen_config
from tangquant.quant.fasterquant import fasterquant
from tangquant.quant.gptq_block import _gptq, layer_config


def _groups(config: dict) -> dict[str, list[tuple[int, int]]]:
    """{group: [(out, in) per linear]} of one Qwen2 decoder layer, true-sequential order."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h * config["num_key_value_heads"] // config["num_attention_heads"]
    return {"q,k,v": [(h, h), (kv, h), (kv, h)], "o": [(h, h)], "gate,up": [(i, h), (i, h)], "down": [(h, i)]}


def _hessian(columns: int, tokens: int, cfg: dict):
    """An INC GPTQ object holding the Hessian of ``tokens`` random inputs of width ``columns``."""
    g = _gptq(torch.nn.Linear(columns, 1, bias=False), cfg)
    for _ in range(max(1, tokens // 512)):
        g.add_batch(torch.randn(1, 512, columns) * torch.rand(columns) * 3, None)
    return g


def _copy(hessian, cfg: dict):
    """A fresh GPTQ object with a copy of ``hessian``'s Hessian (fasterquant consumes its own)."""
    return _gptq(torch.nn.Linear(hessian.columns, 1, bias=False), cfg, like=hessian)


def run(shape: str, block_size: int, group_size: int, tokens: int) -> list[dict]:
    cfg = layer_config(GPTQConfig(bits=4, group_size=group_size, use_sym=True, block_size=block_size))
    kw = {"blocksize": block_size, "percdamp": cfg["percdamp"], "groupsize": group_size}
    rows = []
    for name, linears in _groups(qwen_config(shape)).items():
        torch.manual_seed(0)
        columns = linears[0][1]
        hessian = _hessian(columns, tokens, cfg)
        weights = [torch.randn(o, i) * 0.02 for o, i in linears]
        t0 = time.perf_counter()
        inc = [_copy(hessian, cfg).fasterquant(w.clone(), **kw) for w in weights]
        t_inc = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = fasterquant(_copy(hessian, cfg), torch.cat(weights), **kw)
        t_ours = time.perf_counter() - t0
        equal = (torch.equal(torch.cat([r[3] for r in inc]), ours[2])
                 and torch.equal(torch.cat([r[0] for r in inc]), ours[0]))
        rows.append({"group": name, "linears": linears, "inc_s": round(t_inc, 2),
                     "tangquant_s": round(t_ours, 2), "speedup": round(t_inc / t_ours, 2), "equal": equal})
        print(f"{name:8s} INC {t_inc:6.1f} s  tangquant {t_ours:6.1f} s  {t_inc / t_ours:4.2f}x  equal {equal}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7b", help="a Qwen1.5 shape of tangquant.poet.shapes (0.5b, 1.8b, 7b)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--block-size", type=int, default=128, help="the recipe's block_size")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=1024, help="random calibration tokens for the Hessian")
    ap.add_argument("--out", help="JSON results")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(a.shape, a.block_size, a.group_size, a.tokens)
    total = {k: round(sum(r[k] for r in rows), 2) for k in ("inc_s", "tangquant_s")}
    print(f"layer    INC {total['inc_s']:6.1f} s  tangquant {total['tangquant_s']:6.1f} s  "
          f"{total['inc_s'] / total['tangquant_s']:4.2f}x")
    if a.out:
        record = {"shape": a.shape, "threads": a.threads, "block_size": a.block_size, "group_size": a.group_size,
                  "tokens": a.tokens, "groups": rows, "layer": total, "host": host_record(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
