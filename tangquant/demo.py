"""The whole pipeline, offline, on the built-in tiny Tang poet.

merge (base + LoRA) → GPTQ INT4 (Intel neural-compressor) → OpenVINO IR → a
short bench, then the seed's before/after table: the same prompts answered by
the base, by base + LoRA and by the merged INT4 model, greedy and sampled
(temperature 0.8, top-p 0.9, fixed seeds), with each one's traditional ratio
and held-out perplexity on simplified and on traditional text.

Traditional ratio = T / (T + S) over the generated Han characters, where T
counts characters that OpenCC's t2s changes (traditional forms) and S those
that its s2t changes (simplified forms). The poet's LoRA changes the script,
so the ratio shows whether the fine-tune survived merge + INT4.

The prompts are held out from training (``assets/demo/prompts.json``), each
annotated with what it asks; ``measure.poems`` scores whether the answers do
it: form accuracy, title accuracy, topic hit rate and, greedy, the share of
distinct answers.

With the shipped draft poet (``assets/demo/draft``, the same tokenizer), the demo also
quantizes and exports it like the poet and answers the held-out prompts greedily with it as
the IR's draft (speculative decoding, K = 4): the share of drafted tokens the merged INT4 model
accepts, the tokens per target step, and whether each answer is the IR's own without a draft.

Example:
  tangquant demo --workdir tangquant-demo
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from tangquant import draft as drafts
from tangquant import files, load, recipe
from tangquant.bench import bench as run_bench
from tangquant.errors import ParameterError
from tangquant.export import export
from tangquant.generate import Sampling, open_generator
from tangquant.measure import poems
from tangquant.measure.poems import _converters, traditional_ratio
from tangquant.merge import merge
from tangquant.ov.ir import EXACT_CONFIG
from tangquant.poet import ASSETS, demo_paths
from tangquant.quantize import quantize
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "the whole pipeline on the built-in tiny Tang poet, with a before/after table"
TEMPERATURE, TOP_P = 0.8, 0.9
MODELS = ("base", "base + LoRA", "merged INT4")


def perplexity(model, tokenizer, texts: list[str], chat: bool) -> float:
    """Perplexity of held-out poems: as the answer to 写一首唐诗 (``chat``), or as plain text.

    Only the poem's tokens (and the closing token) are scored, never the prompt.
    """
    import torch

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if chat else eot
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": "写一首唐诗"}], tokenize=False,
                                                     add_generation_prompt=True))["input_ids"] if chat else [eot]
    nll = count = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([prompt + tokenizer(text)["input_ids"] + [end]])
            logits = torch.as_tensor(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
            logp = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)
            nll -= float(logp.gather(1, ids[0, len(prompt):, None]).sum())
            count += ids.shape[1] - len(prompt)
    return math.exp(nll / count)


def generations(generator, prompts: list[dict], samples: int, max_new_tokens: int) -> dict:
    """Greedy answers and ``samples`` seeded sampled answers per prompt, their script and prompt-following."""
    greedy, sampled = [], []
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt["prompt"]}]
        greedy.append(generator.generate(msgs, Sampling(max_new_tokens, 0.0, 1.0, 0)))
        sampled.append([generator.generate(msgs, Sampling(max_new_tokens, TEMPERATURE, TOP_P, seed))
                        for seed in range(samples)])
    return {"greedy": greedy, "sampled": sampled,
            "ratio_greedy": traditional_ratio(greedy),
            "ratio_sampled": traditional_ratio(t for group in sampled for t in group),
            "follow": poems.summary(prompts, greedy, sampled)}


def heldout_texts(path: Path) -> dict[str, list[str]]:
    t2s, _ = _converters()
    docs = _read_list(path)
    traditional = [d["text"] for d in docs]
    return {"simplified": [t2s.convert(t) for t in traditional], "traditional": traditional}


def _read_list(path: Path) -> list:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def measure(models: dict, tokenizer, prompts, samples: int, max_new_tokens: int, heldout: Path) -> dict:
    """Generations, traditional ratios and perplexities of each (generator, logits model) pair."""
    texts = heldout_texts(heldout)
    out = {}
    for name, (make_generator, make_lm) in models.items():
        t0 = time.time()
        row = generations(make_generator(), prompts, samples, max_new_tokens)
        lm = make_lm()
        row["ppl"] = {f"{form} {script}": perplexity(lm, tokenizer, t, chat=form == "chat")
                      for form in ("chat", "text") for script, t in texts.items()}
        row["seconds"] = round(time.time() - t0, 1)
        out[name] = row
        logger.info("%s: traditional ratio greedy %.2f, sampled %.2f; greedy form %s, title %s, topic %s",
                    name, row["ratio_greedy"] or 0, row["ratio_sampled"] or 0,
                    *(row["follow"]["greedy"][a]["rate"] for a in poems.ASKS))
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(results: dict, prompts, answers: bool = True) -> str:
    kinds = list(next(iter(results.values()))["ppl"])
    lines = ["| model | traditional ratio, greedy | traditional ratio, sampled | "
             + " | ".join(f"perplexity, {k}" for k in kinds) + " |", "|---" * (3 + len(kinds)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {_pct(r['ratio_greedy'])} | {_pct(r['ratio_sampled'])} | "
                     + " | ".join(f"{r['ppl'][k]:.1f}" for k in kinds) + " |")
    lines += ["", poems.follow_table({name: r["follow"] for name, r in results.items()})]
    if not answers:
        return "\n".join(lines)
    lines += ["", "| prompt (greedy answers) | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        cells = [r["greedy"][i].strip().replace("\n", " ") for r in results.values()]
        lines.append(f"| {prompt['prompt']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draft_report(ir: Path, draft: Path, prompts, max_new_tokens: int, k: int = drafts.DEFAULT_TOKENS) -> dict:
    """Greedy answers of the IR with and without the ``draft`` IR (f32, f32 KV cache: the setting under
    which a verification step rounds as a one-token step does), and the draft's acceptance."""
    config = {**EXACT_CONFIG, "KV_CACHE_PRECISION": "f32"}
    plain = open_generator(ir, ov_config=config)
    drafted = open_generator(ir, ov_config=config, draft=draft, draft_tokens=k)
    greedy = Sampling(max_new_tokens, 0.0, 1.0, 0)
    sums, same = {"drafted": 0, "accepted": 0, "generated": 0, "target_passes": 0}, 0
    for prompt in prompts:
        msgs = [{"role": "user", "content": prompt["prompt"]}]
        answer = drafted.generate(msgs, greedy)
        sums = {key: sums[key] + drafted.speculation[key] for key in sums}
        same += answer == plain.generate(msgs, greedy)
    return {"k": k, **sums, "acceptance": sums["accepted"] / max(1, sums["drafted"]),
            "tokens_per_step": sums["generated"] / max(1, sums["target_passes"]),
            "identical": same, "prompts": len(prompts)}


