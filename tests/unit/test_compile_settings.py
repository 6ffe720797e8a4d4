"""The inductor setting the trainer applies before compiling, and that a user's own choice is kept."""

import torch._inductor.config as inductor_config

from nanoternary.lit.compile import trust_cpu_vec_isa
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
