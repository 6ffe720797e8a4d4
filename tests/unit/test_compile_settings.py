"""The inductor settings the trainer compiles with, and that a user's own choice is kept."""

import torch
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

from nanoternary.lit.compile import StaticCompiled, trust_cpu_vec_isa
from nanoternary.lit.module import LitTernaryLM
from tests.models import preset


def test_vec_isa_header_probe_is_skipped_when_the_user_did_not_choose():
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        trust_cpu_vec_isa()
        assert inductor_config.cpp.vec_isa_ok is True


def test_an_explicit_vec_isa_choice_is_kept():
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        trust_cpu_vec_isa()
        assert inductor_config.cpp.vec_isa_ok is False


def test_only_a_compiled_module_changes_the_setting():
    model, optim = preset("tiny").to_dict(), {"name": "adamw", "adamw": {}}
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        LitTernaryLM(model=model, optim=optim, compile=False)
        assert inductor_config.cpp.vec_isa_ok is None
        LitTernaryLM(model=model, optim=optim, compile=True)
        assert inductor_config.cpp.vec_isa_ok is True


def test_a_cpu_graph_gets_a_separately_built_cpp_wrapper_and_the_eager_result():
    def relu_matmul_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ w).sum(-1)

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    out, sources = run_and_get_code(StaticCompiled(relu_matmul_sum), x, w)
    assert torch.equal(out, relu_matmul_sum(x, w))
    assert len(sources) == 1
    assert "void inductor_entry_impl(" in sources[0]  # the C++ entry point, not the Python `def call(args)`
    assert "def call(" not in sources[0]
    assert "kernel_code=kernel_src," in sources[0]  # the kernels built apart from the wrapper
