"""GPTQ on one decoder layer: INC's GPTQ core, the block run only up to each group's input.

The layer-by-layer driver used to call INC's ``prepare``/``convert`` once per group of linears
(true-sequential: q/k/v, o, gate/up, down). Each such call makes ``RAWGPTQuantizer`` capture the
block's inputs, run the *whole* block on every sample to collect the Hessians, then run it on every
sample once more to replace its cached inputs by the block's outputs (its step 2.5), which the
driver throws away. That is about nine block forwards per sample per layer where GPTQ needs one
partial forward per group: a profile of the default run on the demo poet put 73% of the time in
those two forwards.

Here each group runs the samples through the block only until the group's input exists (a hook
stops the forward before the group's first linear: the linears of a true-sequential group read one
tensor, so one Hessian serves them all, and GPTQ needs no product of theirs); once o_proj is
quantized, the later groups replay the attention from the input the o group captured (``_Replay``)
instead of running q/k/v and the attention again. INC's own ``GPTQ`` object holds the Hessian
(fed by ``quant/calibration``: INC's ``add_batch`` arithmetic, or bf16 products with ``--compute-dtype bf16``),
``quant/fasterquant`` runs INC's ``fasterquant`` arithmetic (a group's linears stacked: one Hessian
inverse, one column walk), and INC's ``INCWeightOnlyLinear`` packs the integers exactly as INC's
``convert`` does (its step 2.6) and stands in for the linear in the later groups' forwards. The
integers are INC's, bit for bit (tested against INC's whole-model run).
"""

from __future__ import annotations

import torch
from neural_compressor.torch.algorithms.weight_only.gptq import GPTQ
from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
from neural_compressor.torch.algorithms.weight_only.utility import quant_weight_w_scale

from tangquant.quant.calibration import Feed, calibration_autocast
from tangquant.quant.clock import untimed
from tangquant.quant.fasterquant import fasterquant, supported


class _GroupDone(Exception):
    """Raised by a hook once every linear of the group has seen its input: the rest of the
    block's forward would compute nothing GPTQ uses."""


def layer_config(config) -> dict:
    """INC's per-layer GPTQ settings from a ``GPTQConfig``, built the way INC's ``gptq_entry``
    and ``RAWGPTQuantizer.check_layer_config`` build them."""
    return {"dtype": config.dtype, "bits": config.bits, "sym": config.use_sym,
            "group_size": config.group_size, "mse": config.use_mse_search,
            "use_double_quant": config.use_double_quant, "double_quant_dtype": config.double_quant_dtype,
            "double_quant_bits": config.double_quant_bits, "double_quant_sym": config.double_quant_use_sym,
            "double_quant_group_size": config.double_quant_group_size, "act_order": config.act_order,
            "hybrid_order": config.hybrid_order, "fp8_aware": config.fp8_aware,
            "percdamp": config.percdamp, "block_size": config.block_size,
            "static_groups": config.static_groups, "true_sequential": False, "perchannel": True}


def _hessians(block, group: list[str], hidden: list, kwargs_for, cfg: dict, shared: bool,
              replays: list, keep: list | None = None, bf16: bool = False, timed=None) -> dict:
    """{linear name: INC GPTQ object holding its Hessian} from one partial forward per sample.

    ``shared``: every linear of the group reads the same tensor (a true-sequential group), so one
    Hessian serves them all and the forward stops *before* the group's first linear: GPTQ's
    Hessian needs the inputs only, and their products are what the earlier passes wasted.
    ``keep`` collects the group's input of every sample (for a ``_Replay``); ``replays`` are told
    which sample is running. ``bf16``: the forwards under a bf16 autocast, the Hessians fed by
    ``calibration.Feed``'s bf16 products. ``timed(phase)`` clocks the Hessian updates ("hessians")."""
    gptqs = {name: _gptq(block.get_submodule(name), cfg) for name in (group[:1] if shared else group)}
    seen: set[str] = set()
    feed = Feed(bf16, timed or untimed)

    def before(_module, args):
        feed(gptqs[group[0]], args[0].data)
        if keep is not None:
            keep.append(args[0].data)
        raise _GroupDone

    def after(name):
        def collect(_module, inp, out):
            feed(gptqs[name], inp[0].data)
            seen.add(name)
            if len(seen) == len(group):
                raise _GroupDone
        return collect

    handles = ([block.get_submodule(group[0]).register_forward_pre_hook(before)] if shared else
               [block.get_submodule(n).register_forward_hook(after(n)) for n in group])
    try:
        with calibration_autocast(bf16):
            for i, h in enumerate(hidden):
                for replay in replays:
                    replay.index = i
                seen.clear()
                try:
                    block(h, **kwargs_for(h))
                except _GroupDone:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    feed.flush()
    return gptqs


def _gptq(linear, cfg: dict, like=None):
    """INC's GPTQ object for ``linear``; ``like``: one whose Hessian it gets a copy of."""
    gptq = GPTQ(linear, linear.weight.data, "cpu")
    gptq.quantizer.configure(cfg)
    if like is not None:
        gptq.H, gptq.nsamples = like.H.clone(), like.nsamples
    return gptq


