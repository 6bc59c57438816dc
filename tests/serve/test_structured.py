"""Structured output (response_format json_object / json_schema, sparsefast.serve.structured over llguidance): what
the server returns parses as JSON and validates against the schema (jsonschema, an independent validator), greedy
and sampled, completions and chat, through the real openai client; schemas that cannot be served are 400 naming
response_format. The tiny story llama has no "{" or "[" in its vocabulary, so its schemas are strings and numbers;
objects are tested on SmolLM2 (slow)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from sparsefast.serve.sampling import SamplingParams
from sparsefast.serve.structured import GrammarCompiler
from tests.serve.server_helpers import MODEL, PROMPTS

ANIMAL = {"type": "string", "enum": ["cat", "dog", "bird"]}
AGE = {"type": "integer", "minimum": 3, "maximum": 90}


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("schema", [ANIMAL, AGE])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completion_output_validates_against_the_schema(client, schema, temperature):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=24, temperature=temperature, seed=3,
                                    n=2, extra_body={"response_format": _schema_format(schema)})
    for choice in out.choices:
        assert choice.finish_reason == "stop"  # the value ended, then EOS: the only token the grammar left
        jsonschema.validate(json.loads(choice.text), schema)


def test_chat_json_schema_streamed_and_not(client):
    messages = [{"role": "user", "content": "Which animal?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                           response_format=_schema_format(ANIMAL))
    jsonschema.validate(json.loads(whole.choices[0].message.content), ANIMAL)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, response_format=_schema_format(ANIMAL),
        stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content


def test_plain_requests_are_not_constrained(client):
    # the same prompt without response_format is free text (the story model writes words, not a quoted enum)
    out = client.completions.create(model=MODEL, prompt=PROMPTS[6], max_tokens=12, temperature=0)
    assert out.choices[0].text.strip() not in ('"cat"', '"dog"', '"bird"')


def test_a_schema_that_cannot_compile_is_400_naming_response_format(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       response_format=_schema_format({"type": "integer", "minimum": "three"}))
    assert err.value.body["param"] == "response_format"


def test_grammar_cannot_be_combined_with_ignore_eos_or_min_tokens(served):
    grammar = GrammarCompiler(served[2]).compile("json_schema", ANIMAL)
    for field in ("ignore_eos", "min_tokens"):
        with pytest.raises(ValueError, match=f"^{field}: cannot be combined with response_format"):
            SamplingParams(max_tokens=8, grammar=grammar, **{field: 1 if field == "min_tokens" else True}).validate()


@pytest.mark.slow
def test_smollm2_json_schema_object_validates():
    """SmolLM2-135M-Instruct (the real model) writes an object with required fields of several types, and
    json_object gives an object, through the openai client."""
    from sparsefast.models import load_model
    from sparsefast.serve.app import ServerConfig, create_app
    from sparsefast.serve.engine import GenerationEngine
    from tests.serve.server_helpers import running_server

    model, tok = load_model("smollm2")
    engine = GenerationEngine(model, tok, max_batch=2, max_model_len=512)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120},
                             "pets": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}
    with running_server(create_app(lambda: (engine, tok), ServerConfig(model_name="smollm2"))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": "Describe a person called Anna who is 31 and has a cat, as JSON."}]
        out = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=80, temperature=0,
                                             response_format=_schema_format(schema), n=2)
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schema)
        # json_object allows any object: a 135M model can nest objects without end on a vague prompt, so this one
        # asks for a small object (a length-limited answer would still be a JSON prefix, but not parse)
        question = [{"role": "user", "content": 'Give the capital of France as a JSON object with the key "capital".'}]
        for temperature in (0.0, 0.7):
            obj = client.chat.completions.create(model="smollm2", messages=question, max_tokens=120, seed=1,
                                                 temperature=temperature, response_format={"type": "json_object"})
            assert obj.choices[0].finish_reason == "stop"
            assert isinstance(json.loads(obj.choices[0].message.content), dict)
