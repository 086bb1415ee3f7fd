"""Run tangquant quantize; with --amx-emulation, the bf16 Hessian products are computed as AMX's bf16 fpmath
computes them (operands rounded to bf16, exact products, fp32 sums), which oneDNN does not do on this non-AMX CPU."""
import json, sys, torch, transformers
args = sys.argv[1:]
if args and args[0] == "--amx-emulation":
    args = args[1:]
    from tangquant.quant import gptq_block
    def add_samples(gptq, inputs):
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).float().bfloat16().float()
        total = gptq.nsamples + len(inputs)
        gptq.H.addmm_(x.t(), x, beta=gptq.nsamples / total, alpha=2 / total)
        gptq.nsamples = total
    gptq_block.add_samples = add_samples
from tangquant.cli import main
sys.exit(main(args))
