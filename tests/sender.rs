//! The delivery sender against real HTTP receivers on 127.0.0.1: Standard Webhooks signatures
//! checked by an independent verifier (the `standardwebhooks` crate), status classification,
//! timeouts, the response cap, keep-alive, and the SSRF guard with the strict default policy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use capy_webhooks::delivery::outcome::AttemptOutcome;
use capy_webhooks::delivery::sender::{AttemptResult, Sender, SenderConfig, USER_AGENT, envelope};
use capy_webhooks::delivery::ssrf::TargetPolicy;
use capy_webhooks::signing::{KeyRing, SignatureScheme, SigningSecret, StoredKeyRing, WantedKeys, plan_key_ring};
use jiff::Timestamp;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

/// Tests target loopback receivers, so private targets are allowed explicitly.
const LOOPBACK_ALLOWED: TargetPolicy = TargetPolicy {
    allow_private: true,
    allow_metadata: false,
};

fn config() -> SenderConfig {
    SenderConfig {
        policy: LOOPBACK_ALLOWED,
        allow_http: true,
        ..SenderConfig::default()
    }
}

fn sender() -> Sender {
    Sender::new(config()).unwrap()
}

fn new_ring(now: Timestamp) -> KeyRing {
    plan_key_ring(
        StoredKeyRing::Missing,
        false,
        WantedKeys {
            rotation: 0,
            scheme: SignatureScheme::HmacSha256,
        },
        now,
        Duration::from_secs(3600),
        SigningSecret::generate_with,
    )
    .ring
}

