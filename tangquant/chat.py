"""Streaming terminal chat with an OpenVINO IR, a GGUF or a Hugging Face model directory.

An OpenVINO IR directory (``tangquant export``) runs through openvino-genai's
LLMPipeline; a GGUF (``--format gguf``) through llama.cpp, in a child process; a
deployment directory (``tangquant tune --apply``) in the engine, file and
settings it chose; any other directory through transformers (a GPTQ checkpoint
is dequantised exactly, ``--adapter`` adds a LoRA). ``--draft DIR`` decodes an
IR speculatively with a draft IR of the same tokenizer (checked), ``--draft-tokens
K`` per step. Prompts are formatted with the model's own chat template. Type ``clear`` to forget the history, ``exit`` to
quit; ``--prompt TEXT`` answers once and exits, for scripts.

Example:
  tangquant chat --model out/poet-ov
  tangquant chat --model out/poet-ov --prompt 写一首唐诗 --temperature 0
  tangquant chat --model out/7b-ov --draft out/0.5b-ov --draft-tokens 4
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tangquant import recipe
from tangquant.draft import GREEDY_ONLY
from tangquant.errors import ParameterError, is_utf8
from tangquant.generate import Sampling, SamplingError, open_generator
from tangquant.generators import require_finite_first_step
from tangquant.recipe import param

logger = logging.getLogger(__name__)

HELP = "streaming terminal chat with an OpenVINO IR, a GGUF or a Hugging Face model"
BANNER = "Chat with {name}. Type `clear` to clear the history, `exit` to quit."


@dataclass(frozen=True)
class ChatParams:
    system: str | None = param(None, "system message (default: the chat template's)")
    max_new_tokens: int = param(512, "largest number of tokens per answer")
    temperature: float = param(0.7, "sampling temperature; 0 for greedy decoding")
    top_p: float = param(0.8, "nucleus sampling: the smallest set of tokens with this much probability")
    seed: int | None = param(None, "random seed for sampling")
    allow_pickle: bool = param(False, "allow .bin pickle weights (loaded with weights_only=True)")
    top_k: int | None = param(None, "sample among the K most likely tokens; 0: no limit "
                              "(default: the model's generation_config.json)", metavar="K")
    min_p: float | None = param(None, "drop tokens less likely than this fraction of the most likely "
                                "(default: the model's)", metavar="P")
    repetition_penalty: float | None = param(None, "divide the logits of tokens already in the prompt "
                                             "or reply (1: none; default: the model's)", metavar="R")
    draft_tokens: int | None = param(None, "tokens the --draft model proposes per step (default 4)",
                                     metavar="K")

    def __post_init__(self):
        _ = self.sampling  # Sampling refuses bad values
        if self.draft_tokens is not None and (isinstance(self.draft_tokens, bool) or self.draft_tokens < 1):
            raise ParameterError(f"--draft-tokens must be at least 1, got {self.draft_tokens}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, self.seed, top_k=self.top_k,
                        min_p=self.min_p, repetition_penalty=self.repetition_penalty)


PARAMS = ChatParams


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="OpenVINO IR, GGUF, deployment or Hugging Face model directory")
    parser.add_argument("--adapter", help="LoRA adapter to apply (Hugging Face models only)")
    parser.add_argument("--draft", metavar="DIR", help="a draft model for speculative decoding: the "
                        "same format and tokenizer as --model (e.g. Qwen1.5-0.5B-Chat's export for 7B)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")


def run(args) -> dict:
    chat(args.model, recipe.from_args(ChatParams, args), adapter=args.adapter, prompt=args.prompt,
         draft=args.draft)
    return {}


def chat(model, params: ChatParams | None = None, adapter=None, prompt: str | None = None,
         draft=None, **overrides) -> None:
    """Chat in the terminal, or answer ``prompt`` once."""
    p = recipe.resolve(ChatParams, params, overrides)
    if draft and p.temperature != 0:
        raise ParameterError(f"--draft: {GREEDY_ONLY}; pass --temperature 0")
    for flag, text in (("--prompt", prompt), ("--system", p.system)):
        if text is not None and not is_utf8(text):
            raise ParameterError(f"{flag} is not valid UTF-8 text")
    generator = open_generator(model, adapter=adapter, allow_pickle=p.allow_pickle, draft=draft,
                               draft_tokens=p.draft_tokens)
    require_finite_first_step(generator, model)
    prefix = [{"role": "system", "content": p.system}] if p.system else []
    try:
        if prompt is not None:
            _answer(generator, prefix + [{"role": "user", "content": prompt}], p.sampling, sys.stdout)
            return
        print(BANNER.format(name=Path(model).name), flush=True)
        chat_loop(generator, p.sampling, p.system)
    finally:
        generator.close()  # a llama.cpp child process ends with the chat


def chat_loop(generator, sampling: Sampling = Sampling(), system: str | None = None,
              stdin=None, stdout=None) -> list[dict]:
    """Read user turns until `exit` or end of input; `clear` forgets the history. Returns it."""
    stdout = stdout or sys.stdout
    prefix = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    while True:
        query = _read(stdin, stdout)
        if query is None or query.strip() == "exit":
            return history
        if query.strip() == "clear":
            history = []
            print("History has been removed.", file=stdout, flush=True)
            continue
        if not query.strip():
            continue
        print("Assistant: ", end="", file=stdout, flush=True)
        try:
            reply = _answer(generator, prefix + history + [{"role": "user", "content": query}],
                            sampling, stdout)
        except SamplingError as exc:  # the conversation no longer fits the context
            print(f"\n{exc}", file=stdout, flush=True)
            continue
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": reply}]


def _read(stdin, stdout) -> str | None:
    print("\nUser: ", end="", file=stdout, flush=True)
    while True:
        try:
            line = (stdin or sys.stdin).readline()
        except KeyboardInterrupt:
            return None
        except UnicodeDecodeError:  # the terminal sent bytes that are not UTF-8
            print("That line was not valid UTF-8 text; type it again.\nUser: ", end="", file=stdout,
                  flush=True)
            continue
        if line and not is_utf8(line):  # a surrogate-escaped stdin (C locale) lets bad bytes through
            print("That line was not valid UTF-8 text; type it again.\nUser: ", end="", file=stdout,
                  flush=True)
            continue
        return line.rstrip("\n") if line else None


def _answer(generator, messages: list[dict], sampling: Sampling, stdout) -> str:
    chunks = []
    for chunk in generator.stream(messages, sampling):
        print(chunk, end="", file=stdout, flush=True)
        chunks.append(chunk)
    print(file=stdout, flush=True)
    counts = getattr(generator, "speculation", None)
    if counts and counts["drafted"]:
        logger.info("draft: %d of %d proposed tokens accepted (%.0f%%), %.2f tokens per target step",
                    counts["accepted"], counts["drafted"], 100 * counts["accepted"] / counts["drafted"],
                    counts["generated"] / max(1, counts["target_passes"]))
    return "".join(chunks)
