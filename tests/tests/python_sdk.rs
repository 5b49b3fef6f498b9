//! The official `openai` Python SDK against the real gateway: starts the mocks and the
//! gateway, then runs `python -m pytest tests/python -q` with the gateway's URL, key and
//! model names in the environment (see `tests/python/test_sdk.py`).
//!
//! The interpreter is `AIRLOCK_PYTHON`, else `<workspace>/.venv/bin/python`; without one
//! the test fails and says to run `scripts/test.sh`, which creates `.venv` with `openai`
//! and `pytest`.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use airlock_e2e::gateway::{workspace_root, Gateway};
use airlock_e2e::mock::{Fault, MockUpstream};
use airlock_e2e::stack::Stack;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_PYTHON") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "AIRLOCK_PYTHON={} does not exist", p.display());
        return p;
    }
    let venv = workspace_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python for the SDK tests: {} is missing and AIRLOCK_PYTHON is unset. \
         Run scripts/test.sh (it creates .venv and installs openai and pytest), or \
         `python3 -m venv .venv && .venv/bin/pip install openai pytest`.",
        venv.display()
    );
    venv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk() {
    let cut = MockUpstream::openai().await;
    cut.fail_always(Fault::CutAfter(3));
    let stack = Stack::start_with(|b| {
        b.provider("cut", &cut)
            .model("cut-model", &["cut/gpt-4o-mini"])
    })
    .await;
    let gw = &stack.gateway;
    pytest(
        "tests/python",
        &[
            ("AIRLOCK_BASE_URL", gw.url("/v1")),
            ("AIRLOCK_KEY", gw.key().to_string()),
            ("AIRLOCK_CHAT_MODELS", "gpt,claude,gemini".into()),
            ("AIRLOCK_EMBED_MODELS", "embed,gemini-embed".into()),
            ("AIRLOCK_CUT_MODEL", "cut-model".into()),
            ("AIRLOCK_SLASH_MODEL", "team/chat".into()),
        ],
    )
    .await;
}

/// The SDK on the real local models: SmolLM2 for chat and completions, MiniLM for
/// embeddings (`tests/python_local/test_local_sdk.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_on_local_models() {
    let root = workspace_root();
    let smol = root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let minilm = root.join(".cache/models/all-MiniLM-L6-v2");
    for p in [&smol, &minilm] {
        assert!(
            p.exists(),
            "{} is missing: run scripts/fetch-models.sh",
            p.display()
        );
    }
    let gw = Gateway::builder()
        .raw(&format!(
            "[local]\n\n[[local.models]]\nname = \"smol\"\npath = \"{}\"\n\n[[local.models]]\nname = \"minilm\"\npath = \"{}\"\n",
            smol.display(),
            minilm.display()
        ))
        .start()
        .await;
    pytest(
        "tests/python_local",
        &[
            ("AIRLOCK_BASE_URL", gw.url("/v1")),
            ("AIRLOCK_KEY", gw.key().to_string()),
            ("AIRLOCK_LOCAL_CHAT_MODEL", "local/smol".into()),
            ("AIRLOCK_LOCAL_EMBED_MODEL", "local/minilm".into()),
        ],
    )
    .await;
}

/// Runs `python -m pytest DIR` with `env`; fails with pytest's output unless it
/// passed at least one test.
async fn pytest(dir: &str, env: &[(&str, String)]) {
    let python = python();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.args(["-m", "pytest", dir, "-q", "-p", "no:cacheprovider"])
        .current_dir(workspace_root())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The SDK must not pick up a developer's own settings.
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_ORG_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = match tokio::time::timeout(Duration::from_secs(300), cmd.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("could not run {}: {e}", python.display())),
        Err(_) => panic!("pytest did not finish within 300 s"),
    };
    let text = format!(
        "--- pytest stdout ---\n{}\n--- pytest stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named"),
        "the Python environment lacks a module; run scripts/test.sh\n{text}"
    );
    assert!(
        out.status.success(),
        "pytest failed ({})\n{text}",
        out.status
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("passed"),
        "pytest ran no tests\n{text}"
    );
    println!("{text}");
}
