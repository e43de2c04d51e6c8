"""Built-in factories declare their KServe signature with @with_signature."""

from __future__ import annotations

import torch

from sealedtorch.runtime.architectures import ArchSpec, build, mlp, with_signature
from sealedtorch.runtime.config import RuntimeConfig
from sealedtorch.runtime.kserve import TensorSpec


def test_a_built_in_factory_needs_no_signature_in_its_metadata():
    name = "sealedtorch.runtime.architectures:mlp"
    state = mlp(3, 2).state_dict()
    built = build(ArchSpec(name, {"in_features": 3, "out_features": 2}, None, None), state,
                  RuntimeConfig(architectures=(name,)), device=torch.device("cpu"))
    assert built.inputs == (TensorSpec("input", "FP32", (-1, 3)),)
    assert built.outputs == (TensorSpec("output", "FP32", (-1, 2)),)


def test_with_signature_returns_the_factory_itself():
    def describe(module: torch.nn.Module, **_: object):
        return (TensorSpec("x", "FP32", (-1, 1)),), (TensorSpec("y", "FP32", (-1, 1)),)

    def factory() -> torch.nn.Module:
        return torch.nn.Linear(1, 1)

    assert with_signature(describe)(factory) is factory