def _solve(linears: list, gptqs: list, cfg: dict) -> list:
    """[(scale, zero, Q dequantized, perm)] per linear. ``gptqs``: one INC GPTQ object per linear,
    or one for all (a shared Hessian). tangquant's ``fasterquant`` (INC's arithmetic, bit for bit)
    where it applies, the shared group's rows stacked into one call; INC's own otherwise."""
    kw = {"blocksize": cfg["block_size"], "percdamp": cfg["percdamp"], "groupsize": cfg["group_size"]}
    if supported(cfg):
        if len(gptqs) == 1 and len(linears) > 1:
            sizes = [lin.out_features for lin in linears]
            scale, zero, q = fasterquant(gptqs[0], torch.cat([lin.weight.data for lin in linears]), **kw)
            return list(zip(scale.split(sizes), zero.split(sizes), q.split(sizes), [None] * len(sizes)))
        return [(*fasterquant(g, lin.weight.data.clone(), **kw), None) for lin, g in zip(linears, gptqs)]
    if len(gptqs) == 1:  # INC's fasterquant edits its H in place: each linear gets its own copy
        gptqs = [gptqs[0]] + [_gptq(lin, cfg, like=gptqs[0]) for lin in linears[1:]]
    out = []
    for lin, g in zip(linears, gptqs):
        scale, _, zero, q = g.fasterquant(
            lin.weight.data.clone(), act_order=cfg["act_order"], hybrid_order=cfg["hybrid_order"],
            fp8_aware=cfg["fp8_aware"], static_groups=cfg["static_groups"], **kw)
        out.append((scale, zero, q, g.perm if cfg["act_order"] else None))
        g.free()
    return out


def _packed(linear, scale, zero, q, perm, cfg: dict, runs_again: bool = True):
    """A solved linear as INC's ``INCWeightOnlyLinear`` (INC's step 2.6), and its unpacked parts;
    ``runs_again``: a later group's forward runs it, so it gets its fp32 weight now. Plain groups
    skip INC's packing of the integers (``_stored``); act-order, INC's own solve, keeps it."""
    zero = None if cfg["sym"] else zero.cpu()
    scale = scale.cpu()
    if perm is not None:
        q.copy_(q[:, perm])
    q = quant_weight_w_scale(q, scale, None, zero, cfg["group_size"], dtype=cfg["dtype"])
    if perm is not None:
        q.copy_(q[:, torch.argsort(perm)])
    module = INCWeightOnlyLinear(linear.in_features, linear.out_features, dtype=cfg["dtype"],
                                 bits=cfg["bits"], group_size=cfg["group_size"], zp=zero is not None,
                                 bias=linear.bias is not None, g_idx=perm is not None, device="cpu")
    zeros = None if zero is None else zero.round().to(torch.int64)  # before pack: it edits zero in place
    if perm is None:
        _stored(module, scale, linear.bias)
    else:
        module.pack(q.type(torch.int32), scale, zero, linear.bias, scale_bf16_to_fp8=None, g_idx=perm)
    parts = _unpacked(module, q, zeros, cfg)
    if runs_again:
        _recovered(module, parts)
    return module, parts


def _stored(module, scale, bias) -> None:
    """What INC's ``pack`` leaves in a module that tangquant reads (the scales in fp16 as [groups,
    out], the bias in fp16), without its bit-packing of the integers: a single-threaded walk over
    every weight whose ``qweight`` nothing here reads (the writer packs ``_unpacked``'s integers
    itself, the later groups' forwards use ``_recovered``'s weight). ``qweight`` and ``qzeros`` go,
    so that nothing can read them unset."""
    module.scales = scale.to(module.float_type).t().contiguous()
    if bias is not None:
        module.bias = bias.to(module.float_type)
    del module.qweight, module.qzeros