def _draft_line(d: dict) -> str:
    return (f"draft poet (K={d['k']}, greedy): {_pct(d['acceptance'])} of {d['drafted']} drafted tokens accepted, "
            f"{d['tokens_per_step']:.2f} tokens per target step; answers identical to the IR's alone: "
            f"{d['identical']}/{d['prompts']}")


def _hf_generator(path, adapter=None):
    return lambda: open_generator(path, adapter=adapter)


def _lm(path, adapter=None):
    return lambda: load.logits_model(path, adapter=adapter)


def _ov_generator(path):
    return lambda: open_generator(path, ov_config=EXACT_CONFIG)


def build(tmp: Path, base: Path, adapter: Path, calib: Path, bench: bool, draft: Path | None = None) -> dict:
    """merge → GPTQ INT4 → OpenVINO IR (→ bench) inside ``tmp``, and the ``draft`` poet's GPTQ INT4 →
    IR; returns each stage's metrics."""
    stages = {}
    t0 = time.time()
    stages["merge"] = merge(base, adapter, tmp / "merged", dtype="fp32")
    stages["quantize"] = quantize(tmp / "merged", tmp / "int4-gptq", calib.parent / "int4-gptq-g128.yaml",
                                  calib=str(calib))
    stages["export"] = export(stages["quantize"]["checkpoint"], tmp / "int4-openvino")
    if draft is not None:
        q = quantize(draft, tmp / "draft-int4-gptq", calib.parent / "int4-gptq-g128.yaml", calib=str(calib))
        stages["draft_export"] = export(q["checkpoint"], tmp / "draft-openvino")
    if bench:
        stages["bench"] = run_bench(
            candidates=(f"merged-int4=ov:{tmp / 'int4-openvino'}",
                        f"base+lora=torch:{base},adapter={adapter},dtype=fp32"),
            prompt_tokens=32, gen_tokens=32, repetitions=2, warmup=1, results_dir=str(tmp / "bench"),
            bandwidth_mb=64)
    stages["seconds"] = round(time.time() - t0, 1)
    return stages


