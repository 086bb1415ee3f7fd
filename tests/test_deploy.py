"""The deployment file (tangquant.deploy.json): tune's choice of engine, and what reads it."""

from __future__ import annotations

import json

import pytest

from tangquant import deploy
from tangquant.errors import InputError


def _write(root, workloads, use="pp32+tg256", version=1):
    root.mkdir(parents=True, exist_ok=True)
    (root / deploy.FILE).write_text(json.dumps({"version": version, "use": use, "workloads": workloads}))
    return root


@pytest.fixture
def models(tmp_path):
    (tmp_path / "ir").mkdir()
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.gguf").write_bytes(b"GGUF")
    return tmp_path


@pytest.mark.fast
def test_round_trip_relative_paths(models):
    root = models / "poet"
    root.mkdir()
    data = {"use": "pp32+tg256", "workloads": {
        "pp512+tg128": deploy.entry(root, "ov", models / "ir", {"KV_CACHE_PRECISION": "u8"}, 2, request_s=1.0),
        "pp32+tg256": deploy.entry(root, "llamacpp", models / "gguf" / "m.gguf", {"ctk": "q8_0", "fa": "on"}, 2)}}
    written = deploy.write(root, data)
    assert json.loads(written.read_text())["workloads"]["pp32+tg256"]["model"] == "../gguf/m.gguf"
    d = deploy.read(root)
    assert d.chosen.engine == "llamacpp" and d.chosen.model == (models / "gguf" / "m.gguf").resolve()
    assert d.chosen.options == {"ctk": "q8_0", "fa": "on"} and d.chosen.threads == 2
    assert d.choices["pp512+tg128"].engine == "ov"
    with pytest.raises(Exception, match="already exists"):
        deploy.write(root, data)  # never clobbered without force


@pytest.mark.fast
@pytest.mark.parametrize("change,message", [
    ({"engine": "vllm"}, "unknown kind 'vllm'"),
    ({"options": {"ctk": "q3_k"}}, "option ctk='q3_k'"),
    ({"options": {"n_gpu_layers": "9"}}, "takes no option 'n_gpu_layers'"),
    ({"model": "../nowhere.gguf"}, "does not exist"),
    ({"model": "/etc/passwd"}, "relative to the deployment"),
    ({"threads": 0}, "threads must be a positive integer")])
def test_bad_files_are_one_line(models, change, message):
    good = {"engine": "llamacpp", "model": "../gguf/m.gguf", "options": {}, "threads": 1}
    root = _write(models / "poet", {"pp32+tg256": {**good, **change}})
    with pytest.raises(InputError, match=message) as err:
        deploy.read(root)
    assert "\n" not in str(err.value) and str(root) in str(err.value)


@pytest.mark.fast
def test_use_and_version_are_checked(models):
    good = {"engine": "llamacpp", "model": "../gguf/m.gguf"}
    with pytest.raises(InputError, match="'use' must name"):
        deploy.read(_write(models / "a", {"pp512+tg128": good}))
    with pytest.raises(InputError, match="version-1"):
        deploy.read(_write(models / "b", {"pp32+tg256": good}, version=2))
    with pytest.raises(InputError, match="a model directory"):
        (models / "ir" / "config.json").write_text("{}")
        deploy.check_directory(models / "ir")
