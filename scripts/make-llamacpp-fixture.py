#!/usr/bin/env python3
"""Writes models/tests/fixtures/<family>_tokens.json: llama.cpp's view of a real model.

Run from the repository root after scripts/fetch-models.sh and scripts/llamacpp-venv.sh:

    .cache/llamacpp-venv/bin/python scripts/make-llamacpp-fixture.py gemma3
    .cache/llamacpp-venv/bin/python scripts/make-llamacpp-fixture.py smollm2

Records, with llama-cpp-python (the version is written into the fixture):
- `tokens`: the ids llama.cpp's tokenizer gives each text of a varied corpus
  (`Llama(vocab_only=True).tokenize(text, add_bos=..., special=...)`);
- `greedy`: for a few chat prompts (the last ones longer than Gemma 3's 512-token
  sliding window), the prompt text (the family's chat format written
  out by hand, so it also checks our template), its ids, and llama.cpp's greedy
  continuation: argmax of the logits at every step (temperature 0, no penalties,
  no top-k/top-p/min-p), up to 32 tokens or an end-of-turn token, with the margin
  between the best and second-best logit at each step, so a test can tell a near tie
  from a real disagreement, and the 20 best logits of the first step (ids and
  values) so a test can measure how far our logits are from llama.cpp's;
- `loglik`: a fixed English text, its ids (BOS added as the model says) and the
  log-probability llama.cpp gives each token after the first (logits of every
  position, `logits_all=True`), with their mean: the figure a faithful forward pass
  must reproduce within 1%.
"""

import json
import os
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

STEPS = 32

CORPUS = [
    "",
    " ",
    "What is the capital of France?",
    "Hello, world!  Multiple   spaces\tand\ttabs\n\nnew lines\n",
    "   leading and trailing   ",
    "a" + " " * 40 + "b\t\t\t\tc\n\n\n\n\n\nd\r\ne",
    "0123456789 3.14159 -42 1e-9 0xDEADBEEF $1,234.56 year 2024.",
    "naïve café — Straße, Ελληνικά, русский, العربية, हिन्दी",
    "日本語のテキスト、中文的句子。한국어 문장입니다.",
    "emoji 🙂🚀👩‍👩‍👧‍👦 and symbols ∑∫√≠ ™ © € £ ¥",
    "fn main() {\n    let x: Vec<u32> = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
    "def f(x):\n    return {'a': [x, x**2]}  # comment\n",
    "<table><tr><td>cell</td></tr></table> <h1>Title</h1>",
    "I'm sure they'll say it's fine, we've done it, you'd see.",
    "\u0000\u0001\u007f control chars \ufeff bom \u00a0 nbsp",
    "Ünïcödé ẞ ǅ ﬁ ＡＢＣ １２３ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


LOGLIK_TEXT = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel, "
    "bakers opened their shutters, and the first bus of the day crossed the old stone "
    "bridge with its lights still on. By nine o'clock the market square was full: "
    "apples from the hills, cheese wrapped in paper, and a man selling radios that "
    "had not worked in years. Children ran between the stalls while their parents "
    "argued about prices. In the afternoon it rained, as it always did in October, "
    "and everyone went home early to sit by the fire and talk about the harvest."
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Write a Python function that returns the factorial of n.",
    "Explain in two sentences why the sky is blue.",
    "Give me a packing list for a weekend hiking trip.",
    "Qu'est-ce que la photosynthèse ?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "If a train travels 120 km in 1.5 hours, what is its average speed?",
    "Write a short, polite email declining a meeting invitation.",
    "What are the differences between TCP and UDP?",
    "Name five animals that live in the Arctic.",
    "Complete the sequence: 2, 4, 8, 16, ...",
    "Describe the taste of a lemon to someone who has never had one.",
    "Convert 72 degrees Fahrenheit to Celsius and show the steps.",
    "Tell me a joke about programmers.",
    "日本の首都はどこですか？",
    "What should I consider when choosing a laptop for software development?",
]

