//! Fuzzing: schemathesis (from PyPI, installed by `make fuzz-tools`) against the served OpenAPI
//! document with a valid API key, and malformed raw requests against the ingest port. Neither may
//! get a 5xx, an answer the document does not describe, or a dead process.

mod support;

use std::time::Duration;

use support::operator::{INGEST_TOKEN, Operator, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ORG: &str = "org_fuzz";

/// The schemathesis executable: `CAPY_SCHEMATHESIS`, else where `hack/fuzz-tools.sh` installs it.
fn schemathesis() -> std::path::PathBuf {
    if let Ok(path) = std::env::var("CAPY_SCHEMATHESIS") {
        return path.into();
    }
    let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/fuzz-tools.sh"))
        .output()
        .expect("hack/fuzz-tools.sh runs");
    assert!(
        out.status.success(),
        "installing schemathesis failed (run `make fuzz-tools`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().into()
}

/// Requests the REST port answered, by status class, from the operator's own metrics.
fn answered(op: &Operator) -> (u64, u64) {
    let text = op.metrics.encode();
    let mut total = 0.0;
    let mut server_errors = 0.0;
    for line in text
        .lines()
        .filter(|l| l.starts_with("capy_webhooks_http_requests_total{"))
    {
        if !line.contains("component=\"api\"") {
            continue;
        }
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        total += value;
        if line.contains("status=\"5") {
            server_errors += value;
        }
    }
    (total as u64, server_errors as u64)
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    let exe = schemathesis();
    let (client, ns, op) = support::operator::in_new_namespace(
        "fuzz",
        Options {
            dispatcher: true,
            ..Options::default()
        },
    )
    .await;
    let (_, key) = op.mint_key(&client, &ns, ORG, None).await;
    let origin = op.base.trim_end_matches("/v1/organizations").to_string();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        format!(
            r#"
base-url = "{origin}"
headers = {{ Authorization = "Bearer ${{CAPY_FUZZ_KEY}}" }}
request-timeout = 30.0
[generation]
max-examples = 60
[parameters]
"path.orgID" = "{ORG}"
"#
        ),
    )
    .unwrap();
    let before = answered(&op);
    let out = tokio::process::Command::new(&exe)
        .current_dir(dir.path())
        .args(["run", &format!("{origin}/openapi.json")])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--workers", "2", "--max-time", "60", "--no-color"])
        .env("CAPY_FUZZ_KEY", &key)
        .env("SCHEMATHESIS_HOOKS", "")
        .kill_on_drop(true)
        .output()
        .await
        .expect("schemathesis runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (total, server_errors) = answered(&op);
    let (requests, server_errors) = (total - before.0, server_errors - before.1);
    assert!(out.status.success(), "schemathesis found failures:\n{report}");
    assert_eq!(server_errors, 0, "5xx answers:\n{report}");
    assert!(requests >= 1000, "only {requests} requests reached the API:\n{report}");
    assert!(report.contains("Stateful"), "the stateful phase ran:\n{report}");
    println!("schemathesis sent {requests} requests; none got a 5xx");
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}

/// Sends raw bytes and returns the status code of the answer, or `None` when the server closed
/// the connection without one (what it may do with bytes that are not HTTP).
async fn raw(addr: &str, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test]
async fn malformed_requests_to_the_ingest_port_get_no_server_error() {
    let (client, ns, op) = support::operator::in_new_namespace(
        "fuzz-ingest",
        Options {
            dispatcher: true,
            ..Options::default()
        },
    )
    .await;
    let addr = op.ingest_base.trim_start_matches("http://").to_string();
    let path = format!("/v1/organizations/{ORG}/events");
    let auth = format!("Authorization: Bearer {INGEST_TOKEN}\r\n");
    let post = |headers: &str, body: &[u8]| {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    };
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(200_000));
    let many_headers: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let chunked_over_limit = {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        for _ in 0..40 {
            r.extend_from_slice(format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096)).as_bytes());
        }
        r.extend_from_slice(b"0\r\n\r\n");
        r
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("invalid JSON", post("", b"{\"type\": ")),
        ("invalid UTF-8", post("", b"{\"type\": \"a.b\", \"data\": \"\xff\xfe\"}")),
        ("wrong types", post("", br#"{"type": 5, "data": []}"#)),
        ("not an object", post("", b"[1,2,3]")),
        ("deep nesting", post("", format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).as_bytes())),
        ("duplicate content-length", post("Content-Length: 3\r\n", b"{}")),
        ("huge header", post(&huge_header, b"{}")),
        ("many headers", post(&many_headers, b"{}")),
        ("chunked over the limit", chunked_over_limit),
        ("wrong method", format!("PUT {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").into_bytes()),
        ("DELETE", format!("DELETE {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()),
        ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec()),
        ("bad request line", b"POST\r\n\r\n".to_vec()),
        ("unknown path", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()),
        ("bad percent-encoding", format!("POST /v1/organizations/%ff%fe/events HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").into_bytes()),
        ("idempotency key with control bytes", post("Idempotency-Key: a\x01b\r\n", br#"{"type": "a.b", "data": {}}"#)),
    ];
    for (what, request) in &cases {
        let status = raw(&addr, request).await;
        assert!(status.is_none_or(|s| s < 500), "{what}: answered {status:?}");
        println!("{what}: {status:?}");
    }
    // Still alive and serving.
    let (status, body) = op.ingest(ORG, "a.b", serde_json::json!({"n": 1})).await;
    assert_eq!(status, 202, "{body}");
    op.stop().await;
    support::delete_namespace(&client, &ns).await;
}
