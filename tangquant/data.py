"""Build LLaMA-Factory training data from the chinese-poetry corpus.

Reads ``全唐诗/poet.tang.*.json`` (items: author, title, paragraphs), drops
empty, garbled and unbalanced poems and duplicates, turns each poem into an
instruction pair (a request phrased one of many ways, naming nothing or the
poem's own title, topic or form, see ``prompts``; the answer always opens with
the 《title》 line), splits train / eval /
calibration deterministically by a hash of the poem text (never by file
order), converts the script with OpenCC and writes LLaMA-Factory's alpaca
JSON files plus a ``dataset_info.json`` with the entries ``tang``,
``tang_eval`` and ``tang_calib``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tangquant import files, prompts, recipe
from tangquant.errors import CalibrationError, InputError, short
from tangquant.measure.poems import form_of_lines
from tangquant.recipe import param, require

logger = logging.getLogger(__name__)

HELP = "build LLaMA-Factory alpaca data (train/eval/calib) from the chinese-poetry Tang corpus"
SCRIPTS = ("traditional", "simplified")
SPLITS = ("train", "eval", "calib")
DATASET_NAMES = {"train": "tang", "eval": "tang_eval", "calib": "tang_calib"}
TOPICS = prompts.TOPICS  # images a topic request can name (simplified forms)
UNTITLED = "无题"  # the heading of a poem whose title is not plain Han characters
CLAUSE_SPLIT = re.compile(r"[，。？！；、]")
HAN = re.compile(r"^[\u4e00-\u9fff]+$")
BODY_OK = re.compile(r"^[\u4e00-\u9fff，。？！；、]+$")


def _converter(config: str):
    import opencc

    return opencc.OpenCC(config)


def corpus_files(poetry: str | Path) -> list[Path]:
    """The ``poet.tang.*.json`` files of a chinese-poetry checkout (or of its 全唐诗 folder)."""
    root = files.existing_dir(poetry, "chinese-poetry directory")
    folder = root / "全唐诗" if (root / "全唐诗").is_dir() else root
    found = sorted(folder.glob("poet.tang.*.json"), key=lambda p: (len(p.name), p.name))
    if not found:
        raise InputError(f"{root} holds no 全唐诗/poet.tang.*.json files (the chinese-poetry layout)")
    return found


def is_clean(paragraphs) -> bool:
    """Han characters and poem punctuation only, every couplet's two halves of equal length."""
    if not isinstance(paragraphs, list) or not paragraphs:
        return False
    for line in paragraphs:
        if not isinstance(line, str) or not BODY_OK.match(line) or line[-1] not in "。？！；":
            return False
        clauses = [c for c in CLAUSE_SPLIT.split(line) if c]
        if len(clauses) % 2 or any(len(c) < 2 or len(c) > 11 for c in clauses):
            return False
        if any(len(a) != len(b) for a, b in zip(clauses[::2], clauses[1::2])):
            return False
    return True


def form_of(paragraphs) -> str | None:
    """五言绝句 / 五言律诗 / 七言绝句 / 七言律诗, or None for other shapes."""
    # One definition of a line and a form, the one the demo measures answers by.
    return form_of_lines([c for line in paragraphs for c in CLAUSE_SPLIT.split(line) if c])


