"""`tangquant ovms-repo`: an OpenVINO Model Server repository, checked against golden files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _serve_fixtures import tiny_ir

from tangquant.cli import main
from tangquant.errors import InputError, OutputExistsError, ParameterError

GOLDEN = Path(__file__).parent / "golden" / "ovms"


@pytest.fixture(scope="module")
def ir(tmp_path_factory, tiny_model_dir):
    return tiny_ir(tmp_path_factory, tiny_model_dir)


def test_repository_matches_the_golden_files(ir, tmp_path, capsys):
    """The layout OVMS's exporter writes (config.json's model_config_list, graph.pbtxt per
    servable beside its IR), with the scheduler settings and the IR's CPU runtime options."""
    out = tmp_path / "repo"
    assert main(["ovms-repo", "--model", f"poet={ir}", "--model", str(ir) + "/", "--output",
                 str(out), "--max-num-seqs", "16", "--cache-size", "2",
                 "--max-num-batched-tokens", "512", "--enable-prefix-caching",
                 "--max-tokens-limit", "1000", "--ov-config", "INFERENCE_NUM_THREADS=2"]) == 0
    assert "ovms --rest_port 8000 --config_path" in capsys.readouterr().out
    assert (out / "config.json").read_text() == (GOLDEN / "config.json").read_text()
    for name in ("poet", "tiny-poet"):
        assert (out / name / "graph.pbtxt").read_text() == (GOLDEN / "graph.pbtxt").read_text()
        for f in ir.iterdir():  # the IR, unchanged, beside its graph
            assert (out / name / f.name).read_bytes() == f.read_bytes()
    defaults = tmp_path / "defaults"
    assert main(["ovms-repo", "--model", str(ir), "--output", str(defaults)]) == 0
    assert (defaults / "tiny-poet" / "graph.pbtxt").read_text() == \
        (GOLDEN / "graph_defaults.pbtxt").read_text()
    assert json.loads((defaults / "config.json").read_text()) == {
        "model_config_list": [{"config": {"name": "tiny-poet", "base_path": "tiny-poet"}}]}


def test_bad_repository_requests_are_refused(ir, tmp_path, capsys):
    from tangquant.ovms_repo import ovms_repo

    with pytest.raises(InputError, match="not an exported OpenVINO model"):
        ovms_repo([str(tmp_path)], tmp_path / "r1")
    with pytest.raises(InputError, match="two servables"):
        ovms_repo([str(ir), str(ir)], tmp_path / "r2")
    with pytest.raises(InputError, match="servable name"):
        ovms_repo([f"../up={ir}"], tmp_path / "r3")
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        ovms_repo([str(ir)], tmp_path / "taken")
    with pytest.raises(ParameterError):
        ovms_repo([str(ir)], tmp_path / "r4", max_num_seqs=0)
    # OVMS applies no LoRA to an LLM graph: an adapter is refused with the way to do it.
    assert main(["ovms-repo", "--model", str(ir), "--adapter", "tang=x", "--output",
                 str(tmp_path / "r5")]) == 2
    assert "merge the adapter" in capsys.readouterr().err
    assert not (tmp_path / "r5").exists()