# Prompts longer than Gemma 3's 512-token sliding window (its local attention layers
# then see only the last 512 positions): a story followed by a question about it.
STORY = " ".join(
    [
        LOGLIK_TEXT,
        "On Saturday the ferry from the island was late because of fog, and the "
        "postman, who had waited an hour on the quay, delivered the letters at dusk. "
        "One of them was for the schoolteacher, Mrs. Arden, from a nephew in Lisbon who "
        "wrote that he would arrive before the winter and stay until the spring.",
        "The mayor called a meeting about the bridge. Engineers from the city had "
        "measured the cracks in the second arch and said that heavy trucks should cross "
        "one at a time. Nobody liked the idea of a detour through the valley, which "
        "added forty minutes to every trip to the station, so the council voted to "
        "repair the arch in November, when the river was low and the market was closed.",
        "Meanwhile the baker's daughter, Lena, trained for the regional race. Every "
        "morning she ran along the towpath to the lock and back, eleven kilometres, "
        "timing herself with her grandfather's watch. In the first week she needed "
        "fifty-eight minutes; by the end of the month she needed forty-nine, and the "
        "fishermen began to shout the time to her as she passed the boats.",
        "When the nephew finally came, he brought a box of oranges, a guitar with two "
        "missing strings and a map of the old railway that nobody in town had seen "
        "before. The map showed a branch line to the quarry above the hills, closed in "
        "1958, and a station building that still stood, half hidden by brambles, behind "
        "the cemetery. Within a week half the children of the town had walked up to "
        "find it, and the schoolteacher had to write to every family about the danger "
        "of the old tunnel.",
        "The race took place on the first Sunday of December in a cold wind. Lena "
        "started too fast, fell back to ninth place on the hill, and then, on the long "
        "flat road by the river, passed one runner after another. She finished third, "
        "in forty-seven minutes and twelve seconds, and the baker closed the shop for "
        "the afternoon so that everyone could celebrate with cake and hot chocolate.",
        "By then the repairs on the bridge had begun. Scaffolding covered the second "
        "arch, a crane stood on the gravel where the boats used to lie, and the trucks "
        "took the long road through the valley after all. The council promised that "
        "the work would be finished before Easter, but nobody believed it, and the "
        "fishermen started a bet about the date.",
    ]
)
LONG_PROMPTS = [
    STORY + "\n\nWho wrote to Mrs. Arden, and what did he bring when he came?",
    STORY + "\n\nIn which place did Lena finish the race, and in what time?",
]


