import time, torch, transformers
from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
from neural_compressor.torch.algorithms.weight_only.utility import quant_weight_w_scale
from tangquant.quant import gptq_block as gb
out_f, in_f = 4096, 11008
lin = torch.nn.Linear(in_f, out_f, bias=False)
cfg = {"sym": True, "group_size": 128, "dtype": "int", "bits": 4}
scale = torch.rand(out_f, in_f // 128) * 0.01 + 0.001
qi = torch.randint(-8, 8, (out_f, in_f)).float()
q = qi * scale.repeat_interleave(128, 1)
T = {}
t = time.perf_counter(); qq = quant_weight_w_scale(q.clone(), scale, None, None, 128, dtype="int"); T["quant_weight_w_scale"] = time.perf_counter() - t
module = INCWeightOnlyLinear(in_f, out_f, dtype="int", bits=4, group_size=128, zp=False, bias=False, g_idx=False, device="cpu")
t = time.perf_counter(); module.pack(qq.type(torch.int32), scale, None, None, scale_bf16_to_fp8=None, g_idx=None); T["INC pack"] = time.perf_counter() - t
t = time.perf_counter(); parts = gb._unpacked(module, qq, None, cfg); T["_unpacked"] = time.perf_counter() - t
t = time.perf_counter(); gb._recovered(module, parts); T["_recovered"] = time.perf_counter() - t
print({k: round(v, 3) for k, v in T.items()}, torch.get_num_threads())
