"""`tangquant run RECIPE`: stages in order, up-to-date stages skipped, stale ones never silently replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tree_digest
from tangquant.cli import main
from tangquant.errors import OutputExistsError, RecipeError
from tangquant.pipeline import load_recipe, run_pipeline

ROOT = Path(__file__).resolve().parent.parent


def write_recipe(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def recipe(tmp_path, tiny_model_dir, qv_adapter_dir):
    # RTN: the fastest real quantizer; the skipping logic is the same for GPTQ.
    return write_recipe(tmp_path / "pipe.yaml", base=str(tiny_model_dir), adapter=str(qv_adapter_dir),
                        workdir=str(tmp_path / "work"), merge_dtype="fp32",
                        quant_recipe=str(ROOT / "recipes" / "int4-rtn-g128.yaml"), bench=False)


def test_stages_run_then_skip(recipe, tmp_path):
    work = tmp_path / "work"
    assert run_pipeline(recipe)["stages"] == {"merge": "ran", "quantize": "ran", "export": "ran"}
    for sub, stage in (("merged", "merge"), ("int4-gptq", "quantize"), ("int4-openvino", "export")):
        assert json.loads((work / sub / "tangquant.json").read_text())["stage"] == stage
    assert (work / "int4-openvino" / "openvino_model.xml").is_file()
    digest = tree_digest(work)
    # Second run: every manifest matches its inputs, nothing is rebuilt or touched.
    assert main(["run", str(recipe)]) == 0
    assert run_pipeline(recipe)["stages"] == {"merge": "skipped", "quantize": "skipped", "export": "skipped"}
    assert tree_digest(work) == digest
    # Another merge setting: merge and everything after it are stale; kept without --force.
    assert run_pipeline(recipe, dry_run=True, merge_dtype="fp16")["stages"] == {
        "merge": "planned", "quantize": "planned", "export": "planned"}
    with pytest.raises(OutputExistsError):
        run_pipeline(recipe, merge_dtype="fp16")
    assert tree_digest(work) == digest
    # A stage output edited by hand no longer matches its recorded manifest.
    manifest = work / "int4-openvino" / "tangquant.json"
    manifest.write_text(manifest.read_text().replace('"export"', '"exported"', 1))
    assert run_pipeline(recipe, dry_run=True)["stages"]["export"] == "planned"


def test_recipe_errors(tmp_path, tiny_model_dir):
    bad = write_recipe(tmp_path / "bad.yaml", base=str(tiny_model_dir), workdir="w", colour="red")
    with pytest.raises(RecipeError, match="colour"):
        load_recipe(bad)
    partial = write_recipe(tmp_path / "partial.yaml", base=str(tiny_model_dir), workdir="w")
    with pytest.raises(RecipeError, match="adapter"):
        load_recipe(partial)
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.fast
def test_shipped_recipes_load():
    r = load_recipe(ROOT / "recipes" / "qwen1.5-7b-chat-tang.yaml")
    assert r.quant_recipe.endswith("int4-gptq-g128.yaml") and r.export_format == "openvino" and r.bench
    import yaml

    lf = yaml.safe_load((ROOT / "recipes" / "llamafactory-qwen1.5-7b-chat-tang-lora.yaml").read_text())
    assert (lf["lora_target"], lf["lora_rank"], lf["lora_alpha"], lf["lora_dropout"]) == ("q_proj,v_proj", 8, 16, 0.0)
    assert lf["dataset"] == "tang" and lf["cutoff_len"] == 1024 and lf["learning_rate"] == 0.0001
    assert lf["num_train_epochs"] == 3.0 and lf["lr_scheduler_type"] == "cosine" and lf["fp16"] is True