/// Serves `routes` on a fresh 127.0.0.1 port.
async fn serve(routes: BoxedFilter<(Response,)>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    addr
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Captured {
    headers: HeaderMap,
    body: Bytes,
    remote: Option<SocketAddr>,
}

/// A receiver answering `status` with `reply_body` to every request, recording each one.
async fn capturing_receiver(status: StatusCode, reply_body: &'static str) -> (SocketAddr, Arc<Mutex<Vec<Captured>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let routes = warp::any()
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .and(warp::addr::remote())
        .map(move |headers, body, remote| {
            log.lock().unwrap().push(Captured { headers, body, remote });
            warp::reply::with_status(reply_body, status).into_response()
        })
        .boxed();
    (serve(routes).await, seen)
}

fn verifier(secret: &SigningSecret) -> standardwebhooks::Webhook {
    standardwebhooks::Webhook::new(secret.expose()).unwrap()
}

fn with_signature(headers: &HeaderMap, signature: &str) -> HeaderMap {
    let mut headers = headers.clone();
    headers.insert("webhook-signature", HeaderValue::from_str(signature).unwrap());
    headers
}

#[tokio::test]
async fn signed_delivery_verifies_with_the_standardwebhooks_crate() {
    let (addr, seen) = capturing_receiver(StatusCode::OK, "thanks").await;
    let now = Timestamp::now();
    let ring = new_ring(now);
    let body = serde_json::to_vec(&envelope("database.created", now, &json!({"id": "db_1"}))).unwrap();
    let result = sender()
        .send(
            &format!("http://127.0.0.1:{}/hook", addr.port()),
            "msg_2k9fQ",
            &body,
            &ring,
            now,
        )
        .await;
    assert_eq!(result.outcome, AttemptOutcome::Success { status: 200 });
    assert_eq!(result.response_excerpt.as_deref(), Some("thanks"));
    assert!(result.duration < Duration::from_secs(5));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.body, body);
    let header = |name: &str| got.headers.get(name).unwrap().to_str().unwrap().to_string();
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("user-agent"), USER_AGENT);
    assert!(header("user-agent").starts_with("capy-webhooks/"));
    assert_eq!(header("webhook-id"), "msg_2k9fQ");
    assert_eq!(header("webhook-timestamp"), now.as_second().to_string());
    let signature = header("webhook-signature");
    assert!(signature.starts_with("v1,") && !signature.contains(' '), "{signature}");

    let wh = verifier(&ring.current);
    wh.verify(&got.body, &got.headers).expect("the signature verifies");
    // The verifier is really checking: a changed body or id, or another secret, fails.
    assert!(wh.verify(b"{\"type\":\"other\"}", &got.headers).is_err());
    let mut other_id = got.headers.clone();
    other_id.insert("webhook-id", HeaderValue::from_static("msg_other"));
    assert!(wh.verify(&got.body, &other_id).is_err());
    assert!(
        verifier(&SigningSecret::generate())
            .verify(&got.body, &got.headers)
            .is_err()
    );

    // The body is the Standard Webhooks envelope.
    let sent: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(sent["type"], "database.created");
    assert_eq!(sent["data"], json!({"id": "db_1"}));
    assert!(sent["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn host_names_go_through_the_guarded_resolver_and_connect() {
    let (addr, seen) = capturing_receiver(StatusCode::NO_CONTENT, "").await;
    let now = Timestamp::now();
    let result = sender()
        .send(
            &format!("http://localhost:{}/hook", addr.port()),
            "msg_1",
            b"{}",
            &new_ring(now),
            now,
        )
        .await;
    assert_eq!(result.outcome, AttemptOutcome::Success { status: 204 });
    assert_eq!(result.response_excerpt, None);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn rotation_grace_period_signs_twice_and_each_signature_verifies_alone() {
    let (addr, seen) = capturing_receiver(StatusCode::OK, "").await;
    let now = Timestamp::now();
    let before = new_ring(now);
    let rotated = plan_key_ring(
        StoredKeyRing::Valid(before.clone()),
        true,
        WantedKeys {
            rotation: 1,
            scheme: SignatureScheme::HmacSha256,
        },
        now,
        Duration::from_secs(3600),
        SigningSecret::generate_with,
    )
    .ring;
    assert_eq!(rotated.previous.len(), 1);
    let (new_secret, old_secret) = (rotated.current.clone(), before.current.clone());

    let result = sender()
        .send(
            &format!("http://127.0.0.1:{}/", addr.port()),
            "msg_rot",
            b"{\"a\":1}",
            &rotated,
            now,
        )
        .await;
    assert!(result.outcome.is_success(), "{:?}", result.outcome);
    let got = seen.lock().unwrap()[0].clone();
    let header = got.headers["webhook-signature"].to_str().unwrap().to_string();
    let signatures: Vec<&str> = header.split(' ').collect();
    assert_eq!(signatures.len(), 2, "{header}");

    // Current secret first, then the previous one; each verifies alone with its own secret only.
    let only_new = with_signature(&got.headers, signatures[0]);
    let only_old = with_signature(&got.headers, signatures[1]);
    verifier(&new_secret)
        .verify(&got.body, &only_new)
        .expect("new signature");
    verifier(&old_secret)
        .verify(&got.body, &only_old)
        .expect("old signature");
    assert!(verifier(&new_secret).verify(&got.body, &only_old).is_err());
    assert!(verifier(&old_secret).verify(&got.body, &only_new).is_err());
    // A receiver still holding either secret accepts the full header.
    verifier(&new_secret).verify(&got.body, &got.headers).unwrap();
    verifier(&old_secret).verify(&got.body, &got.headers).unwrap();
}

#[tokio::test]
async fn statuses_are_classified_and_redirects_are_not_followed() {
    let target_hits = Arc::new(AtomicUsize::new(0));
    let hits = target_hits.clone();
    let port = Arc::new(Mutex::new(0u16));
    let location_port = port.clone();
    let routes = warp::path("fail")
        .map(|| warp::reply::with_status("boom", StatusCode::INTERNAL_SERVER_ERROR).into_response())
        .or(warp::path("busy").map(|| {
            let reply = warp::reply::with_status("slow down", StatusCode::TOO_MANY_REQUESTS);
            warp::reply::with_header(reply, "retry-after", "7").into_response()
        }))
        .unify()
        .or(warp::path("unavailable").map(|| {
            let reply = warp::reply::with_status("", StatusCode::SERVICE_UNAVAILABLE);
            warp::reply::with_header(reply, "retry-after", "120").into_response()
        }))
        .unify()
        .or(warp::path("teapot").map(|| {
            // Retry-After is only honoured on 429 and 503.
            let reply = warp::reply::with_status("", StatusCode::IM_A_TEAPOT);
            warp::reply::with_header(reply, "retry-after", "7").into_response()
        }))
        .unify()
        .or(warp::path("gone").map(|| StatusCode::GONE.into_response()))
        .unify()
        .or(warp::path("moved").map(move || {
            let location = format!("http://127.0.0.1:{}/target", location_port.lock().unwrap());
            let reply = warp::reply::with_status("", StatusCode::FOUND);
            warp::reply::with_header(reply, "location", location).into_response()
        }))
        .unify()
        .or(warp::path("target").map(move || {
            hits.fetch_add(1, Ordering::SeqCst);
            StatusCode::OK.into_response()
        }))
        .unify()
        .boxed();
    let addr = serve(routes).await;
    *port.lock().unwrap() = addr.port();

    let sender = sender();
    let now = Timestamp::now();
    let ring = new_ring(now);
    let send = |path: &str| {
        let url = format!("http://127.0.0.1:{}/{path}", addr.port());
        let (sender, ring) = (&sender, &ring);
        async move { sender.send(&url, "msg_s", b"{}", ring, now).await }
    };

    let failed = send("fail").await;
    assert_eq!(
        failed.outcome,
        AttemptOutcome::HttpFailure {
            status: 500,
            retry_after: None
        }
    );
    assert_eq!(failed.response_excerpt.as_deref(), Some("boom"));
    assert_eq!(
        send("busy").await.outcome,
        AttemptOutcome::HttpFailure {
            status: 429,
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(
        send("unavailable").await.outcome,
        AttemptOutcome::HttpFailure {
            status: 503,
            retry_after: Some(Duration::from_secs(120))
        }
    );
    assert_eq!(
        send("teapot").await.outcome,
        AttemptOutcome::HttpFailure {
            status: 418,
            retry_after: None
        }
    );
    assert_eq!(send("gone").await.outcome, AttemptOutcome::Gone);
    assert_eq!(
        send("moved").await.outcome,
        AttemptOutcome::HttpFailure {
            status: 302,
            retry_after: None
        }
    );
    // A followed redirect would have reached the target before `send` returned.
    assert_eq!(target_hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    // The redirect target itself is reachable: not following it was the sender's choice.
    assert_eq!(send("target").await.outcome, AttemptOutcome::Success { status: 200 });
    assert_eq!(target_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_slow_receiver_times_out() {
    let routes = warp::any()
        .then(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK.into_response()
        })
        .boxed();
    let addr = serve(routes).await;
    let sender = Sender::new(SenderConfig {
        total_timeout: Duration::from_millis(300),
        ..config()
    })
    .unwrap();
    let now = Timestamp::now();
    let result = sender
        .send(
            &format!("http://127.0.0.1:{}/", addr.port()),
            "msg_t",
            b"{}",
            &new_ring(now),
            now,
        )
        .await;
    assert_eq!(result.outcome, AttemptOutcome::Timeout);
    assert_eq!(result.response_excerpt, None);
    assert!(result.duration >= Duration::from_millis(250), "{:?}", result.duration);
    assert!(result.duration < Duration::from_secs(2), "{:?}", result.duration);
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error_without_the_query_string() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let now = Timestamp::now();
    let url = format!("http://127.0.0.1:{port}/hook?token=s3cr3t-value");
    let result = sender().send(&url, "msg_c", b"{}", &new_ring(now), now).await;
    let AttemptOutcome::ConnectError(message) = result.outcome else {
        panic!("expected ConnectError, got {:?}", result.outcome);
    };
    assert!(message.contains("127.0.0.1"), "{message}");
    assert!(!message.contains("token") && !message.contains("s3cr3t"), "{message}");
    assert!(!message.contains("/hook"), "{message}");
    assert_eq!(result.response_excerpt, None);
}

#[tokio::test]
async fn a_large_body_is_cut_at_the_cap() {
    let routes = warp::any().map(|| Response::new(vec![b'x'; 1 << 20].into())).boxed();
    let addr = serve(routes).await;
    let now = Timestamp::now();
    let result = sender()
        .send(
            &format!("http://127.0.0.1:{}/", addr.port()),
            "msg_b",
            b"{}",
            &new_ring(now),
            now,
        )
        .await;
    assert_eq!(result.outcome, AttemptOutcome::Success { status: 200 });
    let excerpt = result.response_excerpt.unwrap();
    assert_eq!(excerpt.len(), 1024);
    assert!(excerpt.bytes().all(|b| b == b'x'));

    let small_cap = Sender::new(SenderConfig {
        max_response_bytes: 10,
        ..config()
    })
    .unwrap();
    let result = small_cap
        .send(
            &format!("http://127.0.0.1:{}/", addr.port()),
            "msg_b",
            b"{}",
            &new_ring(now),
            now,
        )
        .await;
    assert_eq!(result.response_excerpt.as_deref(), Some("xxxxxxxxxx"));
}

/// Answers one request with a 200 announcing 100 MB, sends 64 KiB of it and never the rest.
async fn endless_body_receiver() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The request is small: read until its headers and the 2-byte body are in.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 104857600\r\n\r\n";
                if socket.write_all(head).await.is_err() || socket.write_all(&[b'y'; 65536]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn the_body_is_read_only_up_to_the_cap_never_to_its_end() {
    let addr = endless_body_receiver().await;
    let sender = Sender::new(SenderConfig {
        total_timeout: Duration::from_secs(10),
        ..config()
    })
    .unwrap();
    let now = Timestamp::now();
    let result = sender
        .send(
            &format!("http://127.0.0.1:{}/", addr.port()),
            "msg_e",
            b"{}",
            &new_ring(now),
            now,
        )
        .await;
    assert_eq!(result.outcome, AttemptOutcome::Success { status: 200 });
    assert_eq!(result.response_excerpt.as_deref().map(str::len), Some(1024));
    // Reading to the end would have waited for the 10 s timeout.
    assert!(result.duration < Duration::from_secs(3), "{:?}", result.duration);
}

#[tokio::test]
async fn sequential_sends_reuse_one_kept_alive_connection() {
    let (addr, seen) = capturing_receiver(StatusCode::OK, "ok").await;
    let sender = sender();
    let now = Timestamp::now();
    let ring = new_ring(now);
    let url = format!("http://127.0.0.1:{}/hook", addr.port());
    for id in ["msg_k1", "msg_k2", "msg_k3"] {
        let result: AttemptResult = sender.send(&url, id, b"{}", &ring, now).await;
        assert!(result.outcome.is_success(), "{:?}", result.outcome);
    }
    // A clone shares the client and its pool.
    let clone = sender.clone();
    assert!(clone.send(&url, "msg_k4", b"{}", &ring, now).await.outcome.is_success());

    let remotes: Vec<SocketAddr> = seen.lock().unwrap().iter().map(|c| c.remote.unwrap()).collect();
    assert_eq!(remotes.len(), 4);
    assert!(remotes.iter().all(|r| *r == remotes[0]), "{remotes:?}");
}

/// A TCP listener that only counts the connections it accepts, then closes them.
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn the_strict_default_policy_refuses_loopback_before_connecting() {
    let (addr, accepted) = counting_listener().await;
    let strict = Sender::new(SenderConfig {
        allow_http: true,
        ..SenderConfig::default()
    })
    .unwrap();
    let now = Timestamp::now();
    let ring = new_ring(now);
    let port = addr.port();

    // An IP literal is checked before sending.
    let literal = strict
        .send(&format!("http://127.0.0.1:{port}/hook"), "msg_x", b"{}", &ring, now)
        .await;
    assert_eq!(
        literal.outcome,
        AttemptOutcome::Refused("loopback address is not an allowed webhook target".into())
    );
    // A host name is refused by the resolver, and the refusal is told apart from connect errors.
    let named = strict
        .send(
            &format!("http://localhost:{port}/hook?token=abc"),
            "msg_x",
            b"{}",
            &ring,
            now,
        )
        .await;
    let AttemptOutcome::Refused(reason) = &named.outcome else {
        panic!("expected Refused, got {:?}", named.outcome);
    };
    assert!(
        reason.starts_with("localhost resolves to a refused address: loopback address"),
        "{reason}"
    );
    assert!(!reason.contains("token"), "{reason}");
    // Other spellings of loopback are refused too.
    for url in [
        format!("http://[::1]:{port}/"),
        format!("http://2130706433:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let result = strict.send(&url, "msg_x", b"{}", &ring, now).await;
        assert!(
            matches!(result.outcome, AttemptOutcome::Refused(_)),
            "{url}: {:?}",
            result.outcome
        );
    }
    // Control: with loopback allowed, the same listener does see the connection. Connections are
    // accepted in order, so once this one is counted, any earlier one would have been too.
    let allowed = sender()
        .send(&format!("http://localhost:{port}/hook"), "msg_x", b"{}", &ring, now)
        .await;
    assert!(
        matches!(allowed.outcome, AttemptOutcome::ConnectError(_)),
        "{:?}",
        allowed.outcome
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while accepted.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "a refused target was connected to");
}
