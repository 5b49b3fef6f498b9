#!/usr/bin/env python3
"""The local inference benchmark's baselines, measured like airlock-bench-local does.

    python baseline.py llama --threads T --gguf FILE... [--quick] --json OUT
    python baseline.py st --threads T --embedding DIR [--quick] --json OUT

`llama` needs llama-cpp-python (scripts/llamacpp-venv.sh), `st` sentence-transformers;
they live in different venvs, so each subcommand imports only its own library.
The plan (runs, token counts), the prompt text and the sentences are the Rust side's:
benches/local/data/.

llama.cpp: one `Llama(model_path, n_threads=T, n_ctx=512, verbose=False)`; the prompt is
the text tokenized by llama.cpp itself (BOS as the model asks) and cut to 256 tokens;
greedy through `Llama.generate(temp=0, repeat_penalty=1.0)` with the KV cache reset
before each request (no prefix reuse), ending at max tokens or an end-of-generation
token. Concurrency: llama-cpp-python has no in-process batching, so N streams run in N
Python threads, one `Llama` each with n_threads = max(1, T // N) (the total stays at T
threads where N <= T); ctypes releases the GIL during llama.cpp calls, so they overlap.

Which llama.cpp runs: its default, unless that gives other answers. llama.cpp moves
weights to "extra" buffer types where the CPU has them (AMX on Intel Xeons with
AMX-INT8, its x86/ARM repacks elsewhere), with kernels of their own. Before timing, each
model's mean log-likelihood of the prompt (every position's logits) is computed with the
default and with `use_extra_bufts = false`; where the two are more than 1% apart, the
default's kernels are wrong on this machine and the timings use the plain CPU kernels
(both figures are in the JSON and the table). Seen on an AMX Xeon with llama-cpp-python
0.3.16: SmolLM2's Q4_1 weights in AMX buffers give -5.86 nats/token where the plain
kernels and every other machine give -3.67, and other greedy text on every fixture
prompt (upstream: ggml-org/llama.cpp#16315, "The AMX backend produces garbage with Q4_0
and Q4_1"); Gemma 3's K-quants in AMX buffers agree within 0.2%.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
N_CTX = 512
# Mean log-likelihoods further apart than this: the two llama.cpp configurations do not
# compute the same model.
LOGLIK_TOLERANCE = 0.01


def log(msg):
    print(f"baseline: {msg}", file=sys.stderr, flush=True)


def load_plan(quick):
    with open(os.path.join(DATA, "plan.json")) as f:
        return json.load(f)["quick" if quick else "full"]


def read(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return f.read()


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def median(values):
    return statistics.median(values) if values else 0.0


# --- llama.cpp ------------------------------------------------------------------------


@contextlib.contextmanager
def extra_bufts(enabled):
    """Models loaded inside get `use_extra_bufts = enabled` (llama-cpp-python 0.3.16's
    `Llama` has no argument for it: it starts from `llama_model_default_params()`)."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = enabled
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def mean_loglik(path, threads, ids, extra):
    """llama.cpp's mean log-probability per token of `ids[1:]` (natural log)."""
    import numpy as np
    from llama_cpp import Llama

    with extra_bufts(extra):
        m = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=N_CTX,
                  n_batch=N_CTX, logits_all=True, verbose=False)
    try:
        m.reset()
        m.eval(ids)
        scores = np.array(m.scores[: len(ids) - 1], dtype=np.float64)
    finally:
        m.close()
    top = scores.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    picked = scores[np.arange(len(ids) - 1), ids[1:]]
    return float((picked - logz).mean())


def choose_extra_bufts(path, threads, ids):
    """Whether to time llama.cpp with its extra buffer types, and the evidence."""
    with_extra = mean_loglik(path, threads, ids, True)
    plain = mean_loglik(path, threads, ids, False)
    apart = abs(with_extra - plain) / abs(plain)
    ok = apart <= LOGLIK_TOLERANCE
    log(f"{os.path.basename(path)}: mean log-likelihood of the prompt {with_extra:.4f} with "
        f"extra buffer types, {plain:.4f} without ({100 * apart:.2f}% apart): timing "
        f"{'the default' if ok else 'without them (the default computes another model here)'}")
    return ok, {"extra_bufts": ok, "loglik_with_extra_bufts": with_extra,
                "loglik_without_extra_bufts": plain}


