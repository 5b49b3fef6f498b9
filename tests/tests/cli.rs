//! The command line: `airlock config check`, `serve` with a bad config (exit 64), the
//! address line on stdout, and the `--listen` / `--data-dir` overrides.

// Test code: failing loudly is how a helper reports a broken expectation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use airlock_e2e::gateway::{run_airlock, wait_until, DEFAULT_MASTER_KEY, MASTER_KEY_ENV};
use airlock_e2e::mock::MockUpstream;
use airlock_e2e::{ConfigBuilder, Gateway};

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
data_dir = "/tmp/airlock-config-check-unused"
master_key_env = "AIRLOCK_MASTER_KEY"
max_body_bytes = 16777216
metrics_open = false
shutdown_grace = 30
header_read_timeout = 10

[upstream]
connect_timeout = 5
first_byte_timeout = 60
timeout = 600

[[providers]]
name = "oai"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "MOCK_OPENAI_KEY"

[[providers]]
name = "ant"
kind = "anthropic"
base_url = "http://127.0.0.1:9/v1"

[[providers]]
name = "gem"
kind = "gemini"
base_url = "http://127.0.0.1:9/v1beta"

[[models]]
name = "gpt-4o-mini"
targets = ["oai/gpt-4o-mini", "ant/claude-3-5-haiku-latest"]
"#;

const ENV: &[(&str, &str)] = &[
    (MASTER_KEY_ENV, DEFAULT_MASTER_KEY),
    ("MOCK_OPENAI_KEY", "sk-x"),
];

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn config_check_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "good.toml", GOOD);
    let out = run_airlock(&["config", "check", &path], ENV).await;
    assert_eq!(out.status.code(), Some(0), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config OK"),
        "{}",
        output_text(&out)
    );
}

#[tokio::test]
async fn config_check_bad_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "bad kind",
            GOOD.replacen("kind = \"openai\"", "kind = \"openia\"", 1),
            vec!["providers[0].kind", "openia"],
        ),
        (
            "bad url and unknown provider",
            GOOD.replacen(
                "base_url = \"http://127.0.0.1:9/v1beta\"",
                "base_url = \"ftp://example\"",
                1,
            )
            .replacen("\"ant/claude-3-5-haiku-latest\"", "\"nobody/claude\"", 1),
            vec!["providers[2].base_url", "models[0]", "nobody"],
        ),
        (
            "unknown key",
            GOOD.replacen("metrics_open = false", "metrics_opne = false", 1),
            vec!["metrics_opne"],
        ),
        (
            "bad provider name",
            GOOD.replacen("name = \"gem\"", "name = \"g e m\"", 1),
            vec!["providers[2].name"],
        ),
        (
            "duplicate provider",
            GOOD.replacen("name = \"gem\"", "name = \"oai\"", 1),
            vec!["providers[2].name", "oai"],
        ),
        ("not toml", "[server\nlisten = ".to_string(), vec![]),
    ];
    let mut failures = Vec::new();
    for (name, text, needles) in cases {
        let path = write(dir.path(), "bad.toml", &text);
        let out = run_airlock(&["config", "check", &path], ENV).await;
        let all = output_text(&out);
        if out.status.code() != Some(64) {
            failures.push(format!(
                "{name}: exit {:?}, want 64\n{all}",
                out.status.code()
            ));
        }
        if all.contains("config OK") {
            failures.push(format!("{name}: says config OK\n{all}"));
        }
        for n in needles {
            if !all.contains(n) {
                failures.push(format!("{name}: output does not mention {n:?}:\n{all}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn serve_with_bad_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bad.toml",
        &GOOD.replacen("kind = \"openai\"", "kind = \"nope\"", 1),
    );
    let out = run_airlock(&["serve", "--config", &path], ENV).await;
    assert_eq!(out.status.code(), Some(64), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("providers[0].kind"),
        "stderr names the problem: {}",
        output_text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "no address line for a config that failed: {}",
        output_text(&out)
    );
}

#[tokio::test]
async fn serve_with_short_master_key_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "good.toml", GOOD);
    let out = run_airlock(
        &["serve", "--config", &path],
        &[(MASTER_KEY_ENV, "too-short"), ("MOCK_OPENAI_KEY", "x")],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(64),
        "a master key under 16 characters: {}",
        output_text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(MASTER_KEY_ENV),
        "{}",
        output_text(&out)
    );
}

#[tokio::test]
async fn listen_and_data_dir_overrides() {
    let oai = MockUpstream::openai().await;
    let toml = ConfigBuilder::new()
        .server("listen", "\"127.0.0.1:1\"")
        .provider("oai", &oai)
        .model("m", &["oai/gpt-4o-mini"])
        .toml();
    let env: Vec<(String, String)> = ConfigBuilder::new().provider("oai", &oai).env_vars();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let free = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let listen = free.to_string();
    let gw = Gateway::start_with_args(
        &toml,
        &env,
        &["--listen", &listen, "--data-dir", "@DATA_DIR@-override"],
    )
    .await;
    assert_eq!(gw.addr(), free, "--listen wins over the file");
    let resp = gw
        .post_json(
            "/v1/chat/completions",
            &airlock_e2e::stack::chat("m", "override"),
        )
        .await;
    resp.expect_status(200);
    let overridden = gw.dir().join("data-override");
    assert!(
        wait_until(Duration::from_secs(5), || overridden.is_dir()).await,
        "--data-dir {} was not created",
        overridden.display()
    );
}

#[tokio::test]
async fn announces_address_on_stdout_only_once() {
    let oai = MockUpstream::openai().await;
    let mut gw = ConfigBuilder::new()
        .provider("oai", &oai)
        .model("m", &["oai/gpt-4o-mini"])
        .start()
        .await;
    // The harness already checked the exact `airlock listening on http://IP:PORT` line.
    assert!(gw.addr().ip().is_loopback());
    assert_ne!(
        gw.addr().port(),
        0,
        "the announced port is the bound one, not 0"
    );
    gw.post_json("/v1/chat/completions", &airlock_e2e::stack::chat("m", "x"))
        .await
        .expect_status(200);
    let status = gw.stop().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        gw.stdout_rest().trim().is_empty(),
        "more on stdout: {:?}",
        gw.stdout_rest()
    );
}
