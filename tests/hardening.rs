//! The HTTP ports hold up against slow and idle clients: header-read timeout, idle timeout,
//! authentication before the body. Real operator components, real sockets on loopback.

mod support;

use std::time::{Duration, Instant};

use capy_webhooks::http::ServerLimits;
use support::operator::{Operator, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(3);

async fn operator(prefix: &str, header_read_timeout: Duration, idle_timeout: Duration) -> Operator {
    let client = support::client().await;
    support::install_crd(&client).await;
    let ns = support::test_namespace(&client, prefix).await;
    Operator::start(
        &client,
        &ns,
        Options {
            dispatcher: true,
            server_limits: ServerLimits {
                header_read_timeout,
                idle_timeout,
                max_connections: 1024,
            },
            ..Options::default()
        },
    )
    .await
}

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// Whether the peer closed the connection: a read returns end of stream or an error.
async fn closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

/// 200 clients that trickle header bytes (slowloris) do not keep an ordinary client from its
/// answer, and are cut off after the header-read timeout.
#[tokio::test]
async fn slow_header_trickles_neither_block_others_nor_live_forever() {
    let op = operator("slowloris", HEADER_TIMEOUT, IDLE_TIMEOUT).await;
    let addr = host_port(&op.base);
    let started = Instant::now();
    let mut trickles = Vec::new();
    for _ in 0..200 {
        let addr = addr.clone();
        trickles.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            stream
                .write_all(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            // One byte every 300 ms, never finishing the headers, until the server hangs up.
            let opened = Instant::now();
            loop {
                if stream.write_all(b"a").await.is_err() || closed(&mut stream, Duration::from_millis(300)).await {
                    return Some(opened.elapsed());
                }
                if opened.elapsed() > HEADER_TIMEOUT * 5 {
                    return None;
                }
            }
        }));
    }
    // While they trickle, an ordinary request is answered at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ordinary = tokio::time::timeout(
        Duration::from_secs(1),
        op.http.get(format!("http://{addr}/openapi.json")).send(),
    )
    .await
    .expect("an ordinary client is answered within 1 s while 200 clients trickle headers")
    .unwrap();
    assert_eq!(ordinary.status(), 200);

    for trickle in trickles {
        let lived = trickle
            .await
            .unwrap()
            .expect("a trickling connection outlived the header timeout by far");
        assert!(
            lived >= HEADER_TIMEOUT - Duration::from_millis(500),
            "closed too early: {lived:?}"
        );
    }
    assert!(started.elapsed() < HEADER_TIMEOUT * 5);
    op.stop().await;
}

/// A keep-alive connection with nothing to do is closed after the idle timeout. (Waiting for the
/// next request's headers also counts against the header-read timeout, so this operator's is
/// longer, to see the idle timeout act.)
#[tokio::test]
async fn idle_connections_are_closed() {
    let op = operator("idle", Duration::from_secs(30), IDLE_TIMEOUT).await;
    let addr = host_port(&op.base);
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n.min(200)])
    );
    // Drain the rest of the answer.
    while tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf))
        .await
        .is_ok_and(|r| r.is_ok_and(|n| n > 0))
    {}
    // Still open a little before the idle timeout...
    let idle_since = Instant::now();
    assert!(
        !closed(&mut stream, IDLE_TIMEOUT - Duration::from_millis(1200)).await,
        "closed before the idle timeout"
    );
    // ...and closed after it.
    assert!(
        closed(&mut stream, Duration::from_secs(5)).await,
        "an idle connection stayed open"
    );
    assert!(idle_since.elapsed() >= IDLE_TIMEOUT - Duration::from_millis(500));
    op.stop().await;
}

/// Routes with a body refuse a missing credential before reading the body: the answer comes
/// while the client has sent only the headers of a large declared body.
#[tokio::test]
async fn bodies_are_not_read_before_authentication() {
    let op = operator("auth-first", HEADER_TIMEOUT, IDLE_TIMEOUT).await;
    for (base, path) in [
        (&op.base, "/org_x/webhook-endpoints"),
        (&op.ingest_base, "/v1/organizations/org_x/events"),
    ] {
        let addr = host_port(base);
        let prefix = if base.ends_with("/v1/organizations") {
            "/v1/organizations"
        } else {
            ""
        };
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST {prefix}{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n{{\"url\":"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
    op.stop().await;
}
