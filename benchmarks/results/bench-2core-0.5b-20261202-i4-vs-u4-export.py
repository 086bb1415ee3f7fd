import sys
from tangquant.ov import build
real = build.write_staging_model
build.write_staging_model = lambda ckpt, d: (real(ckpt, d), False)[1]  # force the u4 + zero-point path
from tangquant.export import export
print(export(sys.argv[1], sys.argv[2], format="openvino", force=True).get("int4_mode"))
