"""The demo's draft poet: a smaller model with the shipped poet's tokenizer, for speculative decoding.

The target of ``tangquant demo`` is the shipped poet with its LoRA merged (it answers in traditional
characters), so the draft learns that: the LoRA's data (simplified requests, the original traditional
poems as answers), each training poem asked once, in turn by each of the requests the poet's data
gives it (``prepare.requests_for``). It starts from the merged poet itself — its embeddings (tied, so
also its head), its first ``LAYERS`` decoder layers and its final norm — and is trained from there on
one CPU thread within a cap of CPU seconds (``Planner`` fits the cosine to it). Same tokenizer files,
same vocabulary size, same chat template: the draft check passes by construction.

What it learns is the target's own next-token distribution on those answers (:class:`Distill`: the
forward KL from the merged poet's distribution, the poet run alongside): a draft is worth what it
agrees with its target, and the first draft, trained on the data's tokens alone (``--data-only``),
agreed with the target's greedy token on 40% of held-out answer tokens where the target's base
(its equal in size) agrees on 72% (docs/benchmarks.md).

    python -m tangquant.poet.draft prepare --simplified S --traditional T --out TOKENS
    python -m tangquant.poet.draft train --data TOKENS --out RAW --seconds 1800 --threads 1
    python -m tangquant.poet.draft assemble --raw RAW --out tangquant/assets/demo/draft
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

from tangquant import files
from tangquant.poet import ASSETS
from tangquant.poet.prepare import aligned, encode_chat, requests_for, save_split

LAYERS = 2  # of the poet's 8: the draft's decoder depth
SPLITS = ("draft_train", "draft_eval")


def prepare(simplified, traditional, out, assets=ASSETS, force: bool = False) -> dict:
    """Token files of the LoRA's data, encoded with the shipped poet's own tokenizer."""
    from transformers import AutoTokenizer

    simplified, traditional = Path(simplified), Path(traditional)
    out = files.check_output(out, [simplified, traditional], force)
    tok = AutoTokenizer.from_pretrained(str(Path(assets) / "base"))
    train, evals = aligned(simplified, traditional, "train"), aligned(simplified, traditional, "eval")
    seqs = {"draft_train": [], "draft_eval": [encode_chat(tok, s["instruction"], t["output"]) for s, t in evals]}
    for i, (s, t) in enumerate(train):
        asks = requests_for(s)
        seqs["draft_train"].append(encode_chat(tok, asks[i % len(asks)], t["output"]))
    digest = hashlib.sha256()
    for d in (simplified, traditional):
        for split in ("train", "eval", "calib"):
            digest.update(files.sha256_file(d / f"tang_{split}.json").encode())
    meta = {"pad_id": tok.convert_tokens_to_ids("<|endoftext|>"), "splits": list(SPLITS),
            "data_sha256": digest.hexdigest(),
            "tokenizer_sha256": files.sha256_file(Path(assets) / "base" / "tokenizer.json"),
            "counts": {k: len(v) for k, v in seqs.items()},
            "tokens": {k: int(sum(len(x) for x, _ in v)) for k, v in seqs.items()}}
    with files.atomic_output_dir(out, force) as tmp:
        for name, rows in seqs.items():
            save_split(tmp / f"{name}.safetensors", rows)
        files.write_json(tmp / "meta.json", meta)
    return meta


def merged_poet(assets=ASSETS):
    """The demo's target in fp32: the shipped base with its LoRA merged (peft's own merge)."""
    from tangquant import load

    return load.torch_model(Path(assets) / "base", adapter=Path(assets) / "adapter").merge_and_unload()


def draft_from(poet, layers: int = LAYERS):
    """A Qwen2 of ``layers`` decoder layers holding the poet's embeddings, first layers and norm."""
    import copy

    from transformers import Qwen2ForCausalLM

    config = copy.deepcopy(poet.config)
    config.num_hidden_layers = layers
    config.layer_types = config.layer_types[:layers] if getattr(config, "layer_types", None) else None
    model = Qwen2ForCausalLM(config)
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in poet.state_dict().items() if k in own}, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"the draft does not fit the poet's weights: {missing} {unexpected}")
    model.tie_weights()
    return model


