"""Streaming terminal chat with an OpenVINO IR or a Hugging Face model directory.

An OpenVINO IR directory (``tangquant export``) runs through openvino-genai's
LLMPipeline; any other directory through transformers (a GPTQ checkpoint is
dequantised exactly, ``--adapter`` adds a LoRA). Prompts are formatted with the
model's own chat template. Type ``clear`` to forget the history, ``exit`` to
quit; ``--prompt TEXT`` answers once and exits, for scripts.

Example:
  tangquant chat --model out/poet-ov
  tangquant chat --model out/poet-ov --prompt 写一首唐诗 --temperature 0
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tangquant.errors import InputError

logger = logging.getLogger(__name__)

HELP = "streaming terminal chat with an OpenVINO IR or a Hugging Face model"
BANNER = "Chat with {name}. Type `clear` to clear the history, `exit` to quit."


@dataclass(frozen=True)
class Sampling:
    """Generation settings; temperature 0 means greedy decoding."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError("--temperature must be >= 0 and --top-p in (0, 1]")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="OpenVINO IR directory or Hugging Face model directory")
    parser.add_argument("--adapter", help="LoRA adapter to apply (Hugging Face models only)")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="system message (default: the chat template's)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.8)
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .bin pickle weights")


def run(args) -> int:
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    return chat(args.model, adapter=args.adapter, prompt=args.prompt, system=args.system,
                sampling=sampling, allow_pickle=args.allow_pickle)


def chat(model, adapter=None, prompt: str | None = None, system: str | None = None,
         sampling: Sampling = Sampling(), allow_pickle: bool = False) -> int:
    """Chat in the terminal, or answer ``prompt`` once; returns the exit code."""
    generator = load_generator(model, adapter=adapter, allow_pickle=allow_pickle)
    prefix = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _answer(generator, prefix + [{"role": "user", "content": prompt}], sampling, sys.stdout)
        return 0
    print(BANNER.format(name=Path(model).name), flush=True)
    chat_loop(generator, sampling, system)
    return 0


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
        history.append({"role": "user", "content": query})
        print("Assistant: ", end="", file=stdout, flush=True)
        reply = _answer(generator, prefix + history, sampling, stdout)
        history.append({"role": "assistant", "content": reply})


def _read(stdin, stdout) -> str | None:
    print("\nUser: ", end="", file=stdout, flush=True)
    try:
        line = (stdin or sys.stdin).readline()
    except KeyboardInterrupt:
        return None
    return line.rstrip("\n") if line else None


def _answer(generator, messages: list[dict], sampling: Sampling, stdout) -> str:
    chunks = []
    for chunk in generator.stream(messages, sampling):
        print(chunk, end="", file=stdout, flush=True)
        chunks.append(chunk)
    print(file=stdout, flush=True)
    return "".join(chunks)


def load_generator(model_dir, adapter=None, allow_pickle: bool = False, device: str = "CPU",
                   ov_config: dict | None = None):
    """An object with ``stream(messages, sampling)`` and ``generate(messages, sampling) -> str``.

    ``model_dir`` is an OpenVINO IR directory (openvino-genai; ``ov_config`` e.g.
    ``ov_ir.EXACT_CONFIG``) or a Hugging Face directory (transformers, fp32; GPTQ
    checkpoints dequantised exactly; ``adapter`` applies a LoRA).
    """
    from tangquant.ov import ir as ov_ir
    from tangquant.files import existing_dir

    model_dir = existing_dir(model_dir, "model directory")
    if ov_ir.is_ir_dir(model_dir):
        if adapter:
            raise InputError("--adapter applies to Hugging Face models, not to an OpenVINO IR")
        return OVGenerator(model_dir, device, ov_config or {})
    return HFGenerator(model_dir, adapter, allow_pickle)


class _Streamer:
    """Runs a blocking generate() in a thread and yields the text pieces it reports."""

    def __init__(self):
        self.pieces: queue.Queue = queue.Queue()
        self.stopped = threading.Event()

    def iterate(self, target) -> Iterator[str]:
        done = object()

        def work():
            try:
                target()
                self.pieces.put(done)
            except BaseException as exc:  # re-raised in the consuming thread
                self.pieces.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (piece := self.pieces.get()) is not done:
                if isinstance(piece, BaseException):
                    raise piece
                yield piece
        finally:
            self.stopped.set()
            thread.join()


class OVGenerator:
    def __init__(self, model_dir: Path, device: str = "CPU", ov_config: dict | None = None):
        import openvino_genai

        from tangquant.ov import ir as ov_ir

        ov_ir.check_ir_files(model_dir)
        try:
            self.pipe = openvino_genai.LLMPipeline(str(model_dir), device, **(ov_config or {}))
        except RuntimeError as exc:
            raise InputError(f"openvino-genai cannot load {model_dir}: {_first_line(exc)}") from None
        self.model_dir = model_dir

    def _config(self, sampling: Sampling):
        config = self.pipe.get_generation_config()
        config.max_new_tokens = sampling.max_new_tokens
        config.do_sample = sampling.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p = sampling.temperature, sampling.top_p
        if sampling.seed is not None:
            config.rng_seed = sampling.seed
        return config

    def stream(self, messages: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
        import openvino_genai

        streamer = _Streamer()
        config, history = self._config(sampling), openvino_genai.ChatHistory(messages)

        def on_piece(piece: str):
            streamer.pieces.put(piece)
            stop = streamer.stopped.is_set()
            return openvino_genai.StreamingStatus.STOP if stop else openvino_genai.StreamingStatus.RUNNING

        yield from streamer.iterate(lambda: self.pipe.generate(history, config, on_piece))

    def generate(self, messages: list[dict], sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(messages, sampling))


class HFGenerator:
    def __init__(self, model_dir: Path, adapter=None, allow_pickle: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tangquant.checkpoint import load_config, weight_files

        config = load_config(model_dir)
        weight_files(model_dir, allow_pickle=allow_pickle)
        qc = config.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
            from tangquant.gptq import load_dequantized

            model = load_dequantized(model_dir)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, trust_remote_code=False,
                use_safetensors=not allow_pickle or None)
        if adapter:
            from peft import PeftModel

            from tangquant.files import existing_dir

            model = PeftModel.from_pretrained(model, existing_dir(adapter, "adapter directory"))
        self.model = model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        if not self.tokenizer.chat_template:
            raise InputError(f"the tokenizer in {model_dir} has no chat template")

    def stream(self, messages: list[dict], sampling: Sampling = Sampling()) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        text_streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer = _Streamer()

        class Stop(StoppingCriteria):
            def __call__(self, *args, **kwargs):
                return streamer.stopped.is_set()

        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        sample = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p} \
            if sampling.temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                              "top_k": None}

        errors: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**ids, max_new_tokens=sampling.max_new_tokens,
                                        streamer=text_streamer,
                                        stopping_criteria=StoppingCriteriaList([Stop()]), **sample)
            except BaseException as exc:  # ends the text stream, re-raised by pump
                errors.append(exc)
                text_streamer.end()

        def pump():
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            for piece in text_streamer:
                if piece:
                    streamer.pieces.put(piece)
            thread.join()
            if errors:
                raise errors[0]

        yield from streamer.iterate(pump)

    def generate(self, messages: list[dict], sampling: Sampling = Sampling()) -> str:
        return "".join(self.stream(messages, sampling))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
