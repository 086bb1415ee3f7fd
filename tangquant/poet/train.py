"""Train the tiny Tang poet: a Qwen2 base, then a q/v LoRA on it (runs on a GPU or the CPU).

Standalone on purpose: it needs only torch, transformers (4.57 or 5.x),
safetensors and numpy, reads the token files that ``tangquant.poet.prepare``
wrote, and writes raw weights that ``tangquant.poet.assemble`` turns into the
shipped model directories. Run as::

    python -m tangquant.poet.train --data DIR --out DIR [--base-steps N] [--lora-steps N]

Both phases stop early on held-out loss and keep the best weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

PREVIEW = ("写一首唐诗", "请写一首五言绝句", "来一首七言律诗吧", "来一首《秋夜》吧", "写一首关于明月的诗",
           "作一首七言律诗，题为《秋兴》", "用繁体字写一首五言绝句")


def load_split(path: Path, pad_id: int, device, limit: int | None = None) -> dict:
    """A split, right-padded, on ``device``: ids [N, L], lengths and prompt lengths (lengths on the CPU too).

    Held on the device so that a batch is one gather there, not a Python loop per row.
    """
    import numpy as np
    import torch
    from safetensors.numpy import load_file

    d = load_file(str(path))
    offsets, plen = d["offsets"], d["prompt_len"].astype("int64")
    n = len(plen) if limit is None else min(limit, len(plen))
    lens = np.diff(offsets)[:n].astype("int64")
    ids = np.full((n, int(lens.max())), pad_id, dtype="int64")
    for i in range(n):
        ids[i, :lens[i]] = d["ids"][offsets[i]:offsets[i + 1]]
    return {"ids": torch.from_numpy(ids).to(device), "lens": torch.from_numpy(lens).to(device),
            "plen": torch.from_numpy(plen[:n]).to(device), "lens_cpu": lens, "n": n}


def batches(split: dict, batch_size: int, gen, shuffle: bool = True):
    """Batches of similar length (less padding), in a seeded random order."""
    import torch

    n, lens = split["n"], split["lens_cpu"]
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    chunk = batch_size * 32
    out = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lens[i])
        out += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        out = [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
    return out


def collate(split: dict, idx):
    """(ids, weight) of one batch; weight is 1 on the answer tokens (as LLaMA-Factory trains)."""
    import torch

    rows = torch.tensor(idx).to(split["ids"].device, non_blocking=True)
    width = int(split["lens_cpu"][idx].max())
    pos = torch.arange(width, device=rows.device)[None, :]
    # The first token predicts nothing, so the answer starts at max(prompt length, 1).
    weight = (pos >= split["plen"][rows, None].clamp(min=1)) & (pos < split["lens"][rows, None])
    return split["ids"][rows, :width], weight.float()


def batch_loss(model, ids, weight, amp_dtype):
    """Summed answer-token NLL and the token count.

    No attention mask: padding is on the right, so under the causal mask no real token sees one,
    and attention takes its fused causal path.
    """
    import torch

    with torch.autocast(ids.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(input_ids=ids, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                reduction="none")
    w = weight[:, 1:].flatten()
    return (nll.float() * w).sum(), w.sum()


def evaluate(model, sets: dict, amp_dtype, batch_size=256, loss=batch_loss) -> dict:
    import torch

    model.eval()
    out = {}
    with torch.no_grad():
        for name, split in sets.items():
            total = count = 0.0
            for idx in batches(split, batch_size, None, shuffle=False):
                s, n = loss(model, *collate(split, idx), amp_dtype)
                total, count = total + s.item(), count + n.item()
            out[name] = total / max(count, 1.0)
    model.train()
    return out


class LoRALinear:
    """Wraps an ``nn.Linear`` with peft's LoRA: y = W x + (B A x) * alpha / r (dropout 0)."""

    @staticmethod
    def attach(linear, r: int, alpha: int, gen):
        import torch

        a = torch.empty(r, linear.in_features)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # peft's default A init (on CPU: seeded)
        a = torch.nn.Parameter(a.to(linear.weight.device))
        b = torch.nn.Parameter(torch.zeros(linear.out_features, r, device=linear.weight.device))
        linear.lora_A, linear.lora_B, scale = a, b, alpha / r
        base_forward = linear.forward
        linear.lora_scale_on = 1.0  # 0 turns the adapter off (for the preview of the base)
        linear.forward = lambda x: base_forward(x) + (x @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * (
            scale * linear.lora_scale_on)
        return a, b


def _sync(device, clock=time.time) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock()


class Planner:
    """How many steps of a phase fit in its seconds, re-measured at each evaluation.

    So the cosine schedule ends inside the time cap instead of being cut off at a high learning
    rate. The first window (start-up, allocator growth) is not measured, and the plan is frozen
    once 80% of it has run; the final plan is logged and returned, so ``--*-steps`` reproduces it.
    """

    def __init__(self, steps: int, seconds: float, device, clock=time.time):
        self.asked = self.steps = steps
        self.clock = clock  # time.process_time caps CPU seconds on a shared machine
        self.seconds, self.device, self.t0 = seconds, device, clock()
        self.mark, self.eval_seconds, self.evals = (0, self.t0), 0.0, 0

    def after_eval(self, step: int, eval_seconds: float, eval_every: int, log) -> None:
        now = _sync(self.device, self.clock)
        (start, then), self.mark = self.mark, (step, now)
        self.eval_seconds, self.evals = self.eval_seconds + eval_seconds, self.evals + 1
        if start == 0 or step > 0.8 * self.steps:
            return
        per_step = (now - then - eval_seconds) / (step - start) + self.eval_seconds / self.evals / eval_every
        fit = step + int((self.seconds - (now - self.t0)) / per_step * 0.95)
        if min(self.asked, fit) != self.steps:
            self.steps = min(self.asked, fit)
            log(f"{1 / per_step:.1f} steps/s with evaluations: {self.steps} steps planned")


def train_phase(model, params, train, evals, key, args, steps, seconds, lr, log, clock=time.time):
    """AdamW, warm-up then cosine over the planned steps; evaluate every ``eval_every`` steps; keep the best."""
    import torch

    fused = {"fused": True} if args.device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay, **fused)
    plan = Planner(steps, seconds, args.device, clock)
    warm = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, plan.steps) / plan.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    best, best_state, bad, step = float("inf"), None, 0, 0
    history = []
    # args.loss (the draft poet's distillation) replaces the answer-token NLL, in training and evaluation
    loss, eval_batch = getattr(args, "loss", None) or batch_loss, getattr(args, "eval_batch_size", 256)
    while step < plan.steps:
        for idx in batches(train, args.batch_size, gen):
            s, n = loss(model, *collate(train, idx), args.amp)
            (s / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            step += 1
            done = step >= plan.steps or clock() - plan.t0 > seconds
            if step % args.eval_every == 0 or done:
                t_eval = clock()
                ev = evaluate(model, evals, args.amp, eval_batch, loss)
                score = ev[key] if isinstance(key, str) else sum(ev[k] for k in key)
                history.append({"step": step, "seconds": round(clock() - plan.t0, 1),
                                "train_loss": round((s / n).item(), 4), **{k: round(v, 4) for k, v in ev.items()}})
                log(json.dumps(history[-1]))
                if score < best - 1e-4:
                    best, bad = score, 0
                    best_state = {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
                    history[-1]["best"] = True
                else:
                    bad += 1
                if bad >= args.patience:
                    log(f"early stop at step {step}: held-out loss rose {bad} times")
                    done = True
                plan.after_eval(step, clock() - t_eval, args.eval_every, log)
            if done:
                step = plan.steps
                break
    return best_state, {"history": history, "planned_steps": plan.steps, "best": round(best, 4)}, clock() - plan.t0


def sample(model, data: Path, device, log) -> None:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    model.eval()
    for prompt in PREVIEW:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text)["input_ids"]], device=device)
        for name, scale in (("base", 0.0), ("lora", 1.0)):
            for mod in model.modules():
                if hasattr(mod, "lora_B"):
                    mod.lora_scale_on = scale
            seq = ids
            with torch.no_grad():
                for _ in range(100):
                    nxt = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
                    if nxt.item() == stop:
                        break
                    seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
            log(f"{name} | {prompt} | {tok.decode(seq[0, ids.shape[1]:])!r}")


