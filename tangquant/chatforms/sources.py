"""A model directory's tokenizer and chat template: the conversations every form is checked on,
how two directories' tokenizers differ, and the default system prompt a ChatML template adds.

LLaMA-Factory saves the training tokenizer beside a LoRA adapter (its chat template may be
LLaMA-Factory's own rendering of the template it trained with), so ``merge`` compares it with the
base's: the vocabulary and special tokens, and the chat template by what it renders, not by its
text (two templates written differently may render alike). transformers is imported by the
functions that need it.
"""

from __future__ import annotations

import re
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json")
SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")
TURNS = [{"role": "user", "content": "寫一首關於明月的五言絕句"},
         {"role": "assistant", "content": "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"},
         {"role": "user", "content": "再寫一首，題為《春曉》"}]
CONVERSATIONS = {"system + two turns": [{"role": "system", "content": "你是一位唐代詩人。"}, *TURNS],
                 "two turns, default system": TURNS}
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.S)


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def first_difference(got: str, want: str, what: str = "Hugging Face") -> str:
    i = next((k for k, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    return (f"at character {i}: {got[max(0, i - 30):i + 30]!r} where {what} gives "
            f"{want[max(0, i - 30):i + 30]!r}")


def template_difference(tok, ref) -> str | None:
    """How ``tok``'s chat template renders the check conversations unlike ``ref``'s; None if alike."""
    have, want = getattr(tok, "chat_template", None), getattr(ref, "chat_template", None)
    if not have or not want:
        return None if have == want else f"one has no chat template ({'base' if not want else 'adapter'})"
    for name, msgs in CONVERSATIONS.items():
        got, expected = render(tok, msgs), render(ref, msgs)
        if got != expected:
            return f"({name}) {first_difference(got, expected, 'the base')}"
    return None


def vocabulary_difference(tok, ref) -> str | None:
    """Tokens or special tokens ``tok`` has unlike ``ref``; None if the same."""
    a, b = tok.get_vocab(), ref.get_vocab()
    if a != b:
        extra = sorted(set(a) - set(b))[:3]
        moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])[:3]
        return (f"{len(a)} tokens against the base's {len(b)}"
                + (f"; new: {', '.join(map(repr, extra))}" if extra else "")
                + (f"; other ids for {', '.join(map(repr, moved))}" if moved else ""))
    for name in SPECIAL:
        if getattr(tok, name, None) != getattr(ref, name, None):
            return f"{name} {getattr(tok, name, None)!r} where the base has {getattr(ref, name, None)!r}"
    return None


def default_system(tokenizer) -> str | None:
    """The system prompt a ChatML template puts before a chat that has none (Qwen1.5's
    "You are a helpful assistant."), or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    rendered = render(tokenizer, [{"role": "user", "content": "x"}])
    m = _CHATML_SYSTEM.match(rendered)
    return m.group(1) if m else None


def take_tokenizer(src: Path, dst: Path) -> list[str]:
    """Replace ``dst``'s tokenizer and chat template files by ``src``'s (none of ``dst``'s left to
    shadow them: a ``chat_template.jinja`` wins over ``tokenizer_config.json``'s template)."""
    import shutil

    for name in TOKENIZER_FILES:
        (Path(dst) / name).unlink(missing_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def tokenizer_of(model_dir: Path, like=None):
    """A directory's HF tokenizer; an adapter directory (no config.json) whose tokenizer_config.json
    names no class is read with the class of ``like`` (the base's)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError):
        if like is None:
            raise
        return type(like).from_pretrained(str(model_dir))


def compare_dirs(base_dir: Path, adapter_dir: Path) -> dict | None:
    """{"vocabulary": difference or None, "chat_template": difference or None} of the tokenizer saved
    beside an adapter against the base's; None when the adapter holds no tokenizer."""
    if not has_tokenizer(adapter_dir):
        return None
    base = tokenizer_of(base_dir)
    tok = tokenizer_of(adapter_dir, like=base)
    return {"vocabulary": vocabulary_difference(tok, base), "chat_template": template_difference(tok, base)}
