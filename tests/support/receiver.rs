//! A real HTTP receiver on loopback whose answers a test scripts, recording every request.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use warp::http::{HeaderMap, StatusCode};
use warp::{Filter, Reply};

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status, empty body.
    Status(u16),
    /// This status with a `Retry-After: secs` header.
    RetryAfter(u16, u64),
    /// Wait this long, then 200 (for timeouts).
    Slow(Duration),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The request's path.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The client's address: one per connection (keep-alive reuses it).
    pub remote: Option<SocketAddr>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A receiver answering from its script (then 200 once the script is used up).
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Answer>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(script: Vec<Answer>) -> Self {
        Self::start_on("127.0.0.1".parse().unwrap(), script).await
    }

    /// A receiver listening on `ip` (any free port), e.g. the address pods on the real node reach
    /// the host at (`hack/node.sh host-ip`).
    pub async fn start_on(ip: std::net::IpAddr, script: Vec<Answer>) -> Self {
        Self::start_on_port(ip, 0, script).await
    }

    /// A receiver on `ip:port` (a fixed port, for commands that name it, like the README's).
    pub async fn start_on_port(ip: std::net::IpAddr, port: u16, script: Vec<Answer>) -> Self {
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (script.clone(), received.clone());
        let route = warp::any()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .and(warp::addr::remote())
            .then(
                move |path: warp::path::FullPath, headers: HeaderMap, body: Bytes, remote| {
                    let (s, r) = (s.clone(), r.clone());
                    async move {
                        r.lock().unwrap().push(Received {
                            path: path.as_str().to_string(),
                            headers,
                            body,
                            at: Instant::now(),
                            remote,
                        });
                        let answer = s.lock().unwrap().pop_front().unwrap_or(Answer::Status(200));
                        match answer {
                            Answer::Status(code) => {
                                warp::reply::with_status("", StatusCode::from_u16(code).unwrap()).into_response()
                            }
                            Answer::RetryAfter(code, secs) => warp::reply::with_header(
                                warp::reply::with_status("slow down", StatusCode::from_u16(code).unwrap()),
                                "retry-after",
                                secs.to_string(),
                            )
                            .into_response(),
                            Answer::Slow(d) => {
                                tokio::time::sleep(d).await;
                                warp::reply().into_response()
                            }
                        }
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Self { addr, script, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn script(&self, answers: Vec<Answer>) {
        self.script.lock().unwrap().extend(answers);
    }
}
