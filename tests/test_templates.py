"""The kernel templates: the holes their docstrings name are the holes they have, and the
shared Triton helpers (kernels.common_source) are written once in every generated source."""
from __future__ import annotations

import importlib
import re

import pytest
import torch

from flexattn.kernels import generated_source
from flexattn.trace import trace_mask, trace_score


def _module(name):  # by its path: flexattn.kernels.forward / backward are also functions there
    return importlib.import_module(f"flexattn.kernels.{name}")


HOLE = re.compile(r"\{[A-Z][A-Z_]*\}")
TEMPLATES = [(_module(m), t) for m, t in (("forward", "FWD_TEMPLATE"), ("backward", "BWD_TEMPLATE"),
                                         ("decode", "DECODE_TEMPLATE"))]


@pytest.mark.parametrize("module,template", TEMPLATES, ids=["fwd", "bwd", "decode"])
def test_docstring_names_the_template_holes(module, template):
    template = getattr(module, template)
    assert set(HOLE.findall(module.__doc__)) == set(HOLE.findall(template))


@pytest.mark.parametrize("kind", ["fwd", "bwd", "decode"])
def test_generated_source_defines_each_function_once(kind):
    bias = torch.randn(16)
    sg = trace_score(lambda s, b, h, q, kv: s + bias[kv])
    mg = trace_mask(lambda b, h, q, kv: q >= kv)
    src = generated_source(sg, mg, kind, grad_slots=(0,) if kind == "bwd" else ())
    assert not HOLE.findall(src)
    names = re.findall(r"^def (\w+)\(", src, flags=re.M)
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    shared = re.findall(r"^def (\w+)\(", _module("common_source").COMMON_SOURCE, flags=re.M)
    assert set(shared) <= set(names)
    kernel = src[src.index("def flex_"):]
    assert "_head_base(" in kernel