def main(argv=None) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base-steps", type=int, default=4000)
    p.add_argument("--base-seconds", type=float, default=200)
    p.add_argument("--lora-steps", type=int, default=1500)
    p.add_argument("--lora-seconds", type=float, default=70)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--lora-lr", type=float, default=0.002)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="use only N sequences of each split (smoke test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", help="flat YAML whose keys set these options (recipes/tiny-poet.yaml)")
    args = p.parse_args(argv)
    if args.recipe:
        import yaml

        settings = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(settings) - set(vars(args)))
        if unknown:
            raise SystemExit(f"{args.recipe}: unknown key(s) {', '.join(unknown)}")
        p.set_defaults(**settings)  # the recipe sets defaults; explicit flags still win
        args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train_log.txt", "w", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.amp = torch.bfloat16 if args.device.type == "cuda" else None
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    split = {name: load_split(data / f"{name}.safetensors", meta["pad_id"], args.device, args.limit)
             for name in meta["splits"]}
    log(f"torch {torch.__version__} on {args.device}; " + ", ".join(f"{k}: {v['n']}" for k, v in split.items()))

    config = Qwen2Config(**meta["config"])
    model = Qwen2ForCausalLM(config).to(args.device).train()
    log(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    base_evals = {"eval_simplified_chat": split["base_eval_s"], "eval_traditional_text": split["base_eval_t"],
                  "eval_traditional_chat": split["lora_eval"]}
    best, base_hist, base_s = train_phase(
        model, list(model.parameters()), split["base_train"], base_evals,
        ("eval_simplified_chat", "eval_traditional_text"), args, args.base_steps, args.base_seconds, args.lr, log)
    base16 = {k: v.half().contiguous() for k, v in best.items() if k != "lm_head.weight" or not config.tie_word_embeddings}
    embed = {k: v for k, v in base16.items() if "embed_tokens" in k}
    save_file(embed, str(out / "base_embed.safetensors"))
    save_file({k: v for k, v in base16.items() if k not in embed}, str(out / "base_layers.safetensors"))
    # The LoRA is trained on exactly the weights that ship (fp16).
    model.load_state_dict({k: v.half().float() for k, v in best.items()})
    for prm in model.parameters():
        prm.requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    lora = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "v_proj"):
            a, b = LoRALinear.attach(getattr(layer.self_attn, proj), meta["lora_r"], meta["lora_alpha"], gen)
            lora[f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_A.weight"] = a
            lora[f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_B.weight"] = b
    lora_evals = {"eval_traditional_chat": split["lora_eval"], "eval_simplified_chat": split["base_eval_s"]}
    params = list(lora.values())
    best_lora, lora_hist, lora_s = train_phase(
        model, params, split["lora_train"], lora_evals, "eval_traditional_chat", args, args.lora_steps,
        args.lora_seconds, args.lora_lr, log)
    model.load_state_dict(best_lora)  # the preview shows the weights that are kept
    lora_state = {}
    for name, prm in lora.items():
        module = name[len("base_model.model."):].replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        lora_state[name] = best_lora[module].contiguous()
    save_file(lora_state, str(out / "lora.safetensors"))
    metrics = {"device": torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "args": {k: v for k, v in vars(args).items() if k not in ("device", "amp")},
               "base_seconds": round(base_s, 1), "lora_seconds": round(lora_s, 1),
               "base": base_hist, "lora": lora_hist}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    try:  # a glance at greedy output, for the log only (the real evaluation is `tangquant demo`)
        sample(model, data, args.device, log)
    except Exception as exc:  # noqa: BLE001 - never lose trained weights over a preview
        log(f"preview failed: {exc!r}")
    log(f"done: base {base_s:.0f} s, LoRA {lora_s:.0f} s")


if __name__ == "__main__":
    main()
