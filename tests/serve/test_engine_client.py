"""The engine contract (sparsefast.serve.engine_client): the real engine and stream (sparsefast.serve.engine) and the
scripted test double (tests/serve/scripted_engine.py) declare the protocols and define every member themselves, with
the protocol's parameters, so the HTTP tests over the double test the interface the real engine has."""

from __future__ import annotations

import inspect

import pytest
from typing_extensions import get_protocol_members

from sparsefast.serve.engine import GenerationEngine, RequestStream
from sparsefast.serve.engine_client import EngineClient, TokenStream
from sparsefast.serve.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.serve.scripted_engine import ScriptedEngine, ScriptedStream

IMPLEMENTATIONS = [(EngineClient, GenerationEngine), (EngineClient, ScriptedEngine), (TokenStream, RequestStream),
                   (TokenStream, ScriptedStream)]


def parameters(function) -> list[tuple[str, inspect._ParameterKind, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("protocol, cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_every_protocol_member_is_defined_with_the_protocols_signature(protocol, cls):
    assert protocol in cls.__mro__  # declared, so a type checker holds the class to the protocol
    members = get_protocol_members(protocol)
    assert members, f"{protocol.__name__} lists no members"
    for name in sorted(members):
        stub = inspect.getattr_static(protocol, name, None)
        if stub is None:  # a data member: declared by annotation, set by the implementation's __init__
            assert name in protocol.__annotations__
            continue
        own = inspect.getattr_static(cls, name)
        assert own is not stub, f"{cls.__name__}.{name} is missing (it inherits the protocol's stub)"
        if isinstance(stub, property):
            assert isinstance(own, property), f"{cls.__name__}.{name} must be a property"
        else:
            assert parameters(own) == parameters(stub), f"{cls.__name__}.{name}{inspect.signature(own)}"


def test_instances_have_the_protocols_data_members():
    real = GenerationEngine(tiny_model("llama"), object(), max_batch=2, max_queue=3, max_model_len=32)
    scripted = ScriptedEngine(max_batch=2, max_queue=3, max_model_len=32)
    for engine in (real, scripted):
        assert isinstance(engine, EngineClient)
        settings = {name: getattr(engine, name) for name in ("max_model_len", "max_queue", "queue_depth", "running")}
        assert settings == {"max_model_len": 32, "max_queue": 3, "queue_depth": 0, "running": 0}
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=4))  # not started: the request waits
        assert isinstance(stream, TokenStream) and isinstance(stream.submitted, float)
        assert engine.queue_depth == 1
        engine.shutdown()