FAMILIES = {
    "gemma3": {
        "model": ".cache/models/gemma-3-270m-q4_k_m.gguf",
        # Chat markers, whole and broken.
        "corpus": [
            "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<eos><pad><unk><mask>",
            "<start_of_turn<end_of_turn <start_of_turnx>",
        ],
        # (text, add_bos, special) beyond the PROMPT-style (True, True) pass.
        "extra": [
            ("<start_of_turn>user\nHi<end_of_turn>\n", False, False),
            ("What is the capital of France?", False, True),
            ("   leading and trailing   ", False, False),
        ],
        "chat": lambda q: f"<start_of_turn>user\n{q}<end_of_turn>\n<start_of_turn>model\n",
        "ends": ("<end_of_turn>", "<eos>"),
    },
    "smollm2": {
        "model": ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "corpus": [
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "<|endoftext|><|im_start|><|im_end|> <repo_name> <file_sep>",
            "<|im_start <|im_end| <|im_startx|>",
        ],
        "extra": [
            ("<|im_start|>user\nHi<|im_end|>\n", False, False),
            ("What is the capital of France?", False, True),
            ("   leading and trailing   ", False, False),
        ],
        # SmolLM2's own template adds this system turn when there is none.
        "chat": lambda q: (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
            "Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        ),
        "ends": ("<|im_end|>", "<|endoftext|>"),
    },
}


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: make-llamacpp-fixture.py {{{'|'.join(FAMILIES)}}}")
    family = sys.argv[1]
    spec = FAMILIES[family]
    MODEL = spec["model"]
    OUT = f"models/tests/fixtures/{family}_tokens.json"
    chat = spec["chat"]
    if not os.path.isfile(MODEL):
        sys.exit(f"{MODEL} is missing: run scripts/fetch-models.sh first")

    vocab = Llama(model_path=MODEL, vocab_only=True, verbose=False)
    tokens = []
    cases = [(t, True, True) for t in CORPUS + spec["corpus"]] + spec["extra"]
    for text, add_bos, special in cases:
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)
        tokens.append({"text": text, "add_bos": add_bos, "special": special, "ids": ids})

    def context(**sizes):
        return Llama(
            model_path=MODEL, n_threads=2, seed=0, logits_all=False, verbose=False, **sizes
        )

    llm = context(n_ctx=256, n_batch=256)
    ends = {
        vocab.tokenize(t.encode(), add_bos=False, special=True)[0]
        for t in spec["ends"]
    }
    greedy = []
    # The long prompts run on a context that holds them whole, evaluated in one pass
    # (n_batch = n_ubatch), as the tests feed them.
    llm_long = context(n_ctx=2048, n_batch=1024, n_ubatch=1024)
    for question, ctx in [(q, llm) for q in PROMPTS] + [(q, llm_long) for q in LONG_PROMPTS]:
        prompt = chat(question)
        ids = ctx.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        ctx.reset()
        ctx.eval(ids)
        out, margins, top = [], [], None
        for _ in range(STEPS):
            # The last evaluated token's logits (llama-cpp-python keeps `scores` only
            # with logits_all).
            logits = np.ctypeslib.as_array(
                ctx._ctx.get_logits_ith(-1), shape=(ctx.n_vocab(),)
            ).astype(np.float32)
            top2 = np.argpartition(-logits, 2)[:2]
            top2 = top2[np.argsort(-logits[top2])]
            best = int(top2[0])
            margins.append(round(float(logits[top2[0]] - logits[top2[1]]), 4))
            if top is None:
                best20 = np.argsort(-logits)[:20]
                top = [[int(i), round(float(logits[i]), 5)] for i in best20]
            out.append(best)
            if best in ends:
                break
            ctx.eval([best])
        text = ctx.detokenize([t for t in out if t not in ends]).decode("utf-8", "replace")
        greedy.append(
            {
                "question": question,
                "prompt": prompt,
                "prompt_ids": ids,
                "ids": out,
                "margins": margins,
                "top_logits": top,
                "text": text,
            }
        )
        print(f"{question[-60:]!r} ({len(ids)} ids) -> {text!r}", file=sys.stderr)

    del llm_long
    del llm
    scorer = Llama(
        model_path=MODEL,
        n_ctx=512,
        n_batch=512,
        n_threads=2,
        seed=0,
        logits_all=True,
        verbose=False,
    )
    ids = scorer.tokenize(LOGLIK_TEXT.encode("utf-8"), add_bos=True, special=False)
    scorer.reset()
    scorer.eval(ids)
    scores = np.array(scorer.scores[: len(ids)], dtype=np.float64)
    logprobs = []
    for i in range(1, len(ids)):
        row = scores[i - 1]
        top = row.max()
        lse = top + np.log(np.exp(row - top).sum())
        logprobs.append(round(float(row[ids[i]] - lse), 6))
    loglik = {
        "text": LOGLIK_TEXT,
        "ids": ids,
        "logprobs": logprobs,
        "mean": float(np.mean(logprobs)),
    }
    print(f"mean log-likelihood {loglik['mean']:.5f} over {len(logprobs)} tokens", file=sys.stderr)

    fixture = {
        "model": os.path.basename(MODEL),
        "generator": f"llama-cpp-python {llama_cpp.__version__}, scripts/make-llamacpp-fixture.py {family}",
        "tokens": tokens,
        "greedy": greedy,
        "loglik": loglik,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
