//! Local models through the real binary: registration (config, admin API, CLI), chat,
//! streaming, completions, sampling semantics, and every refusal with its code, on the
//! real SmolLM2-135M file (`scripts/fetch-models.sh` puts it in `.cache/models`).

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use airlock_e2e::gateway::{run_airlock, wait_until, workspace_root, Gateway};
use airlock_e2e::mock::MockUpstream;
use airlock_e2e::sse::SseTranscript;
use serde_json::{json, Value};

const SMOL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn smol() -> PathBuf {
    let p = workspace_root().join(SMOL);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

fn local_section(extra: &str, models: &[(&str, &Path)]) -> String {
    let mut s = format!("[local]\n{extra}\n");
    for (name, path) in models {
        s.push_str(&format!(
            "\n[[local.models]]\nname = \"{name}\"\npath = \"{}\"\n",
            path.display()
        ));
    }
    s
}

async fn gateway(extra: &str) -> Gateway {
    Gateway::builder()
        .raw(&local_section(extra, &[("smol", &smol())]))
        .start()
        .await
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "local/smol",
        "messages": [{"role": "user", "content": content}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_and_non_stream_agree_with_exact_usage() {
    let gw = gateway("").await;
    let req = chat(
        "Name three colours.",
        json!({"temperature": 0, "max_tokens": 20}),
    );
    let plain = gw.post_json("/v1/chat/completions", &req).await;
    let body = plain.expect_status(200);
    let text = text_of(&body);
    assert!(!text.is_empty());
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 20);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(usage["tokens_per_second"].as_f64().unwrap() > 0.0);
    assert!(usage["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        plain.header("x-airlock-target"),
        Some("local/smol"),
        "served by the local target"
    );

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let t = SseTranscript::read(gw.post_stream("/v1/chat/completions", &sreq).await).await;
    assert!(t.done_is_last(), "{:?}", t.payloads());
    assert_eq!(t.text(), text, "streaming gives the same text");
    assert_eq!(t.finish_reason().as_deref(), Some("length"));
    let u = t.usage_chunks();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0]["usage"]["completion_tokens"], 20);
    assert_eq!(u[0]["usage"]["prompt_tokens"], usage["prompt_tokens"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_text_and_n_choices() {
    let gw = gateway("").await;
    let req = chat(
        "Write a short line about the sea.",
        json!({"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 16, "n": 2}),
    );
    let a = gw
        .post_json("/v1/chat/completions", &req)
        .await
        .expect_status(200);
    let b = gw
        .post_json("/v1/chat/completions", &req)
        .await
        .expect_status(200);
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    for i in 0..2 {
        assert_eq!(
            a["choices"][i]["message"]["content"], b["choices"][i]["message"]["content"],
            "choice {i}: same seed, same text"
        );
    }
    assert_eq!(
        a["usage"]["completion_tokens"].as_u64().unwrap(),
        a["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| if c["finish_reason"] == "length" {
                16
            } else {
                0
            })
            .sum::<u64>()
            .max(a["usage"]["completion_tokens"].as_u64().unwrap().min(32)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_split_across_tokens_are_caught_and_never_leak() {
    let gw = gateway("").await;
    let base = chat(
        "Count from one to ten in words.",
        json!({"temperature": 0, "max_tokens": 40}),
    );
    let full = text_of(
        &gw.post_json("/v1/chat/completions", &base)
            .await
            .expect_status(200),
    );
    // A stop string made of the end of one word and the start of the next spans at
    // least two tokens.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 12, "{full:?}");
    let space = chars[4..].iter().position(|c| *c == ' ').unwrap() + 4;
    let stop: String = chars[space - 2..space + 3].iter().collect();
    let before: String = chars[..space - 2].iter().collect();
    assert!(full.starts_with(&format!("{before}{stop}")));

    let mut req = base.clone();
    req["stop"] = json!([stop]);
    let body = gw
        .post_json("/v1/chat/completions", &req)
        .await
        .expect_status(200);
    assert_eq!(
        text_of(&body),
        before,
        "text up to the stop string, stop: {stop:?}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    req["stream"] = json!(true);
    let t = SseTranscript::read(gw.post_stream("/v1/chat/completions", &req).await).await;
    assert_eq!(t.text(), before);
    assert!(!t.text().contains(&stop));
    assert_eq!(t.finish_reason().as_deref(), Some("stop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions_plain_streamed_and_echoed() {
    let gw = gateway("").await;
    let req = json!({"model": "local/smol", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 8});
    let body = gw
        .post_json("/v1/completions", &req)
        .await
        .expect_status(200);
    assert_eq!(body["object"], "text_completion");
    let text = body["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert_eq!(body["usage"]["completion_tokens"], 8);

    let mut s = req.clone();
    s["stream"] = json!(true);
    let t = SseTranscript::read(gw.post_stream("/v1/completions", &s).await).await;
    assert!(t.done_is_last());
    assert_eq!(t.text(), text);

    let mut e = req.clone();
    e["echo"] = json!(true);
    let echoed = gw.post_json("/v1/completions", &e).await.expect_status(200);
    assert_eq!(
        echoed["choices"][0]["text"].as_str().unwrap(),
        format!("The capital of France is{text}")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_their_codes() {
    let gw = gateway("").await;
    // Context overflow: never truncated.
    gw.post_json(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 100_000})),
    )
    .await
    .expect_error(400, "context_length_exceeded");
    // Unknown local model.
    let mut req = chat("hi", json!({}));
    req["model"] = json!("local/nope");
    gw.post_json("/v1/chat/completions", &req)
        .await
        .expect_error(404, "model_not_found");
    // Parameters out of range, unsupported features.
    for (extra, param) in [
        (json!({"temperature": 3.5}), "temperature"),
        (json!({"logit_bias": {"99999999": 5}}), "logit_bias"),
        (json!({"n": 50}), "n"),
        (json!({"top_k": -1}), "top_k"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            "tools",
        ),
    ] {
        let r = gw
            .post_json("/v1/chat/completions", &chat("hi", extra.clone()))
            .await;
        assert!(
            r.status == 400,
            "{extra}: expected 400, got {} {}",
            r.status,
            r.text
        );
        assert!(r.text.contains(param), "{extra}: {}", r.text);
    }
    // A chat model asked for embeddings.
    gw.post_json(
        "/v1/embeddings",
        &json!({"model": "local/smol", "input": "hello"}),
    )
    .await
    .expect_error(400, "invalid_value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_retry_after() {
    let gw = gateway("queue_capacity = 1\nmax_batch = 1").await;
    // Warm up (load) first so the burst measures the queue, not the loader.
    gw.post_json(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 1})),
    )
    .await
    .expect_status(200);
    let long = chat(
        "Tell me a long story.",
        json!({"max_tokens": 48, "temperature": 0}),
    );
    let replies =
        futures::future::join_all((0..6).map(|_| gw.post_json("/v1/chat/completions", &long)))
            .await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<_> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        ok >= 1,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "some of 6 must be refused with a queue of 1"
    );
    assert_eq!(ok + refused.len(), 6);
    for r in refused {
        r.expect_error(429, "model_overloaded");
        assert!(r.header("retry-after").is_some());
    }
}

async fn queue_depth(gw: &Gateway, id: &str) -> u64 {
    let models = gw.get("/v1/models").await.expect_status(200);
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| m["local"]["queue_depth"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("{id} not in {models}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot() {
    let gw = gateway("queue_capacity = 1\nmax_batch = 1").await;
    let mut req = chat(
        "Write a very long essay about rivers.",
        json!({"max_tokens": 3000, "temperature": 0, "stream": true}),
    );
    req["stream"] = json!(true);
    let resp = gw.post_stream("/v1/chat/completions", &req).await;
    assert_eq!(resp.status(), 200);
    let mut reader = airlock_e2e::sse::SseReader::new(resp);
    for _ in 0..3 {
        reader.next_event().await.expect("an event");
    }
    assert_eq!(queue_depth(&gw, "local/smol").await, 1);
    drop(reader);
    // 3000 tokens would take minutes; the slot is free at the next step.
    let mut depth = 1;
    wait_until(Duration::from_secs(30), || {
        depth = futures::executor::block_on(queue_depth(&gw, "local/smol"));
        depth == 0
    })
    .await;
    assert_eq!(depth, 0, "the cancelled request left the queue");
    gw.post_json(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 2})),
    )
    .await
    .expect_status(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_list_shows_local_state_and_ready_waits_for_preload() {
    let gw = gateway("preload = [\"smol\"]").await;
    let mut ready = false;
    for _ in 0..600 {
        if gw.get("/ready").await.status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "/ready once the preloaded model is in");
    let models = gw.get("/v1/models").await.expect_status(200);
    let m = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "local/smol")
        .unwrap()
        .clone();
    assert_eq!(m["owned_by"], "local");
    assert_eq!(m["local"]["state"], "loaded");
    assert_eq!(m["local"]["kind"], "chat");
    assert_eq!(m["local"]["architecture"], "llama");
    assert!(m["local"]["context_length"].as_u64().unwrap() >= 2048);
    assert_eq!(m["local"]["queue_depth"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_registers_and_a_changed_file_is_refused() {
    let gw = Gateway::builder().raw("[local]\n").start().await;
    let copy = gw.dir().join("copy.gguf");
    std::fs::copy(smol(), &copy).unwrap();
    let reg = gw
        .post_json("/admin/models", &json!({"path": copy, "name": "copy"}))
        .await
        .expect_status(201);
    assert_eq!(reg["id"], "local/copy");
    assert_eq!(reg["files"][0]["sha256"].as_str().unwrap().len(), 64);
    // Same name again: conflict unless replace.
    gw.post_json("/admin/models", &json!({"path": copy, "name": "copy"}))
        .await
        .expect_error(409, "conflict");
    let listed = gw.get("/admin/models").await.expect_status(200);
    assert_eq!(listed["data"][0]["state"], "not_loaded");

    // Flip one byte in the middle (same size, other hash).
    let mut bytes = std::fs::read(&copy).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&copy, bytes).unwrap();
    let mut req = chat("hi", json!({"max_tokens": 2}));
    req["model"] = json!("local/copy");
    let err = gw
        .post_json("/v1/chat/completions", &req)
        .await
        .expect_error(503, "model_file_changed");
    assert!(err["message"].as_str().unwrap().contains("changed since"));

    // Remove: gone from the API and from routing.
    gw.get("/admin/models/copy").await.expect_status(200);
    let del = gw
        .client()
        .delete(gw.url("/admin/models/copy"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    gw.get("/admin/models/copy")
        .await
        .expect_error(404, "not_found");
    gw.post_json("/v1/chat/completions", &req)
        .await
        .expect_error(404, "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_weights_are_refused_with_clear_errors() {
    let gw = Gateway::builder().raw("[local]\n").start().await;
    // Not a model at all.
    let junk = gw.dir().join("junk.gguf");
    std::fs::write(&junk, b"definitely not weights").unwrap();
    let e = gw
        .post_json("/admin/models", &json!({"path": junk, "name": "junk"}))
        .await
        .expect_error(400, "invalid_model");
    assert!(e["message"].as_str().unwrap().contains("junk.gguf"));
    // A missing file, and a bad name.
    gw.post_json(
        "/admin/models",
        &json!({"path": gw.dir().join("missing.gguf"), "name": "m"}),
    )
    .await
    .expect_error(400, "invalid_model");
    gw.post_json("/admin/models", &json!({"path": smol(), "name": "../x"}))
        .await
        .expect_error(400, "invalid_value");
    // A truncated copy: the header reads, the weights do not.
    let cut = gw.dir().join("cut.gguf");
    let bytes = std::fs::read(smol()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    gw.post_json("/admin/models", &json!({"path": cut, "name": "cut"}))
        .await
        .expect_status(201);
    let mut req = chat("hi", json!({"max_tokens": 2}));
    req["model"] = json!("local/cut");
    gw.post_json("/v1/chat/completions", &req)
        .await
        .expect_error(503, "model_load_failed");
    // The process lives on and serves the good model.
    assert!(gw.get("/health").await.status == 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_registers_offline_and_through_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap();
    let smol = smol();
    let out = run_airlock(
        &[
            "models",
            "register",
            smol.to_str().unwrap(),
            "--name",
            "smol",
            "--data-dir",
            data_s,
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("registered local/smol"));
    let out = run_airlock(&["models", "list", "--data-dir", data_s], &[]).await;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("local/smol") && listed.contains("llama"),
        "{listed}"
    );
    let out = run_airlock(&["models", "show", "nope", "--data-dir", data_s], &[]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no local model named `nope`"));

    // With a server holding the store, the CLI goes through its admin API.
    let gw =
        Gateway::start_with_args(&Gateway::builder().toml(), &[], &["--data-dir", data_s]).await;
    let url = gw.base_url();
    let out = run_airlock(
        &[
            "models",
            "register",
            smol.to_str().unwrap(),
            "--name",
            "second",
            "--data-dir",
            data_s,
            "--url",
            &url,
            "--key",
            gw.key(),
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let mut req = chat("hi", json!({"max_tokens": 2}));
    req["model"] = json!("local/second");
    gw.post_json("/v1/chat/completions", &req)
        .await
        .expect_status(200);
    let out = run_airlock(
        &[
            "models",
            "list",
            "--data-dir",
            data_s,
            "--url",
            &url,
            "--key",
            gw.key(),
        ],
        &[],
    )
    .await;
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listed.contains("local/second") && listed.contains("loaded"),
        "{listed}"
    );
    let out = run_airlock(
        &[
            "models",
            "remove",
            "smol",
            "--data-dir",
            data_s,
            "--url",
            &url,
            "--key",
            gw.key(),
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    gw.get("/admin/models/smol")
        .await
        .expect_error(404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_unload_and_the_memory_budget_evicts_the_least_recent() {
    let smol = smol();
    // Two names for the same 94 MiB file; a budget that fits one.
    let gw = Gateway::builder()
        .raw(&local_section(
            "memory_budget_mb = 150\nkeep_alive = 2",
            &[("a", &smol), ("b", &smol)],
        ))
        .start()
        .await;
    let state = |id: &'static str| {
        let gw = &gw;
        async move {
            let models = gw.get("/v1/models").await.expect_status(200);
            models["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["id"] == id)
                .unwrap()["local"]["state"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let ask = |model: &str| {
        let mut r = chat("hi", json!({"max_tokens": 1}));
        r["model"] = json!(model);
        r
    };
    gw.post_json("/v1/chat/completions", &ask("local/a"))
        .await
        .expect_status(200);
    assert_eq!(state("local/a").await, "loaded");
    gw.post_json("/v1/chat/completions", &ask("local/b"))
        .await
        .expect_status(200);
    assert_eq!(state("local/b").await, "loaded");
    assert_eq!(state("local/a").await, "not_loaded", "evicted for b");
    // keep_alive = 2 s after the last request ended; the reaper runs every 5 s.
    let mut gone = false;
    for _ in 0..30 {
        if state("local/b").await == "not_loaded" {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(gone, "b unloads after keep_alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_local_target_spills_over_to_a_provider() {
    let mock = MockUpstream::openai().await;
    let gw = Gateway::builder()
        .provider("cloud", &mock)
        .raw(&format!(
            "[[models]]\nname = \"assistant\"\nstrategy = \"priority\"\nlocal_first = true\ntargets = [\"cloud/gpt-4o-mini\", \"local/smol\"]\n\n{}",
            local_section("queue_capacity = 1\nmax_batch = 1", &[("smol", &smol())])
        ))
        .start()
        .await;
    let req = json!({"model": "assistant", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32, "temperature": 0});
    // Load first.
    let first = gw.post_json("/v1/chat/completions", &req).await;
    first.expect_status(200);
    assert_eq!(
        first.header("x-airlock-target"),
        Some("local/smol"),
        "local first"
    );
    let replies =
        futures::future::join_all((0..5).map(|_| gw.post_json("/v1/chat/completions", &req))).await;
    let mut targets: Vec<String> = replies
        .iter()
        .map(|r| {
            r.expect_status(200);
            r.header("x-airlock-target").unwrap().to_string()
        })
        .collect();
    targets.sort();
    assert!(targets.iter().any(|t| t == "local/smol"), "{targets:?}");
    assert!(
        targets.iter().any(|t| t == "cloud/gpt-4o-mini"),
        "a full local queue spills to the provider: {targets:?}"
    );
}

const MINILM: &str = ".cache/models/all-MiniLM-L6-v2";

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_sentence_transformers_through_the_gateway() {
    let dir = workspace_root().join(MINILM);
    assert!(
        dir.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        dir.display()
    );
    let gw = Gateway::builder()
        .raw(&local_section("", &[("minilm", &dir)]))
        .start()
        .await;
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            workspace_root().join("models/tests/fixtures/minilm_reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // OpenAI's API refuses empty strings; the gateway does too.
    let sentences: Vec<Value> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["text"] != "")
        .cloned()
        .collect();
    let inputs: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let body = gw
        .post_json(
            "/v1/embeddings",
            &json!({"model": "local/minilm", "input": inputs}),
        )
        .await
        .expect_status(200);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), sentences.len());
    for (i, s) in sentences.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        let got = floats(&data[i]["embedding"]);
        assert_eq!(got.len(), 384);
        let c = cosine(&got, &floats(&s["embedding"]));
        assert!(c >= 0.999, "sentence {i}: cosine {c}");
    }
    let tokens: u64 = sentences
        .iter()
        .map(|s| s["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens, "exact token usage");

    // Registered models list as embedding models; a too-long input is refused.
    let models = gw.get("/v1/models").await.expect_status(200);
    let m = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "local/minilm")
        .unwrap()
        .clone();
    assert_eq!(m["local"]["kind"], "embedding");
    let long = "word ".repeat(600);
    gw.post_json(
        "/v1/embeddings",
        &json!({"model": "local/minilm", "input": long}),
    )
    .await
    .expect_error(400, "context_length_exceeded");
    gw.post_json(
        "/v1/embeddings",
        &json!({"model": "local/minilm", "input": "x", "dimensions": 10}),
    )
    .await
    .expect_error(400, "invalid_value");
    gw.post_json(
        "/v1/chat/completions",
        &json!({"model": "local/minilm", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .expect_error(400, "invalid_value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_describe_the_generated_tokens() {
    let gw = gateway("").await;
    let req = chat(
        "Say hello.",
        json!({"temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 3}),
    );
    let body = gw
        .post_json("/v1/chat/completions", &req)
        .await
        .expect_status(200);
    let text = text_of(&body);
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap()
            - u64::from(body["choices"][0]["finish_reason"] == "stop")
    );
    let joined: String = content
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text, "the tokens spell the answer");
    for e in content {
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], e["token"]);
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        assert!(top[0]["logprob"].as_f64() >= top[1]["logprob"].as_f64());
        assert!(!e["bytes"].as_array().unwrap().is_empty());
    }

    let mut s = req.clone();
    s["stream"] = json!(true);
    let t = SseTranscript::read(gw.post_stream("/v1/chat/completions", &s).await).await;
    let streamed: Vec<Value> = t
        .chunks()
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&streamed, content, "streamed logprobs equal the unary ones");

    let legacy = gw
        .post_json(
            "/v1/completions",
            &json!({"model": "local/smol", "prompt": "One, two,", "temperature": 0, "max_tokens": 6, "logprobs": 2}),
        )
        .await
        .expect_status(200);
    let lp = &legacy["choices"][0]["logprobs"];
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, legacy["choices"][0]["text"].as_str().unwrap());
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
    gw.post_json(
        "/v1/chat/completions",
        &chat("hi", json!({"top_logprobs": 2})),
    )
    .await
    .expect_error(400, "invalid_value");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma3_with_its_sentencepiece_vocabulary_serves_chat() {
    let gemma = workspace_root().join(".cache/models/gemma-3-270m-q4_k_m.gguf");
    assert!(
        gemma.exists(),
        "{} is missing: run scripts/fetch-models.sh",
        gemma.display()
    );
    let gw = Gateway::builder()
        .raw(&local_section("", &[("gemma", &gemma)]))
        .start()
        .await;
    // A completion prompt the pretrained model continues predictably.
    let body = gw
        .post_json(
            "/v1/completions",
            &json!({"model": "local/gemma", "prompt": "1, 2, 3, 4, 5,", "temperature": 0, "max_tokens": 6}),
        )
        .await
        .expect_status(200);
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" 6, 7"), "{text:?}");
    // Chat through Gemma's template: streamed and unary agree, no control token leaks.
    let mut req = json!({"model": "local/gemma", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0, "max_tokens": 12});
    let unary = text_of(
        &gw.post_json("/v1/chat/completions", &req)
            .await
            .expect_status(200),
    );
    assert!(!unary.contains("<end_of_turn>") && !unary.contains("<start_of_turn>"));
    req["stream"] = json!(true);
    let t = SseTranscript::read(gw.post_stream("/v1/chat/completions", &req).await).await;
    assert_eq!(t.text(), unary);
    let models = gw.get("/v1/models").await.expect_status(200);
    let m = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "local/gemma")
        .unwrap()
        .clone();
    assert_eq!(m["local"]["architecture"], "gemma3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_config_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[local]\ndevice = \"tpu\"\nkeep_alive = nan\nmemory_budget_mb = 0\n\n[[local.models]]\nname = \"../x\"\npath = \"\"\n\n[[providers]]\nname = \"local\"\nkind = \"openai\"\n",
    )
    .unwrap();
    let out = run_airlock(&["config", "check", file.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    for needle in [
        "local.device",
        "local.keep_alive",
        "local.memory_budget_mb",
        "local.models[0].name",
        "local.models[0].path",
        "reserved for local models",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
    // The binary under test is built without the `cuda` feature.
    std::fs::write(&file, "[local]\ndevice = \"cuda:0\"\n").unwrap();
    let out = run_airlock(&["config", "check", file.to_str().unwrap()], &[]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no CUDA support"));
}
