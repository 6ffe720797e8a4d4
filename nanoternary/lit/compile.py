"""torch.compile of the training loss, with the one inductor setting that shortens a first-ever compilation.

Before it generates any CPU kernel, inductor validates every vector ISA the CPU reports (AMX, AVX-512 VNNI,
AVX-512, AVX2) by compiling, then loading in a child process, a file that includes ATen's vectorized headers
with that ISA's flags. On 2 cores that costs about 9 s of every compilation that finds an empty inductor cache
(the results live in the cache folder). `cpp.vec_isa_ok=True` skips only that header build: the CPU's flags
still choose the ISA, and the small intrinsic probes for bf16, VNNI and AMX are still compiled, so the compiler
is still tested on the instructions the kernels use. An explicit TORCHINDUCTOR_VEC_ISA_OK wins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch._inductor.config as inductor_config

Fn = TypeVar("Fn", bound=Callable)


def trust_cpu_vec_isa() -> None:
    """Skip inductor's ATen-header build per vector ISA, unless the user set TORCHINDUCTOR_VEC_ISA_OK."""
    if inductor_config.cpp.vec_isa_ok is None:
        inductor_config.cpp.vec_isa_ok = True


def compile_static(fn: Fn) -> Fn:
    """`torch.compile(fn, dynamic=False)`: the training batches all have one shape."""
    trust_cpu_vec_isa()
    return torch.compile(fn, dynamic=False)
