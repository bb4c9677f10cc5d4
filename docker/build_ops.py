"""Build DeepSpeed's JIT ops into the image (TORCH_EXTENSIONS_DIR), so no run stops to compile them.

With nvcc (the CUDA devel bases), the CUDA accelerator's CPU Adam (ZeRO offload) and fused Adam,
compiled for TORCH_CUDA_ARCH_LIST without a GPU (this branch has not run: no CUDA base can be
pulled where the tests run). Without nvcc, what `make install` builds for the CPU accelerator:
CPU Adam and the shared-memory collectives. Either way for this machine's CPU (-march=native).
"""

import os
import shutil

if shutil.which("nvcc"):
    os.environ.setdefault("DS_ACCELERATOR", "cuda")  # no GPU is visible while an image builds

from deepspeed.accelerator import get_accelerator
from deepspeed.ops import op_builder

names = (
    ("CPUAdamBuilder", "FusedAdamBuilder")
    if os.environ.get("DS_ACCELERATOR") == "cuda"
    else ("CPUAdamBuilder", "ShareMemCommBuilder")
)
for name in names:
    getattr(op_builder, name)().load(verbose=False)
    print(f"built {name} for {get_accelerator().device_name()}")