def poem_hash(body: str, seed: int) -> float:
    """A number in [0, 1) fixed by the poem's text and the seed (not by its position)."""
    digest = hashlib.sha256(f"{seed}\x00{body}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def load_poems(paths: list[Path]) -> tuple[list[dict], dict]:
    """Clean, de-duplicated poems (original script) and counts of what was dropped."""
    t2s = _converter("t2s")
    poems, seen = [], set()
    stats = {"read": 0, "empty": 0, "garbled": 0, "duplicate": 0}
    for path in paths:
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read {path}: {exc}") from None
        if not isinstance(items, list):
            raise InputError(f"{path} must hold a JSON list of poems")
        for i, item in enumerate(items):
            stats["read"] += 1
            paragraphs = item.get("paragraphs") if isinstance(item, dict) else None
            if paragraphs is not None and not isinstance(paragraphs, list):
                raise InputError(f"{path}: poem {i} has paragraphs {short(paragraphs)}, not a list of "
                                 "lines (the chinese-poetry layout); is it the corpus?")
            if not paragraphs or not any(str(p).strip() for p in paragraphs):
                stats["empty"] += 1
                continue
            paragraphs = [str(p).strip() for p in paragraphs if str(p).strip()]
            if not is_clean(paragraphs):
                stats["garbled"] += 1
                continue
            body = "\n".join(paragraphs)
            key = t2s.convert(body)  # variant characters do not make a poem new
            if key in seen:
                stats["duplicate"] += 1
                continue
            seen.add(key)
            title = str(item.get("title") or "").strip()
            poems.append({"title": title, "author": str(item.get("author") or "").strip(),
                          "paragraphs": paragraphs, "body": body})
    stats["kept"] = len(poems)
    return poems, stats


def split_of(u: float, eval_fraction: float, calib_fraction: float) -> str:
    if u < eval_fraction:
        return "eval"
    if u < eval_fraction + calib_fraction:
        return "calib"
    return "train"


def heading_title(title: str) -> str:
    """The title an answer opens with: the corpus title up to its first space, or 无题."""
    title = title.split(" ")[0]
    return title if HAN.match(title) else UNTITLED


def make_pair(poem: dict, u: float, convert, simplify) -> dict:
    """One alpaca record: a request true to the poem (``prompts.request``, chosen by the poem's
    hash) and the answer, which always opens with the poem's 《title》 line."""
    title = convert(heading_title(poem["title"]))
    simple_body = simplify(poem["body"])
    instruction, _ = prompts.request(repr(u), title, prompts.topics_in(simple_body), form_of(poem["paragraphs"]))
    return {"instruction": instruction, "input": "", "output": f"《{title}》\n{convert(poem['body'])}"}


@dataclass(frozen=True)
class DataParams:
    script: str = param("traditional", "script of the poems in the output (the corpus is traditional)",
                        choices=SCRIPTS)
    max_samples: int | None = param(None, "use at most N poems (a fixed hash-ordered sample)", metavar="N")
    eval_fraction: float = param(0.02, "share held out for eval")
    calib_fraction: float = param(0.01, "share held out for quantization calibration")
    seed: int = param(0, "salt of the split hash")
    lm_eval_items: int = param(0, "also write lm-evaluation-harness tasks (tang_nextline, tang_couplet; "
                               "both scripts) of up to N eval-split poems each into OUTPUT/lm_eval",
                               metavar="N")

    def __post_init__(self):
        require(self.script in SCRIPTS, f"script must be one of {', '.join(SCRIPTS)}, got {self.script!r}")
        for name in ("eval_fraction", "calib_fraction"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        require(self.eval_fraction + self.calib_fraction < 1.0,
                "eval_fraction + calib_fraction must leave some training data")
        require(self.max_samples is None or self.max_samples >= 1,
                f"max_samples must be positive, got {self.max_samples}")
        require(self.lm_eval_items >= 0, f"lm_eval_items must be 0 or positive, got {self.lm_eval_items}")


PARAMS = DataParams


def data(poetry, output, params: DataParams | None = None, force: bool = False, **overrides) -> dict:
    """Write ``tang_{train,eval,calib}.json`` and ``dataset_info.json`` into ``output``."""
    p = recipe.resolve(DataParams, params, overrides)
    paths = corpus_files(poetry)
    out = files.check_output(output, [poetry], force)
    poems, stats = load_poems(paths)
    hashed = sorted(((poem_hash(x["body"], p.seed), x) for x in poems), key=lambda x: x[0])
    if p.max_samples is not None:
        # The smallest hashes: a fixed, corpus-wide sample, whatever the file order.
        hashed = hashed[:p.max_samples]
    t2s = _converter("t2s")
    convert = t2s.convert if p.script == "simplified" else (lambda s: s)
    records: dict[str, list] = {s: [] for s in SPLITS}
    held = []
    for u, poem in hashed:
        split = split_of(u, p.eval_fraction, p.calib_fraction)
        records[split].append(make_pair(poem, u, convert, t2s.convert))
        if split == "eval":
            held.append(poem)
    if not records["train"]:
        raise CalibrationError(f"no usable poems in {poetry} after cleaning ({stats})")
    counts = {s: len(r) for s, r in records.items()}
    with files.atomic_output_dir(out, force) as tmp:
        _write_splits(tmp, records)
        inputs = {"poetry": str(Path(poetry).resolve()), "files": len(paths),
                  "sha256": _corpus_digest(paths)}
        if p.lm_eval_items:
            counts["lm_eval"] = _write_tasks(tmp / "lm_eval", held, p, t2s.convert)
        files.write_manifest(tmp, "data", dataclasses.asdict(p), inputs, {**stats, **counts})
    tasks = (f"; lm_eval tasks of {min(counts['lm_eval'].values())} items in {out / 'lm_eval'}"
             if counts.get("lm_eval") else "")
    summary = (f"{out}: {counts['train']} train / {counts['eval']} eval / {counts['calib']} calib pairs "
               f"({p.script}; kept {stats['kept']} of {stats['read']} poems), "
               f"{files.human_size(files.dir_size(out))}{tasks}")
    return {"output": str(out), "counts": counts, "stats": stats, "script": p.script, "summary": summary}


def _write_tasks(out: Path, held: list[dict], p: DataParams, t2s) -> dict:
    """The lm_eval task set of the eval split (see ``tangquant.lmtasks``); {task: items}."""
    from tangquant import lmtasks

    out.mkdir()
    items = lmtasks.build_items(held, p.lm_eval_items, p.seed, form_of)
    source = (f"the {len(held)} poems of the eval split (seed {p.seed}, eval fraction "
              f"{p.eval_fraction}) of {p.max_samples or 'all'} clean poems")
    counts = lmtasks.write_task_dir(out, items, t2s, source)
    if min(counts.values(), default=0) < p.lm_eval_items:
        logger.warning("lm_eval tasks: only %s items (of %d asked) from %d held-out poems; raise "
                       "--eval-fraction for more", min(counts.values(), default=0), p.lm_eval_items, len(held))
    return counts


def _write_splits(tmp: Path, records: dict) -> None:
    info = {}
    for split, recs in records.items():
        name = f"tang_{split}.json"
        (tmp / name).write_text(json.dumps(recs, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        info[DATASET_NAMES[split]] = {
            "file_name": name, "file_sha1": hashlib.sha1((tmp / name).read_bytes()).hexdigest(),
            "formatting": "alpaca",
            "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    files.write_json(tmp / "dataset_info.json", info)


def _corpus_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(files.sha256_file(p).encode())
    return h.hexdigest()


def add_arguments(parser) -> None:
    parser.add_argument("--poetry", required=True, metavar="DIR",
                        help="chinese-poetry checkout (holding 全唐诗/poet.tang.*.json)")
    parser.add_argument("--output", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> dict:
    return data(args.poetry, args.output, recipe.from_args(DataParams, args), force=args.force)