class Distill:
    """Forward KL(target ‖ draft) summed over the answer tokens, and their count (``batch_loss``'s
    shape): the draft's logits against the target's, computed at the answer positions only."""

    def __init__(self, target):
        self.target = target.eval()

    def __call__(self, model, ids, weight, amp_dtype):
        import torch

        mask = weight[:, 1:] > 0
        with torch.autocast(ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][mask]
            logp = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
            with torch.no_grad():
                teacher = self.target.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][mask]
                logq = torch.log_softmax(self.target.lm_head(teacher).float(), dim=-1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        return kl.sum(), mask.sum().float()


def train(data, out, seconds: float, threads: int = 1, steps: int = 100000, batch_size: int = 64,
          lr: float = 0.001, eval_every: int = 100, patience: int = 6, seed: int = 0,
          limit: int | None = None, bf16: bool = True, distill: bool = True, assets=ASSETS) -> dict:
    """Train the draft from the merged poet's layers; writes RAW/model.safetensors and metrics.json."""
    import torch
    from safetensors.torch import save_file

    from tangquant.poet.train import load_split, train_phase

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = files.read_json(data / "meta.json", "draft token meta")
    cpu = torch.device("cpu")
    split = {n: load_split(data / f"{n}.safetensors", meta["pad_id"], cpu, limit) for n in SPLITS}
    poet = merged_poet(assets)
    model = draft_from(poet).train()
    log_file = open(out / "train_log.txt", "w", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    n_params = sum(p.numel() for p in model.parameters())
    log(f"torch {torch.__version__}, {threads} thread(s); draft: {n_params / 1e6:.2f} M parameters; "
        + ", ".join(f"{k}: {v['n']}" for k, v in split.items()))
    # bf16 autocast (fp32 master weights): 1.4x the steps per CPU second on an AVX512-BF16 core.
    args = SimpleNamespace(device=cpu, amp=torch.bfloat16 if bf16 else None, batch_size=batch_size,
                           weight_decay=0.01, eval_every=eval_every, patience=patience, seed=seed,
                           loss=Distill(poet) if distill else None, eval_batch_size=64)
    key = "eval_kl_to_target" if distill else "eval_traditional_chat"
    t0 = time.time()
    # The cap is CPU seconds of this process (the machine is shared: wall time would depend on
    # the other users' load); the history's "seconds" are CPU seconds too.
    best, hist, spent = train_phase(model, list(model.parameters()), split["draft_train"],
                                    {key: split["draft_eval"]}, key, args, steps, seconds, lr, log,
                                    clock=time.process_time)
    save_file({k: v.contiguous() for k, v in best.items() if k != "lm_head.weight"},
              str(out / "model.safetensors"))
    metrics = {"torch": torch.__version__, "threads": threads, "bf16_autocast": bf16, "distill": distill,
               "parameters": n_params, "layers": LAYERS, "cpu_seconds": round(spent, 1),
               "wall_seconds": round(time.time() - t0, 1),
               "args": {"seconds": seconds, "steps": steps, "batch_size": batch_size, "lr": lr,
                        "eval_every": eval_every, "patience": patience, "seed": seed, "limit": limit},
               "data_sha256": meta["data_sha256"], "tokens": meta["tokens"], **hist}
    files.write_json(out / "metrics.json", metrics)
    log(f"done: {spent:.0f} CPU s, best held-out {key} {hist['best']}")
    return metrics


def assemble(raw, out, assets=ASSETS, force: bool = False) -> dict:
    """The trained draft as a model directory (fp16) with the shipped poet's tokenizer files."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from tangquant.poet.tiny import save_model

    raw = Path(raw)
    model = draft_from(merged_poet(assets))
    model.load_state_dict({k: v.float() for k, v in load_file(str(raw / "model.safetensors")).items()},
                          strict=False)
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(Path(assets) / "base"))
    out = files.check_output(out, [raw], force)
    with files.atomic_output_dir(out, force) as tmp:
        save_model(model.eval(), tok, tmp, dtype=torch.float16)
        files.copy_aux_files(Path(assets) / "base", tmp)  # the poet's own tokenizer files, byte for byte
    return {"draft": str(out), "size": files.dir_size(out),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--simplified", required=True)
    a.add_argument("--traditional", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--force", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--seconds", type=float, default=1800, help="CPU seconds (of this process)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--steps", type=int, default=100000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.001)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--limit", type=int, default=None, help="only N sequences of each split (smoke test)")
    t.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    t.add_argument("--data-only", action="store_true", help="learn the data's tokens, not the target's distribution")
    b = sub.add_parser("assemble")
    b.add_argument("--raw", required=True)
    b.add_argument("--out", default=str(ASSETS / "draft"))
    b.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        result = prepare(args.simplified, args.traditional, args.out, force=args.force)
    elif args.cmd == "train":
        result = train(args.data, args.out, args.seconds, args.threads, args.steps, args.batch_size,
                       args.lr, args.eval_every, limit=args.limit, bf16=not args.fp32,
                       distill=not args.data_only)
        result = {k: result[k] for k in ("parameters", "cpu_seconds", "wall_seconds", "best", "planned_steps")}
    else:
        result = assemble(args.raw, args.out, force=args.force)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
