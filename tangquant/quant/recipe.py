"""The quantization recipe: every parameter of ``tangquant quantize``, declared once.

Field names are Intel neural-compressor's own (``bits``, ``group_size``,
``use_sym``, ``act_order``, ``percdamp``, ``block_size``, ``true_sequential``,
``iters``) so a recipe reads like an INC config; the flags derive from them.
INC's defaults (group 32, block 2048) differ from Qwen's published GPTQ-Int4
(group 128, symmetric, desc_act false), so recipes set them explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from tangquant.card import check_base_model_id
from tangquant.errors import QuantizationError
from tangquant.recipe import param, require

BUILTIN_SAMPLES = 16  # samples drawn from the built-in poems when no --calib is given
COMPUTE_DTYPES = ("fp32", "bf16")  # the layer driver's calibration forwards


@dataclass(frozen=True)
class Algorithm:
    """One quantization algorithm, declared once: what it needs, what it can do, who runs it.

    Entry points are ``"module:function"`` strings (imported when a stage runs, so the recipe stays
    torch-free): ``config`` builds its INC config, ``runner`` quantizes a whole model and writes the
    GPTQ layout (``(model_dir, out_dir, recipe, samples, fmt) -> counts``)."""

    name: str
    label: str
    needs_calib: bool
    runner: str
    config: str | None = None
    bits: tuple[int, ...] = (2, 4, 8)
    layer_wise: bool = False     # --layer-wise capable (tangquant's layer-by-layer driver)
    sequential: bool = False     # true-sequential groups of linears (GPTQ's --true-sequential)
    act_order: bool = False      # takes --act-order
    asymmetric: bool = True      # can write an asymmetric zero point
    example_inputs: bool = False  # INC's prepare needs an example batch (AWQ traces one)
    driver: str = "INC whole model"


_INC = "tangquant.quant.inc:run_whole_model"
ALGORITHMS = {a.name: a for a in (
    Algorithm("gptq", "GPTQ", True, _INC, "tangquant.quant.inc:gptq_config", layer_wise=True,
              sequential=True, act_order=True),
    Algorithm("rtn", "RTN", False, _INC, "tangquant.quant.inc:rtn_config", layer_wise=True),
    Algorithm("awq", "AWQ", True, _INC, "tangquant.quant.inc:awq_config", example_inputs=True),
    # AutoGPTQ v1, which auto-round writes, cannot hold an asymmetric zero point of 0.
    Algorithm("autoround", "AutoRound", True, "tangquant.quant.autoround:run_autoround",
              asymmetric=False, driver="auto-round (through INC)"),
)}
ALGOS = tuple(ALGORITHMS)


@dataclass(frozen=True)
class QuantRecipe:
    algo: str = param("gptq", "algorithm", choices=ALGOS)
    bits: int = param(4, "bits per weight")
    group_size: int = param(128, "inputs per scale group (-1: per channel)")
    use_sym: bool = param(True, "symmetric quantization (recipe key use_sym, INC's name; sym accepted)",
                          flag="--sym", negative="--asym", alias="sym")
    act_order: bool = param(False, "GPTQ act-order (desc_act)")
    percdamp: float = param(0.01, "GPTQ Hessian dampening")
    block_size: int = param(128, "GPTQ block size")
    true_sequential: bool = param(True, "GPTQ: calibrate each group of linears (q/k/v, o, gate/up, "
                                  "down) with the earlier groups already quantized (Qwen's setting; "
                                  "it runs layer by layer)")
    iters: int = param(200, "AutoRound: tuning steps per block")
    calib: str | None = param(None, "calibration data (alpaca/ShareGPT/chinese-poetry JSON, JSONL, "
                              ".txt); GPTQ/AWQ fall back to built-in poems without it")
    num_samples: int = param(128, "calibration samples")
    seq_len: int = param(512, "tokens per calibration sample")
    seed: int = param(42, "seed for shuffling and splitting")
    layer_wise: bool = param(False, "bounded memory: quantize and write one decoder layer at a time "
                             "(gptq, rtn)")
    compute_dtype: str = param("fp32", "the layer-by-layer driver's calibration: bf16 runs the forwards' "
                               "matmuls in bfloat16 (autocast; AMX or AVX512-BF16 where the CPU has them), as GPU "
                               "GPTQ runs in fp16, and the Hessians' XᵀX from bf16 products with fp32 sums (on AMX); "
                               "weights, GPTQ's solve and the fidelity report stay fp32",
                               choices=COMPUTE_DTYPES)
    eval_data: str | None = param(None, "held-out data for the fidelity report (default: every 10th "
                                  "document of --calib, not used for calibration)")
    eval_samples: int = param(8, "fidelity samples (0 skips)")
    base_model_id: str | None = param(None, "Hub id of the base for the model card's base_model (e.g. "
                                      "Qwen/Qwen1.5-7B-Chat); default: the one the input's card names",
                                      metavar="ORG/NAME")

    def __post_init__(self):
        require(self.algo in ALGOS, f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGOS)}")
        a = self.algorithm
        require(self.bits in a.bits, f"{self.algo} supports {a.bits} bits, not {self.bits}")
        require(self.group_size == -1 or self.group_size >= 1,
                f"group size must be positive or -1, got {self.group_size}")
        require(0 < self.percdamp < 1, f"percdamp must be in (0, 1), got {self.percdamp}")
        require(not self.act_order or a.act_order, "--act-order is a GPTQ option")
        require(self.num_samples >= 1 and self.seq_len >= 2 and self.block_size >= 1,
                "num_samples and block_size must be positive and seq_len at least 2")
        require(self.eval_samples >= 0, f"eval_samples must be >= 0, got {self.eval_samples}")
        require(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        layer_wise = [n for n, x in ALGORITHMS.items() if x.layer_wise]
        require(not self.layer_wise or a.layer_wise,
                f"--layer-wise works with {' and '.join(layer_wise)}, not with {self.algo}")
        require(a.asymmetric or self.use_sym,
                f"--algo {self.algo} writes AutoGPTQ v1, which cannot hold an asymmetric zero point of 0; "
                "use --sym")
        require(self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of "
                f"{', '.join(COMPUTE_DTYPES)}, not {self.compute_dtype!r}")
        require(self.compute_dtype == "fp32" or (self.layer_by_layer and a.needs_calib),
                "--compute-dtype bf16 is for calibrated algorithms run layer by layer (gptq)")
        check_base_model_id(self.base_model_id)

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.algo]
    @property
    def format_version(self) -> int:
        """AutoGPTQ v1 stores zero points minus one, so it cannot hold 0: asymmetric needs v2."""
        return 1 if self.use_sym else 2

    @property
    def layer_by_layer(self) -> bool:
        """Whether tangquant's layer-by-layer driver runs INC (else INC runs on the whole model).

        Besides --layer-wise, true-sequential GPTQ always goes layer by layer: INC 3.10's
        whole-model true_sequential feeds each group of linears the block's output for the
        previous group instead of the block's input.
        """
        return self.layer_wise or (self.algorithm.sequential and self.true_sequential)

    @property
    def driver(self) -> str:
        return "tangquant layer by layer" if self.layer_by_layer else self.algorithm.driver


def quantization_metadata(r: QuantRecipe) -> dict:
    """What ``config.json``'s quantization_config records beyond the GPTQ layout: whether the
    calibration was true-sequential (an algorithm without sequential groups never is) and who
    computed the integers."""
    meta = {"true_sequential": r.true_sequential if r.algorithm.sequential else False,
            "quantizer": f"intel-neural-compressor {r.algo}"}
    if r.compute_dtype != "fp32":
        meta["calibration_dtype"] = r.compute_dtype
    return meta


def check_model(r: QuantRecipe, config: dict) -> None:
    """Refuse settings the model's layer sizes or context cannot take."""
    inputs = {"hidden_size": config.get("hidden_size"), "intermediate_size": config.get("intermediate_size")}
    if r.group_size != -1:
        bad = {k: v for k, v in inputs.items() if isinstance(v, int) and v % r.group_size}
        if bad:
            raise QuantizationError(f"group size {r.group_size} does not divide the layers' input size "
                                    + ", ".join(f"{k}={v}" for k, v in bad.items()))
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and r.seq_len > max_pos:
        raise QuantizationError(f"--seq-len {r.seq_len} is longer than the model's context ({max_pos})")
