"""The official `openai` Python SDK against Airlock's in-process local models.

Run by `tests/tests/python_sdk.rs::openai_python_sdk_on_local_models`, which starts the
gateway with SmolLM2-135M (chat) and all-MiniLM-L6-v2 (embeddings) registered and sets
AIRLOCK_BASE_URL, AIRLOCK_KEY, AIRLOCK_LOCAL_CHAT_MODEL and AIRLOCK_LOCAL_EMBED_MODEL.
"""

import base64
import math
import os
import struct

import openai
import pytest

_REQUIRED = ["AIRLOCK_BASE_URL", "AIRLOCK_KEY", "AIRLOCK_LOCAL_CHAT_MODEL", "AIRLOCK_LOCAL_EMBED_MODEL"]
_missing = [k for k in _REQUIRED if not os.environ.get(k)]
if _missing:
    raise RuntimeError(
        f"missing environment {_missing}: run through `cargo test -p airlock-e2e --test python_sdk`"
    )

CHAT = os.environ["AIRLOCK_LOCAL_CHAT_MODEL"]
EMBED = os.environ["AIRLOCK_LOCAL_EMBED_MODEL"]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=os.environ["AIRLOCK_BASE_URL"], api_key=os.environ["AIRLOCK_KEY"], max_retries=0)


def test_chat_and_stream_agree(client):
    messages = [{"role": "user", "content": "What is two plus two?"}]
    r = client.chat.completions.create(model=CHAT, messages=messages, temperature=0, max_tokens=16)
    text = r.choices[0].message.content
    assert text
    assert r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")

    pieces, usage = [], None
    for chunk in client.chat.completions.create(
        model=CHAT, messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_seeded_sampling_repeats(client):
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Name a fruit."}],
              temperature=0.8, seed=7, max_tokens=12)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_sequence(client):
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "List the numbers 1, 2, 3, 4, 5."}],
        temperature=0, max_tokens=40, stop=["3"],
    )
    assert "3" not in r.choices[0].message.content


def test_legacy_completions(client):
    r = client.completions.create(model=CHAT, prompt="Once upon a time", temperature=0, max_tokens=10)
    assert r.choices[0].text
    assert r.usage.completion_tokens == 10 or r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=CHAT, prompt="Once upon a time", temperature=0, max_tokens=10, stream=True)
        if c.choices
    )
    assert streamed == r.choices[0].text


def test_embeddings(client):
    r = client.embeddings.create(model=EMBED, input=["A cat sits on the mat.", "A kitten rests on a rug.", "Stock prices fell."])
    vecs = [d.embedding for d in r.data]
    assert all(len(v) == 384 for v in vecs)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2])
    assert r.usage.prompt_tokens > 0
    # Asked for explicitly, base64 comes back as the raw little-endian float32 string.
    b = client.embeddings.create(model=EMBED, input="A cat sits on the mat.", encoding_format="base64")
    raw = b.data[0].embedding
    floats = list(struct.unpack("<384f", base64.b64decode(raw))) if isinstance(raw, str) else raw
    assert cos(floats, vecs[0]) > 0.9999


def test_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="local/does-not-exist", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=1_000_000)
    assert e.value.code == "context_length_exceeded"