@dataclass(frozen=True)
class DemoParams:
    samples: int = param(3, "sampled answers per prompt")
    max_new_tokens: int = param(100, "largest number of tokens per answer (a 七言律诗 with its title needs "
                                "about 80)")
    bench: bool = param(True, "run the short bench")
    draft: bool = param(True, "also build the shipped draft poet and report its acceptance as the IR's "
                        "draft (speculative decoding, greedy)")

    def __post_init__(self):
        require(self.samples >= 0, f"samples must be >= 0, got {self.samples}")
        require(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


PARAMS = DemoParams


def demo(workdir=None, params: DemoParams | None = None, force: bool = False, assets=None,
         prompts=None, **overrides) -> dict:
    """Run the pipeline on the shipped poet into ``workdir`` and measure before/after.

    ``prompts``: annotated prompts (dicts as in ``prompts.json``, or plain strings that ask
    nothing); by default the shipped held-out prompts.
    """
    p = recipe.resolve(DemoParams, params, overrides)
    paths = demo_paths(Path(assets) if assets else ASSETS)
    prompts = [q if isinstance(q, dict) else {"prompt": q} for q in prompts] if prompts is not None \
        else poems.load_prompts(paths["prompts"])
    base, adapter = files.existing_dir(paths["base"], "demo base"), files.existing_dir(paths["adapter"], "demo adapter")
    root = base.parent
    context = load.context_length(load.model_config(base))
    if context is not None and p.max_new_tokens >= context:
        raise ParameterError(f"--max-new-tokens {p.max_new_tokens} does not fit the poet's context of "
                             f"{context} tokens with its prompt")
    out = files.check_output(workdir or "tangquant-demo", [root], force)
    t0 = time.time()
    draft = paths["draft"] if p.draft and (paths["draft"] / "config.json").is_file() else None
    with files.atomic_output_dir(out, force) as tmp:
        stages = build(tmp, base, adapter, root / "calib.json", p.bench, draft)
        tokenizer = load.tokenizer(base)
        final = out / "int4-openvino"  # where the IR lies once the directory is renamed
        models = {"base": (_hf_generator(base), _lm(base)),
                  "base + LoRA": (_hf_generator(base, adapter), _lm(base, adapter)),
                  "merged INT4": (_ov_generator(tmp / "int4-openvino"), _lm(tmp / "int4-openvino"))}
        results = measure(models, tokenizer, prompts, p.samples, p.max_new_tokens, root / "heldout.json")
        report = table(results, prompts)
        spec = draft_report(tmp / "int4-openvino", tmp / "draft-openvino", prompts, p.max_new_tokens) \
            if draft is not None else None
        if spec:
            report += "\n\n" + _draft_line(spec)
        (tmp / "demo.md").write_text(report + "\n", encoding="utf-8")
        lora, int4 = results["base + LoRA"], results["merged INT4"]
        metrics = {"results": results, "seconds": round(time.time() - t0, 1),
                   "stage_seconds": stages["seconds"],
                   "int4_vs_lora_greedy": _ratio(int4["ratio_greedy"], lora["ratio_greedy"]),
                   "int4_vs_lora_sampled": _ratio(int4["ratio_sampled"], lora["ratio_sampled"]),
                   "int4_vs_lora_follow": poems.kept(int4["follow"], lora["follow"]), "draft": spec}
        files.write_json(tmp / "demo.json", {**metrics, "prompts": list(prompts), "samples": p.samples,
                                             "temperature": TEMPERATURE, "top_p": TOP_P})
        files.write_manifest(tmp, "demo", {"prompts": list(prompts), **dataclasses.asdict(p)},
                             {"base": str(base), "adapter": str(adapter)},
                             {k: v for k, v in metrics.items() if k != "results"})
    summary = (f"{out}: merged INT4 greedy form/title/topic {_follow(int4)} vs base + LoRA {_follow(lora)}; "
               f"traditional ratio {_pct(int4['ratio_greedy'])} greedy / "
               f"{_pct(int4['ratio_sampled'])} sampled vs base + LoRA {_pct(lora['ratio_greedy'])} / "
               f"{_pct(lora['ratio_sampled'])} (base {_pct(results['base']['ratio_greedy'])}); "
               f"IR {final}, {metrics['seconds']:.0f} s")
    # The answers are in demo.md; the table printed last is the scores.
    scores = table(results, prompts, answers=False) + (f"\n\n{_draft_line(spec)}" if spec else "")
    return {"output": str(out), **metrics, "report": scores, "summary": summary}


def _follow(row) -> str:
    return "/".join(_pct(row["follow"]["greedy"][a]["rate"]) for a in poems.ASKS)


def _ratio(a, b):
    return None if a is None or not b else a / b


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="tangquant-demo", metavar="DIR",
                        help="where the merged, INT4 and OpenVINO models and the report go "
                             "(default: ./tangquant-demo)")
    parser.add_argument("--force", action="store_true", help="replace an existing DIR")


def run(args) -> dict:
    result = demo(args.workdir, recipe.from_args(DemoParams, args), force=args.force)
    # The before/after table is what the demo is for: it ends the output, after the summary.
    return {**result, "report": f"{result['summary']}\n\n{result['report']}", "summary": None}