def _unpacked(module, q, zeros, cfg: dict) -> dict:
    """What ``writer.extract_layer`` reads back through INC's ``unpack()`` (a numpy walk over the
    packed columns), from the integers at hand: the unsigned integers (INC shifts a symmetric
    layer's by 2^(bits-1) and stores that as its zero point), zero points and fp16 scales
    [groups, out], each column's group."""
    half = 2 ** (cfg["bits"] - 1)
    if zeros is None:
        q = q + half
        zeros = torch.full(module.scales.shape, half, dtype=torch.int64)
    else:
        zeros = zeros.t().contiguous()
    g_idx = (module.g_idx.to(torch.int64) if module.g_idx is not None
             else torch.arange(module.in_features, dtype=torch.int64) // cfg["group_size"])
    # uint8 until written: a 7B layer's integers as int64 are 1.6 GB (extract_layer widens them one linear at a time)
    return {"q": q.to(torch.uint8), "zeros": zeros, "scales": module.scales.contiguous(), "g_idx": g_idx}


def _recovered(module, parts: dict) -> None:
    """Give INC's module the fp32 weight its first forward would recover (INC's ``recover`` walks
    the columns one by one): ((q - zero) as int8) x fp16 scale, in fp16, then fp32; the bias to
    fp32 as that forward does."""
    q, zeros = parts["q"].to(torch.int16), parts["zeros"].t().to(torch.int16)
    scales, g = parts["scales"].t(), parts["g_idx"]
    out, columns = q.shape
    size = columns // zeros.shape[1]
    if torch.equal(g, torch.arange(columns) // size):  # plain groups: broadcast, no gather
        weight = ((q.view(out, -1, size) - zeros[..., None]).to(torch.int8) * scales[..., None]).view(out, columns)
    else:
        weight = (q - zeros[:, g]).to(torch.int8) * scales[:, g]
    module.weight = torch.nn.Parameter(weight.float())  # a leaf that requires grad: _dequantized_block says why
    if module.bias is not None:
        module.bias = module.bias.float()


def _replace(block, name: str, module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent), leaf, module)


class _Replay(torch.nn.Module):
    """Stands in, in the later groups' passes, for the module around a quantized one-linear group
    (Qwen2's attention around o_proj): it applies that linear to the input the group's own pass
    captured for the sample, so the later groups skip what comes before it (q/k/v and the
    attention) and get, bit for bit, what the whole module gives."""

    def __init__(self, linear, inputs: list, rest: int):
        super().__init__()
        self.linear, self.inputs, self.rest, self.index = linear, inputs, rest, 0

    def forward(self, *_args, **_kwargs):
        out = self.linear(self.inputs[self.index])
        return out if self.rest < 0 else (out,) + (None,) * self.rest


def _replayable(block, name: str, probe, kwargs) -> int | None:
    """How the module around linear ``name`` returns the linear's output, seen on a probe: -1 as
    it is, n as the first of a tuple with n Nones after it; None when it does anything else."""
    parent = block.get_submodule(name.rpartition(".")[0])
    seen = {}
    handles = [block.get_submodule(name).register_forward_hook(lambda _m, _i, o: seen.setdefault("linear", o)),
               parent.register_forward_hook(lambda _m, _i, o: seen.setdefault("parent", o))]
    try:
        block(probe, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    out, linear = seen.get("parent"), seen.get("linear")
    if linear is None or parent is block:
        return None
    if out is linear:
        return -1
    if isinstance(out, tuple) and out and out[0] is linear and all(x is None for x in out[1:]):
        return len(out) - 1
    return None


def _replay_plan(block, groups: list[list[str]], probe, kwargs) -> dict[int, int]:
    """{group index: its _Replay's tuple rest} for the one-linear groups whose module can be replayed
    and holds no linear of a later group."""
    plan = {}
    for i, group in enumerate(groups[:-1]):
        parent = group[0].rpartition(".")[0]
        later = [n for g in groups[i + 1:] for n in g]
        if len(group) == 1 and parent and not any(n.startswith(parent + ".") for n in later):
            rest = _replayable(block, group[0], probe, kwargs)
            if rest is not None:
                plan[i] = rest
    return plan


@torch.no_grad()
def quantize_groups(block, groups: list[list[str]], hidden: list, kwargs_for, config,
                    shared: bool = False, bf16: bool = False, timed=None) -> dict:
    """GPTQ every linear of ``block`` group by group, each group calibrated with the earlier
    groups already quantized; the linears are replaced in place by INC's packed modules. Returns
    {linear name: its unpacked integers, zero points, scales and groups} (``_unpacked``).
    ``shared``: each group's linears read one tensor (``layer_by_layer.sequential_groups``); then
    a one-linear group's captured inputs replay its module for the later groups (``_Replay``).
    ``bf16``: the calibration forwards in bf16 and the Hessians from bf16 products (``calibration.Feed``);
    ``timed(phase)``, a context manager, clocks the forwards ("calibration"), the Hessian updates
    within them ("hessians") and ``fasterquant`` with the packing ("gptq")."""
    timed = timed or untimed
    cfg = layer_config(config)
    plan = {}
    if shared and hidden:
        probe = hidden[0][:, :8]
        plan = _replay_plan(block, groups, probe, kwargs_for(probe))
    swapped: list[tuple[str, torch.nn.Module]] = []  # (name, the module a _Replay stands in for)
    replays: list[_Replay] = []
    unpacked: dict[str, dict] = {}
    try:
        for i, group in enumerate(groups):
            keep = [] if i in plan else None
            with timed("calibration"):
                gptqs = _hessians(block, group, hidden, kwargs_for, cfg, shared, replays, keep, bf16, timed)
            with timed("gptq"):
                linears = [block.get_submodule(name) for name in group]
                solved = _solve(linears, list(gptqs.values()), cfg)
                del gptqs
                for name, linear, parts in zip(group, linears, solved):
                    module, unpacked[name] = _packed(linear, *parts, cfg, runs_again=i < len(groups) - 1)
                    _replace(block, name, module)
            if keep is not None:
                parent = group[0].rpartition(".")[0]
                swapped.append((parent, block.get_submodule(parent)))
                replays.append(_Replay(block.get_submodule(group[0]), keep, plan[i]))
                _replace(block, parent, replays[-1])
    finally:
        for parent, module in reversed(swapped):
            _replace(block, parent, module)
    return unpacked
