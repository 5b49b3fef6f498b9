"""The official `openai` Python SDK against a running Airlock.

Run by `tests/tests/python_sdk.rs`, which starts mock upstreams and the gateway and sets:

- AIRLOCK_BASE_URL     the gateway's OpenAI base URL (http://IP:PORT/v1)
- AIRLOCK_KEY          the master key
- AIRLOCK_CHAT_MODELS  comma-separated chat models, one per provider kind
- AIRLOCK_EMBED_MODELS comma-separated embedding models
- AIRLOCK_CUT_MODEL    a model whose upstream breaks every stream off mid-way
- AIRLOCK_SLASH_MODEL  a configured model whose name contains '/'

The mocks answer `You said: <last user text>`, call the first tool with
`{"query": <last user text>}`, and answer a tool result with `Tool result: <result>`.
"""

import json
import os

import openai
import pytest

_REQUIRED = [
    "AIRLOCK_BASE_URL",
    "AIRLOCK_KEY",
    "AIRLOCK_CHAT_MODELS",
    "AIRLOCK_EMBED_MODELS",
    "AIRLOCK_CUT_MODEL",
    "AIRLOCK_SLASH_MODEL",
]
_missing = [k for k in _REQUIRED if not os.environ.get(k)]
if _missing:
    raise RuntimeError(
        f"missing environment {_missing}: run through `cargo test -p airlock-e2e --test python_sdk`"
    )

BASE_URL = os.environ["AIRLOCK_BASE_URL"]
KEY = os.environ["AIRLOCK_KEY"]
CHAT_MODELS = os.environ["AIRLOCK_CHAT_MODELS"].split(",")
EMBED_MODELS = os.environ["AIRLOCK_EMBED_MODELS"].split(",")
CUT_MODEL = os.environ["AIRLOCK_CUT_MODEL"]
SLASH_MODEL = os.environ["AIRLOCK_SLASH_MODEL"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a place",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]


@pytest.fixture
def client():
    return openai.OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=30)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_chat(client, model):
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello from the sdk"},
        ],
    )
    assert raw.headers.get("x-airlock-request-id")
    assert raw.headers.get("x-airlock-target", "").count("/") >= 1
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "You said: hello from the sdk"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.usage.total_tokens > 0


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_stream_with_usage(client, model):
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream this to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    chunks = list(stream)
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert text == "You said: stream this to me"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_stream_without_usage(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "no usage please"}], stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: no usage please"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_tool_call_and_result(client, model):
    question = "What is the weather in Paris?"
    first = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], tools=TOOLS
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.id
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"query": question}

    second = client.chat.completions.create(
        model=model,
        tools=TOOLS,
        messages=[
            {"role": "user", "content": question},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
        ],
    )
    text = second.choices[0].message.content
    assert text.startswith("Tool result:") and "sunny, 21 C" in text


@pytest.mark.parametrize("model", CHAT_MODELS)
def test_streamed_tool_call(client, model):
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=TOOLS, stream=True
    )
    name, args, ids = "", "", set()
    for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                if tc.id:
                    ids.add(tc.id)
                if tc.function and tc.function.name:
                    name += tc.function.name
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
    assert len(ids) == 1
    assert name == "get_weather"
    assert json.loads(args) == {"query": "Weather in Oslo?"}


@pytest.mark.parametrize("model", EMBED_MODELS)
def test_embeddings_base64_default_decodes(client, model):
    # The SDK asks for base64 unless told otherwise, and decodes it.
    raw = client.embeddings.with_raw_response.create(model=model, input=["alpha", "beta"])
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    wire = raw.http_response.json()
    assert all(isinstance(d["embedding"], str) for d in wire["data"]), "base64 asked, base64 expected"
    decoded = raw.parse()
    floats = client.embeddings.create(model=model, input=["alpha", "beta"], encoding_format="float")
    assert len(decoded.data) == 2
    for got, want in zip(decoded.data, floats.data):
        assert isinstance(got.embedding, list) and len(got.embedding) == 8
        assert got.embedding == want.embedding
    assert decoded.data[0].embedding != decoded.data[1].embedding


def test_legacy_completion(client):
    resp = client.completions.create(model=CHAT_MODELS[0], prompt="Say this is a test", max_tokens=20)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "You said: Say this is a test"


def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list()}
    for m in CHAT_MODELS + EMBED_MODELS + [SLASH_MODEL]:
        assert m in ids
    for m in [CHAT_MODELS[0], SLASH_MODEL]:
        got = client.models.retrieve(m)
        assert got.id == m
        assert got.object == "model"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="does-not-exist", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("does-not-exist")


def test_bad_request_has_code_and_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=CHAT_MODELS[0], messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert e.value.code == "invalid_value"
    assert e.value.param == "temperature"
    assert e.value.request_id is None or isinstance(e.value.request_id, str)
    assert e.value.response.headers.get("x-airlock-request-id")


def test_wrong_key_is_authentication_error():
    bad = openai.OpenAI(base_url=BASE_URL, api_key="sk-wrong-key-000000000000", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=CHAT_MODELS[0], messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "invalid_api_key"


def test_cut_stream_raises_api_error(client):
    stream = client.chat.completions.create(
        model=CUT_MODEL, messages=[{"role": "user", "content": "this stream will break off"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
    assert text, "some text arrived before the break"
    assert e.value.code == "upstream_stream_interrupted"