def llama_bench(args, plan):
    import llama_cpp
    from llama_cpp import Llama

    text = read("prompt.txt")
    results = []
    for path in args.gguf:
        name = os.path.basename(path)
        vocab = Llama(model_path=path, vocab_only=True, verbose=False)
        prompt = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        vocab.close()
        if len(prompt) < plan["prompt_tokens"]:
            sys.exit(f"the prompt text is only {len(prompt)} tokens for {name}")
        prompt = prompt[: plan["prompt_tokens"]]
        extra, kernels = choose_extra_bufts(path, args.threads, prompt)

        def load(threads):
            with extra_bufts(extra):
                return Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                             n_ctx=N_CTX, n_batch=N_CTX, verbose=False)

        log(f"loading {path}")
        started = time.perf_counter()
        llm = load(args.threads)
        load_s = time.perf_counter() - started

        def run(model, max_tokens, start):
            """(first token s, done s, tokens), times from start."""
            model.reset()  # no prefix reuse: every request pays its prefill
            first = None
            n = 0
            for token in model.generate(prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                        repeat_penalty=1.0, reset=True):
                n += 1
                if first is None:
                    first = time.perf_counter() - start
                if n >= max_tokens or llama_cpp.llama_token_is_eog(model._model.vocab, token):
                    break
            done = time.perf_counter() - start
            return first if first is not None else done, done, n

        run(llm, 8, time.perf_counter())  # warm-up
        ttft_ms = []
        for _ in range(plan["ttft_runs"]):
            first, _, _ = run(llm, 1, time.perf_counter())
            ttft_ms.append(first * 1e3)
        log(f"{name}: TTFT runs (ms) {[round(t, 1) for t in ttft_ms]}")

        rates, counts = [], []
        for _ in range(plan["decode_runs"]):
            first, done, n = run(llm, plan["decode_tokens"], time.perf_counter())
            if n > 1 and done > first:
                rates.append((n - 1) / (done - first))
            counts.append(n)

        streams = []
        for n_streams in plan["streams"]:
            per = max(1, args.threads // n_streams)
            if n_streams == 1:
                models = [llm]
            else:
                models = [load(per) for _ in range(n_streams)]
                for m in models:
                    run(m, 2, time.perf_counter())  # warm each instance
            out = [None] * n_streams
            barrier = threading.Barrier(n_streams + 1)

            def worker(i):
                barrier.wait()
                out[i] = run(models[i], plan["stream_tokens"], start_box[0])

            start_box = [0.0]
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_streams)]
            for t in threads:
                t.start()
            start_box[0] = time.perf_counter()
            barrier.wait()
            for t in threads:
                t.join()
            tokens = sum(o[2] for o in out)
            wall = max(o[1] for o in out)
            rate = tokens / wall if wall > 0 else 0.0
            # Decode only: tokens after each stream's first one, from the first
            # stream's first token to the last stream's end (as benches/local/src/chat.rs).
            after_first = sum(max(0, o[2] - 1) for o in out)
            decode_s = wall - min(o[0] for o in out)
            decode_rate = after_first / decode_s if decode_s > 0 else 0.0
            log(f"{name}: {n_streams} streams ({n_streams} Llama x {per} threads): "
                f"{tokens} tokens in {wall:.2f} s = {rate:.1f} tok/s; decode only "
                f"{after_first} tokens in {decode_s:.2f} s = {decode_rate:.1f} tok/s")
            streams.append({"n": n_streams, "tokens": tokens, "wall_s": wall,
                            "tokens_per_s": rate, "decode_tokens": after_first,
                            "decode_s": decode_s, "decode_tokens_per_s": decode_rate,
                            "threads_per_stream": per,
                            "first_token_ms": [o[0] * 1e3 for o in out]})
            if n_streams != 1:
                for m in models:
                    m.close()

        results.append({
            "model": name, "status": "ok", "load_s": load_s, "prompt_tokens": len(prompt),
            "kernels": kernels,
            "ttft_ms_runs": ttft_ms, "ttft_ms_median": median(ttft_ms),
            "decode_tokens": counts, "decode_tokens_per_s_runs": rates,
            "decode_tokens_per_s": median(rates), "streams": streams,
        })
        llm.close()
    return {
        "engine": f"llama-cpp-python {llama_cpp.__version__}",
        "concurrency": "N Python threads, one Llama each with n_threads = max(1, T // N)",
        # What this build of llama.cpp uses on this CPU (AVX512_VNNI, AMX_INT8, ...):
        # the kernels differ between machines, so every table says which ran.
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "n_ctx": N_CTX,
        "chat": results,
    }


# --- sentence-transformers -------------------------------------------------------------


def st_bench(args, plan):
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    log(f"loading {args.embedding}")
    started = time.perf_counter()
    model = SentenceTransformer(args.embedding, device="cpu")
    load_s = time.perf_counter() - started
    sentences = read("sentences.txt").splitlines()[: plan["embed_sentences"]]
    tokens = sum(len(model.tokenizer(s)["input_ids"]) for s in sentences)

    def encode(batch):
        model.encode(batch, batch_size=32, show_progress_bar=False, convert_to_numpy=True)

    encode(sentences[:1])
    encode(sentences[:32])

    def rate(batch, passes):
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(passes):
                for i in range(0, len(sentences), batch):
                    encode(sentences[i:i + batch])
        return passes * len(sentences) / (time.perf_counter() - start)

    batch1 = rate(1, plan["batch1_passes"])
    batch32 = rate(32, plan["batch32_passes"])
    log(f"{os.path.basename(args.embedding)}: {batch1:.1f}/s at batch 1, {batch32:.1f}/s at batch 32")
    return {
        "engine": f"sentence-transformers {sentence_transformers.__version__} "
                  f"(torch {torch.__version__})",
        "torch_threads": torch.get_num_threads(),
        "embedding": {
            "model": os.path.basename(os.path.normpath(args.embedding)), "load_s": load_s,
            "sentences": len(sentences), "mean_tokens": tokens / max(1, len(sentences)),
            "batch1_per_s": batch1, "batch32_per_s": batch32,
        },
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["llama", "st"])
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--gguf", action="append", default=[])
    p.add_argument("--embedding")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    plan = load_plan(args.quick)
    started, before = time.perf_counter(), load_average()
    if args.what == "llama":
        out = llama_bench(args, plan)
    else:
        if not args.embedding:
            p.error("st needs --embedding")
        out = st_bench(args, plan)
    cpu = os.times()
    out.update({"threads": args.threads, "plan_name": "quick" if args.quick else "full",
                "load_average_before": before, "load_average_after": load_average(),
                "wall_s": time.perf_counter() - started, "cpu_s": cpu.user + cpu.system})
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
