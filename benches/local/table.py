#!/usr/bin/env python3
"""Prints one Markdown table of the local inference benchmark: Airlock and the baseline
side by side, with the ratio, from the JSON files of one run.

    python3 table.py AIRLOCK_JSON [LLAMACPP_JSON] [ST_JSON]

Standard library only. Ratio: Airlock's speed over the baseline's, for every row
(for time to first token, baseline time / Airlock time), so above 1 = Airlock faster.
"""

import json
import sys


def load(path):
    if not path:
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def fmt(v, digits=1):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def ratio(a, b, higher_is_better=True):
    if not a or not b:
        return "n/a"
    return f"{(a / b if higher_is_better else b / a):.2f}x"


def main():
    airlock = load(sys.argv[1])
    llama = load(sys.argv[2] if len(sys.argv) > 2 else None)
    st = load(sys.argv[3] if len(sys.argv) > 3 else None)
    for side in (llama, st):
        if side and side.get("plan_name") != airlock.get("plan_name"):
            sys.exit("table: the JSON files come from different plans (--quick and full)")
        if side and side.get("threads") != airlock.get("threads"):
            sys.exit("table: the JSON files were measured with different thread counts")

    base_chat = {m["model"]: m for m in llama.get("chat", [])}
    rows = []
    notes = []
    for m in airlock.get("chat", []):
        name = m["model"]
        if m.get("status") != "ok":
            notes.append(f"{name}: skipped ({m.get('note', '')})")
            continue
        b = base_chat.get(name, {})
        base = llama.get("engine", "llama.cpp")
        rows.append((name, "load (s)", fmt(m["load_s"], 2), fmt(b.get("load_s"), 2), base,
                     ratio(m["load_s"], b.get("load_s"), higher_is_better=False)))
        if m.get("prompt_mean_loglik") is not None and b.get("kernels"):
            k = b["kernels"]
            theirs = k["loglik_with_extra_bufts" if k["extra_bufts"] else "loglik_without_extra_bufts"]
            ours = m["prompt_mean_loglik"]
            rows.append((name, f"mean log-likelihood of the {m['prompt_tokens']}-token prompt "
                         "(nats/token; same model = same figure)", f"{ours:.4f}", f"{theirs:.4f}",
                         base, f"{100 * abs(ours - theirs) / abs(theirs):.2f}% apart"))
        rows.append((name, f"time to first token, {m['prompt_tokens']}-token prompt (ms, median)",
                     fmt(m["ttft_ms_median"]), fmt(b.get("ttft_ms_median")), base,
                     ratio(m["ttft_ms_median"], b.get("ttft_ms_median"), higher_is_better=False)))
        rows.append((name, "decode tok/s, 1 stream",
                     fmt(m["decode_tokens_per_s"]), fmt(b.get("decode_tokens_per_s")), base,
                     ratio(m["decode_tokens_per_s"], b.get("decode_tokens_per_s"))))
        bs = {s["n"]: s for s in b.get("streams", [])}
        for s in m["streams"]:
            bn = bs.get(s["n"], {})
            rows.append((name, f"aggregate tok/s, {s['n']} concurrent stream{'s' if s['n'] > 1 else ''}",
                         fmt(s["tokens_per_s"]), fmt(bn.get("tokens_per_s")), base,
                         ratio(s["tokens_per_s"], bn.get("tokens_per_s"))))
        for s in m["streams"]:
            bn = bs.get(s["n"], {})
            rows.append((name, f"decode-only aggregate tok/s, {s['n']} concurrent stream{'s' if s['n'] > 1 else ''}",
                         fmt(s.get("decode_tokens_per_s")), fmt(bn.get("decode_tokens_per_s")), base,
                         ratio(s.get("decode_tokens_per_s"), bn.get("decode_tokens_per_s"))))
    e = airlock.get("embedding") or {}
    if e:
        be = st.get("embedding") or {}
        base = st.get("engine", "sentence-transformers")
        for batch in (1, 32):
            key = f"batch{batch}_per_s"
            rows.append((e["model"], f"embeddings/s, batch {batch} ({e['sentences']} sentences, "
                         f"{e['mean_tokens']:.1f} tokens avg)",
                         fmt(e[key]), fmt(be.get(key)), base, ratio(e[key], be.get(key))))

    print(f"Threads: {airlock.get('threads')} (Airlock: RAYON_NUM_THREADS={airlock.get('rayon_num_threads')}; "
          f"llama.cpp: n_threads; torch: set_num_threads). Plan: {airlock.get('plan_name')}.")
    print()
    print("| model | measure | Airlock | baseline | baseline engine | Airlock vs baseline (>1 = Airlock faster) |")
    print("|---|---|--:|--:|---|--:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print("How busy the machine was (load average 1/5/15 min before -> after; CPU share = "
          "process CPU time / (wall time x threads)):")
    print()
    for label, side in (("Airlock", airlock), ("llama.cpp", llama), ("sentence-transformers", st)):
        if side:
            share = (side["cpu_s"] / (side["wall_s"] * side["threads"])
                     if side.get("cpu_s") and side.get("wall_s") else None)
            print(f"- {label}: load {side.get('load_average_before')} -> "
                  f"{side.get('load_average_after')}; CPU share {fmt(share and 100 * share, 0)}% "
                  f"over {fmt(side.get('wall_s'), 0)} s")
    for n in notes:
        print(f"\nNote: {n}")
    for m in llama.get("chat", []):
        k = m.get("kernels")
        if k:
            chosen = ("its default kernels (extra buffer types on)" if k["extra_bufts"] else
                      "use_extra_bufts = false: its default kernels compute another model here")
            print(f"\nllama.cpp on {m['model']}: {chosen}. Mean log-likelihood of the prompt, "
                  f"nats/token: {k['loglik_with_extra_bufts']:.4f} with extra buffer types, "
                  f"{k['loglik_without_extra_bufts']:.4f} without.")
    if llama.get("system_info"):
        print(f"\nllama.cpp build on this CPU: {llama['system_info']}")
    if llama.get("concurrency"):
        print(f"\nllama.cpp concurrency: {llama['concurrency']}. Airlock: N requests submitted at once "
              "to one engine with max_batch = N: each on its own KV cache, all of them run "
              "in one batched forward pass per step (continuous batching).")


if __name__ == "__main__":
    main()
