"""The package's shared pieces: CLI contract, safe outputs, recipes, the GPTQ layout."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tangquant.cli import main
from tangquant.errors import OutputExistsError, RecipeError
from tangquant.files import atomic_output_dir, check_output


@pytest.mark.fast
def test_help_and_version_do_not_import_torch():
    heavy = ("torch", "transformers", "neural_compressor", "openvino", "openvino_genai", "nncf", "numpy")
    code = ("import sys; from tangquant.cli import main; rc = main(['--help']); "
            f"bad = [m for m in {heavy!r} if m in sys.modules]; "
            "assert not bad, f'--help imported {bad}'; "
            "import tangquant.cli as c; c.main(['--version'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "merge" in out.stdout and "quantize" in out.stdout
    assert "tangquant 0." in out.stdout


@pytest.mark.fast
def test_every_command_has_help():
    from tangquant.cli import COMMANDS

    for name, _ in COMMANDS:
        assert main([name, "--help"]) == 0


@pytest.mark.fast
def test_library_error_is_one_line_exit_2(capsys, tmp_path):
    rc = main(["merge", "--model", str(tmp_path / "nope"), "--adapter", str(tmp_path / "nope2"),
               "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tangquant: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


@pytest.mark.fast
def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out) as tmp:
            (tmp / "partial").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_atomic_output_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "new").write_text("new")
            raise RuntimeError("boom")
    assert (out / "old").read_text() == "old"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new"]


@pytest.mark.fast
def test_check_output_refuses_overlap_and_existing(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    with pytest.raises(OutputExistsError, match="same as or inside"):
        check_output(src, [src], force=True)
    with pytest.raises(OutputExistsError, match="same as or inside"):
        check_output(src / "sub", [src], force=True)
    with pytest.raises(OutputExistsError, match="contains the input"):
        check_output(tmp_path, [src], force=True)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        check_output(other, [src], force=False)
    assert check_output(other, [src], force=True) == other.resolve()


@dataclasses.dataclass(frozen=True)
class _Recipe:
    bits: int = 4
    percdamp: float = 0.01
    use_sym: bool = True
    name: str | None = None


@pytest.mark.fast
def test_recipe_rejects_unknown_keys_and_wrong_types(tmp_path):
    from tangquant import recipe

    p = tmp_path / "r.yaml"
    p.write_text("bits: 4\npercdamp: 0.02\nuse_sym: false\n")
    r = recipe.resolve(_Recipe, p, {"bits": 8, "name": None})
    assert r == _Recipe(bits=8, percdamp=0.02, use_sym=False)
    p.write_text("bits: 4\ngroupsize: 128\n")
    with pytest.raises(RecipeError, match="unknown key.*groupsize"):
        recipe.resolve(_Recipe, p)
    p.write_text("percdamp: 1e-2\n")  # YAML 1.1 reads this as a string
    with pytest.raises(RecipeError, match="0.01"):
        recipe.resolve(_Recipe, p)
    recipe.save(r, tmp_path / "resolved.yaml")
    assert recipe.resolve(_Recipe, tmp_path / "resolved.yaml") == r


# 4 and 8 bits unpack through the words' bytes, 2 bits through shifts; one group of 256 gives
# qzeros a size-1 dimension (whose stride torch leaves free).
@pytest.mark.fast
@pytest.mark.parametrize("bits,sym,fmt,group", [(4, True, 1, 128), (4, False, 2, 128), (8, True, 1, 128),
                                                (2, False, 2, 128), (4, False, 2, 256), (8, True, 1, 256)])
def test_gptq_pack_roundtrip(bits, sym, fmt, group):
    import torch

    from tangquant.gptq import pack_layer, unpack_layer

    out_f, in_f = 64, 256
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    zeros = (torch.full((in_f // group, out_f), 2 ** (bits - 1)) if sym
             else torch.randint(0, 2**bits, (in_f // group, out_f), generator=g))
    scales = torch.rand(in_f // group, out_f, generator=g).half()
    g_idx = torch.arange(in_f) // group
    t = pack_layer(q, zeros, scales, g_idx, bits, format_version=fmt)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (in_f * bits // 32, out_f)
    assert t["qzeros"].shape == (in_f // group, out_f * bits // 32)
    back = unpack_layer(t, bits, fmt)
    assert torch.equal(back.q.long(), q)
    assert torch.equal(back.zeros.long(), zeros)
    w = back.dequantize()
    ref = (q.float() - zeros.float().repeat_interleave(group, 0).t()) * scales.float().repeat_interleave(group, 0).t()
    assert torch.equal(w, ref)


@pytest.mark.fast
def test_gptq_v1_symmetric_zero_is_stored_as_seven():
    """Qwen's GPTQ-Int4 releases store zero 8 as 7 (0x77777777)."""
    import torch

    from tangquant.gptq import pack_layer

    t = pack_layer(torch.zeros(8, 128, dtype=torch.long), torch.full((1, 8), 8), torch.ones(1, 8),
                   torch.zeros(128, dtype=torch.long), 4)
    assert int(t["qzeros"][0, 0]) == 0x77777777


