"""Fixtures of the server tests: the real server over the tiny story llama (one per test module, always shut down),
an openai client for it, and the story llama's tokenizer for the scripted-engine servers."""

from __future__ import annotations

import openai
import pytest
import transformers

from sparsefast.models import load_model
from sparsefast.serve.app import ServerConfig, create_app
from sparsefast.serve.engine import GenerationEngine
from tests.serve.server_helpers import (
    BODY_LIMIT,
    CHAT_TEMPLATE,
    KEY,
    MAX_MODEL_LEN,
    MODEL,
    TOKENS_LIMIT,
    running_server,
)


@pytest.fixture(scope="module")
def served(story_llama_dir):
    """(base URL, engine, tokenizer, model) of a running server; engine and server stop at the end of the module."""
    model, tokenizer = load_model(str(story_llama_dir))
    engine = GenerationEngine(model, tokenizer, max_batch=4, max_queue=32, max_model_len=MAX_MODEL_LEN)
    config = ServerConfig(model_name=MODEL, api_key=KEY, max_tokens_limit=TOKENS_LIMIT, max_body_bytes=BODY_LIMIT,
                          chat_template=CHAT_TEMPLATE)
    with running_server(create_app(lambda: (engine, tokenizer), config)) as base:
        yield base, engine, tokenizer, model


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(story_llama_dir):
    """The story llama's tokenizer (it has no chat template), for servers over a scripted engine."""
    return transformers.AutoTokenizer.from_pretrained(str(story_llama_dir))
