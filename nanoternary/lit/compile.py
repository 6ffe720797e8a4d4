"""torch.compile of the training loss, with the inductor settings that pay off on a CPU.

Before it generates any CPU kernel, inductor validates every vector ISA the CPU reports (AMX, AVX-512 VNNI,
AVX-512, AVX2) by compiling, then loading in a child process, a file that includes ATen's vectorized headers
with that ISA's flags. On 2 cores that costs about 9 s of every compilation that finds an empty inductor cache
(the results live in the cache folder). `cpp.vec_isa_ok=True` skips only that header build: the CPU's flags
still choose the ISA, and the small intrinsic probes for bf16, VNNI and AMX are still compiled, so the compiler
is still tested on the instructions the kernels use. An explicit TORCHINDUCTOR_VEC_ISA_OK wins.

A CPU graph is also compiled with `cpp_wrapper`: inductor then calls its kernels from generated C++ instead of
generated Python, which takes 3-6% off a `tiny` step on 2 cores, with the same losses to the bit. Built as one
file with its kernels, the C++ wrapper made a first compilation longer; with `cpp_wrapper_build_separate` a
graph's kernels are built as one library and its wrapper as another, which is shorter than the Python wrapper's
one library per kernel (one gcc start, precompiled-header load and link each). Inductor's code generation and
builds for `tiny`, two cold runs of each: 30-32 s, against 33-36 s with the Python wrapper and 41-44 s as one file.
GPU graphs keep inductor's defaults, which are what was measured there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.config as inductor_config

DEVICE_OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"cpp_wrapper": True, "cpp_wrapper_build_separate": True},
}


def trust_cpu_vec_isa() -> None:
    """Skip inductor's ATen-header build per vector ISA, unless the user set TORCHINDUCTOR_VEC_ISA_OK."""
    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True


class StaticCompiled:
    """`torch.compile(fn, dynamic=False)` (the training batches all have one shape), compiled on first call
    with the inductor options of the device its tensor arguments are on."""

    def __init__(self, fn: Callable) -> None:
        trust_cpu_vec_isa()
        self.fn = fn
        self.by_device: dict[str, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if device not in self.by_device:
            options = DEVICE_OPTIONS.get(device)
            self.by_device[device] = torch.compile(self.fn, dynamic=False, options=options)
        return self.by_device[device](*args)