def test_sigterm_leaves_no_partial_output(tmp_path):
    """A killed run (SIGTERM, as from `timeout` or a scheduler) cleans up its temporary output."""
    import signal

    code = (
        "import sys, time\n"
        "from tangquant import cli, files\n"
        "cli._interrupt_on_sigterm()\n"
        "try:\n"
        f"    with files.atomic_output_dir(__import__('pathlib').Path({str(tmp_path / 'out')!r})) as t:\n"
        "        (t / 'partial').write_text('x'); print('ready', flush=True); time.sleep(30)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_final_name_of_a_temporary_output(tmp_path):
    from tangquant.files import final_name

    with atomic_output_dir(tmp_path / "int4-gptq") as tmp:
        assert final_name(tmp) == "int4-gptq"
        assert final_name(tmp / "openvino") == "openvino"


@pytest.mark.fast
def test_every_stage_parameter_is_a_flag_and_a_recipe_key(tmp_path):
    """Each stage declares its parameters once: every field is a flag and a recipe key."""
    import importlib

    import yaml

    from tangquant import recipe
    from tangquant.cli import COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, module_name in COMMANDS:
        cls = importlib.import_module(module_name).PARAMS
        options = {opt: a for a in sub.choices[name]._actions for opt in a.option_strings}
        for f in dataclasses.fields(cls):
            flag = recipe.flag_name(f)
            assert flag in options and options[flag].dest == f.name, (name, f.name)
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            path = tmp_path / f"{name}-{f.name}.yaml"
            path.write_text(yaml.safe_dump({f.name: default}))
            assert getattr(recipe.resolve(cls, path), f.name) == f.default, (name, f.name)
        with pytest.raises(RecipeError, match="unknown key.*no_such_key"):
            recipe.resolve(cls, {"no_such_key": 1})


@pytest.mark.fast
def test_flags_override_the_recipe_and_bad_values_are_parameter_errors(tmp_path, capsys):
    from tangquant.errors import ParameterError
    from tangquant.merge import MergeParams

    path = tmp_path / "merge.yaml"
    path.write_text("dtype: fp16\nverify: 2\n")
    args = build_args(["merge", "--model", "m", "--adapter", "a", "--output", "o", "--recipe", str(path),
                       "--verify", "3"])
    from tangquant import recipe

    assert recipe.from_args(MergeParams, args) == MergeParams(dtype="fp16", verify=3)
    with pytest.raises(ParameterError, match="verify"):
        MergeParams(verify=-1)
    # The same kind of bad value is the same error, whichever stage it reaches, before any work.
    import importlib

    from tangquant.cli import COMMANDS

    modules = dict(COMMANDS)
    for argv in (["merge", "--model", "m", "--adapter", "a", "--output", "o", "--verify", "-1"],
                 ["quantize", "--model", "m", "--output", "o", "--num-samples", "0"],
                 ["eval", "--model", "m", "--reference", "r", "--data", "d", "--num-samples", "0"],
                 ["bench", "--candidate", "x=ov:/x", "-r", "0"],
                 ["chat", "--model", "m", "--top-p", "0"],
                 ["serve", "--model", "m", "--queue-size", "-1"],
                 ["demo", "--max-new-tokens", "0"],
                 ["data", "--poetry", "p", "--output", "o", "--eval-fraction", "1.5"]):
        cls = importlib.import_module(modules[argv[0]]).PARAMS
        with pytest.raises(ParameterError):
            recipe.from_args(cls, build_args(argv))
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith("tangquant: error: "), argv


def build_args(argv):
    from tangquant.cli import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.fast
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "float8_e4m3fn"])
def test_the_finite_check_finds_one_nan_or_infinity_in_any_float_type(dtype):
    """The one finite check of every reader and writer (a reduction, not isfinite's temporaries) still
    finds a single NaN, +Inf or -Inf anywhere, and counts it; float8 takes the long way."""
    import math

    import torch

    from tangquant.checkpoint import require_finite
    from tangquant.errors import NumericalError

    clean = (torch.randn(37, 129) * 0.1).to(getattr(torch, dtype))
    require_finite(clean, "w", "here")
    for value in (math.nan, math.inf, -math.inf):
        if dtype == "float8_e4m3fn" and math.isinf(value):
            continue  # e4m3fn has no infinity: it saturates
        bad = clean.clone()
        bad.view(-1)[4000] = value
        with pytest.raises(NumericalError, match="holds 1 NaN or Inf"):
            require_finite(bad, "w", "here")
