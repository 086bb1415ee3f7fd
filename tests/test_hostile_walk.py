"""Every command's error paths, walked (issue 30): bad paths, bad values, malformed files.

Bad input is exit 2 with one error line and no traceback — never exit 1, which says "probably a
bug in tangquant". Each command has a row of bad invocations below; a command added to the CLI
without one fails ``test_every_command_has_its_error_paths_walked``. Checks that need a model
loaded (NaN weights, adapters for another shape, GGUF metadata) are in the hostile suites.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _gptq_fixtures import make_rtn_gptq
from _hostile_fixtures import copy, edit_json

from tangquant.cli import COMMANDS, main

HUGE = str(10**30)
# {name}: paths the fixture below makes; every invocation must be refused with exit 2.
BAD = {
    "data": [
        "--poetry {missing} --output {out}", "--poetry {file} --output {out}",
        "--poetry {empty} --output {out}", "--poetry {bad_corpus} --output {out}",
        "--poetry {list_corpus} --output {out}", "--poetry {poetry} --output {file}/x",
        "--poetry {poetry} --output {out} --eval-fraction 1.5",
        "--poetry {poetry} --output {out} --eval-fraction nan",
        "--poetry {poetry} --output {out} --max-samples 0", "--poetry {poetry} --output {out} --seed " + HUGE,
        "--poetry {poetry} --output {out} --recipe {unknown_key}",
        "--poetry {poetry} --output {out} --recipe {missing}",
        "--poetry {poetry} --output {out} --script klingon",
    ],
    "merge": [
        "--model {missing} --adapter {adapter} --output {out}",
        "--model {base} --adapter {missing} --output {out}",
        "--model {base} --adapter {base} --output {out}", "--model {adapter} --adapter {adapter} --output {out}",
        "--model {base} --adapter {adapter} --output {base}/inside",
        "--model {base} --adapter {adapter} --output {out} --dtype fp64",
        "--model {gptq} --adapter {adapter} --output {out}",
        "--model {bad_config} --adapter {adapter} --output {out}",
        "--model {list_config} --adapter {adapter} --output {out}",
        "--model {base} --adapter {bad_adapter} --output {out}",
        "--model {base} --adapter {adapter} --output {out} --recipe {bad_yaml}",
    ],
    "quantize": [
        "--model {missing} --output {out}", "--model {gptq} --output {out}", "--model {ir} --output {out}",
        "--model {base} --output {out} --bits 3", "--model {base} --output {out} --group-size 0",
        "--model {base} --output {out} --algo bogus", "--model {base} --output {out} --calib {missing}",
        "--model {base} --output {out} --calib {file}", "--model {base} --output {out} --seq-len 0",
        "--model {base} --output {out} --num-samples -1", "--model {base} --output {out} --percdamp nan",
        "--model {base} --output {out} --seed -1", "--model {huge_layers} --output {out}",
    ],
    "eval": [
        "--model {base} --reference {base}", "--model {missing} --reference {base} --data {text}",
        "--model {base} --reference {base} --data {missing}",
        "--model {base} --reference {base} --data {text} --seq-len 1",
        "--model {empty} --reference {base} --data {text}", "--model {adapter} --reference {base} --data {text}",
        "--model {base} --reference {base} --data {text} --reference-adapter {missing}",
        "--model {base} --reference {ir} --tasks tang_couplet --tasks-dir {missing}",
        "--model {base} --reference {base} --data {text} --json {base}/m.json",
        "--model {base} --reference {base} --data {text} --num-samples " + HUGE,
        "--model {base} --reference {base} --data {bad_json}",
    ],
    "export": [
        "--model {missing} --output {out}", "--model {base} --output {out}", "--model {ir} --output {out}",
        "--model {gptq} --output {out} --format onnx", "--model {gptq} --output {out} --lm-head-group-size 4",
        "--model {gptq} --output {out} --embeddings int2", "--model {gptq} --output {out} --base-model-id 'no id'",
        "--model {gptq} --output {gptq}/ir", "--model {gptq_huge} --output {out}",
        "--model {gptq_huge} --output {out} --format gguf",
    ],
    "bench": [
        "", "--candidate noequals", "--candidate x=nokind:{base}", "--candidate x=torch:{missing} -p 0",
        "--candidate x=torch:{base} -t 0", "--candidate x=torch:{base} --candidate x=torch:{base}",
        "--candidate x=torch:{base} --plot {tmp}/p.exe", "--candidate x=torch:{base},dtype=int3",
        "--candidate x=ov:{ir},cache_size=abc", "--candidate x=ov:{ir},lora_mode=dynamic",
        "--candidate x=ov+lora:{ir}", "--candidate x=torch:{base} --results {base}",
    ],
    "tune": [
        "--model {missing}", "--model {base}", "--model {ir} --axes kv,bogus", "--model {ir} --budget soon",
        "--model {ir} --min-prefill-ratio 2", "--model {ir} -t 0", "--model {ir} --results {ir}",
    ],
    "chat": [
        "--model {missing} --prompt x", "--model {base} --prompt x --temperature nan",
        "--model {base} --prompt x --top-p 0", "--model {base} --prompt x --max-new-tokens 0",
        "--model {base} --prompt x --adapter {missing}", "--model {adapter} --prompt x",
        "--model {base} --prompt x --seed " + HUGE, "--model {base} --prompt x --recipe {nan_recipe}",
        "--model {ir} --prompt x --adapter {adapter}",
    ],
    "serve": [
        "--model {base} --port 70000", "--model {ir} --host 0.0.0.0", "--model {missing}",
        "--model {ir} --adapter nodir", "--model {ir} --replicas 2", "--model {ir} --ov-config lower=1",
        "--model {ir} --timeout 0", "--model {base}", "--model {ir} --ray-public-head",
    ],
    "ovms-repo": [
        "--model {base} --output {out}", "--model 'bad name={ir}' --output {out}",
        "--model a={ir} --model a={ir} --output {out}", "--model config.json={ir} --output {out}",
        "--model {ir} --adapter a={adapter} --output {out}", "--model {ir} --output {out} --max-num-seqs 0",
        "--model {ir} --output {out} --ov-config KV_CACHE_PRECISION=banana", "--model {ir} --output {ir}/repo",
    ],
    "run": ["{missing}", "{unknown_key}", "{list_yaml}", "{pipeline_missing_base}"],
    "demo": ["--workdir {out} --max-new-tokens 0", "--workdir {file}/w --no-bench"],
    "clean": ["{missing}", "{file}"],
    "check-template": ["{missing}", "{file}", "{base} --adapter {missing}", "{base} --adapter {file}"],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_model_dir, qv_adapter_dir) -> dict[str, str]:
    from _serve_fixtures import tiny_ir

    root = tmp_path_factory.mktemp("walk")
    p = {"base": tiny_model_dir, "adapter": qv_adapter_dir, "ir": tiny_ir(tmp_path_factory, tiny_model_dir),
         "gptq": make_rtn_gptq(tiny_model_dir, root / "gptq"), "missing": root / "missing",
         "out": root / "out", "tmp": root, "empty": root / "empty"}
    p["empty"].mkdir()
    files = {"file": "a file", "text": "床前明月光，疑是地上霜。\n" * 40, "bad_json": "[{\"text\": ",
             "unknown_key": "bogus_key: 1\n", "bad_yaml": "dtype: [unclosed\n", "list_yaml": "- a\n- b\n",
             "nan_recipe": "temperature: .nan\n",
             "pipeline_missing_base": f"base: {root / 'missing'}\nadapter: {qv_adapter_dir}\nworkdir: {root / 'w'}\n"}
    for name, text in files.items():
        p[name] = root / (f"{name}.json" if "json" in name else f"{name}.txt")
        p[name].write_text(text, encoding="utf-8")
    for name, items in (("poetry", [{"title": "靜夜思", "author": "李白",
                                     "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}]),
                        ("bad_corpus", "not json"), ("list_corpus", {"not": "a list"})):
        corpus = root / name / "全唐诗"
        corpus.mkdir(parents=True)
        (corpus / "poet.tang.0.json").write_text(items if isinstance(items, str) else json.dumps(items))
        p[name] = corpus.parent
    for name, change in (("bad_config", "{not json"), ("list_config", "[1, 2]")):
        p[name] = copy(tiny_model_dir, root / name)
        (p[name] / "config.json").write_text(change)
    p["huge_layers"] = copy(tiny_model_dir, root / "huge_layers")
    edit_json(p["huge_layers"] / "config.json", num_hidden_layers=10**9)
    p["gptq_huge"] = copy(p["gptq"], root / "gptq_huge")
    edit_json(p["gptq_huge"] / "config.json", num_hidden_layers=10**9)
    p["bad_adapter"] = copy(qv_adapter_dir, root / "bad_adapter")
    edit_json(p["bad_adapter"] / "adapter_config.json", r=-1)
    return {k: str(v) for k, v in p.items()}


def test_every_command_has_its_error_paths_walked():
    assert sorted(BAD) == sorted(name for name, _ in COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD))
def test_bad_input_is_exit_2_with_one_line_for_every_command(command, paths, capsys):
    import shlex

    wrong = []
    for template in BAD[command]:
        argv = [command] + shlex.split(template.format(**paths))
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        if code != 2 or "Traceback" in err or len(errors) != 1:
            wrong.append(f"{' '.join(argv)} -> exit {code}: {err.strip()[-300:]}")
    assert not wrong, "\n".join(wrong)
    assert not Path(paths["out"]).exists()
