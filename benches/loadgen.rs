//! The load of `make bench`, for any webhook server: producers that send events to a URL with
//! headers and a body template, and a receiver that counts deliveries per endpoint (request path),
//! each `webhook-id` once. `benches/capy.rs` drives our ingest port with it, and
//! `benches/load.rs` (`cargo bench --bench load -- --help`) drives another system's, so both are
//! measured with the same load shape ("Measuring another system with the same load" in
//! BENCHMARKS.md).
#![allow(dead_code)] // Each including target uses part of it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warp::Filter;

/// The body of our ingest route: `{"type": ..., "data": {"seq": N, "blob": "..."}}`.
pub const INGEST_BODY: &str = r#"{"type":"bench.event","data":{{data}}}"#;

/// Headers a receiver reads a delivery's id from, in order, when none is named: the Standard
/// Webhooks header, then Svix's own.
pub const ID_HEADERS: [&str; 2] = ["webhook-id", "svix-id"];

/// `len` random characters from `seed` (a log that compresses what it stores gains nothing on
/// them that real payloads would not give).
pub fn random_text(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(ALPHABET[(state % 64) as usize])
        })
        .collect()
}

/// The 480-character random blob of event `seq`, different for every event.
pub fn blob(seq: u64) -> String {
    random_text(480, seq)
}

/// The data of event `seq`, about 539 bytes once enveloped, as in the peer's published
/// measurement.
pub fn payload(seq: u64) -> Value {
    json!({"seq": seq, "blob": blob(seq)})
}

/// One piece of a [`BodyTemplate`].
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Seq,
    Blob,
    Data,
}

/// A request body with placeholders: `{{seq}}` (the event's number), `{{blob}}` (its random
/// text) and `{{data}}` (the JSON object `{"seq": N, "blob": "..."}`).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyTemplate(Vec<Piece>);

impl BodyTemplate {
    /// Parses a template; an unknown or unclosed placeholder is an error that names it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed placeholder at byte {}", text.len() - rest.len() + open))?;
            pieces.push(match after[..close].trim() {
                "seq" => Piece::Seq,
                "blob" => Piece::Blob,
                "data" => Piece::Data,
                other => return Err(format!("unknown placeholder {{{{{other}}}}}: use seq, blob or data")),
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Self(pieces))
    }

    /// The body of event `seq`.
    pub fn render(&self, seq: u64) -> String {
        let mut body = String::with_capacity(640);
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => body.push_str(t),
                Piece::Seq => body.push_str(&seq.to_string()),
                Piece::Blob => body.push_str(&blob(seq)),
                Piece::Data => body.push_str(&payload(seq).to_string()),
            }
        }
        body
    }
}

/// Deliveries seen, per endpoint (the request's path), each id once.
#[derive(Debug, Default)]
pub struct Tally {
    ids: HashMap<String, HashSet<String>>,
    requests: u64,
    without_id: u64,
    last_new: Option<Instant>,
}

impl Tally {
    /// Counts one request to `endpoint` carrying `id`; true if this delivery is new.
    pub fn record(&mut self, endpoint: &str, id: Option<&str>, at: Instant) -> bool {
        self.requests += 1;
        let Some(id) = id else {
            self.without_id += 1;
            return false;
        };
        let new = match self.ids.get_mut(endpoint) {
            Some(seen) => seen.insert(id.to_string()),
            None => {
                self.ids.insert(endpoint.to_string(), HashSet::from([id.to_string()]));
                true
            }
        };
        if new {
            self.last_new = Some(at);
        }
        new
    }

    /// Distinct deliveries over every endpoint.
    pub fn unique(&self) -> u64 {
        self.ids.values().map(|s| s.len() as u64).sum()
    }

    /// Requests that repeated a delivery an endpoint had already received.
    pub fn duplicates(&self) -> u64 {
        self.requests - self.without_id - self.unique()
    }

    /// Requests without any id header.
    pub fn without_id(&self) -> u64 {
        self.without_id
    }

    /// Endpoints that received anything.
    pub fn endpoints(&self) -> usize {
        self.ids.len()
    }

    /// The fewest and the most distinct deliveries one endpoint received.
    pub fn per_endpoint_range(&self) -> (u64, u64) {
        let counts = self.ids.values().map(|s| s.len() as u64);
        (counts.clone().min().unwrap_or(0), counts.max().unwrap_or(0))
    }

    /// When the newest distinct delivery arrived.
    pub fn last_new(&self) -> Option<Instant> {
        self.last_new
    }
}

/// A receiver on loopback (or `addr`) that answers 200 to every POST and tallies it.
#[derive(Clone)]
pub struct TallyingReceiver {
    /// `http://ip:port`.
    pub url: String,
    tally: Arc<Mutex<Tally>>,
    unique: Arc<AtomicU64>,
}

impl TallyingReceiver {
    /// Listens on `addr`; reads a delivery's id from `id_header`, or else from [`ID_HEADERS`].
    pub async fn start(addr: std::net::SocketAddr, id_header: Option<String>) -> std::io::Result<Self> {
        let tally: Arc<Mutex<Tally>> = Arc::default();
        let unique = Arc::new(AtomicU64::new(0));
        let headers: Arc<Vec<String>> = Arc::new(match id_header {
            Some(h) => vec![h.to_ascii_lowercase()],
            None => ID_HEADERS.iter().map(|h| h.to_string()).collect(),
        });
        let (t, u) = (tally.clone(), unique.clone());
        let route = warp::post()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(
                move |path: warp::path::FullPath, h: warp::http::HeaderMap, _body: bytes::Bytes| {
                    let now = Instant::now();
                    let id = headers.iter().find_map(|name| h.get(name.as_str())?.to_str().ok());
                    if t.lock().expect("tally lock").record(path.as_str(), id, now) {
                        u.fetch_add(1, Ordering::Relaxed);
                    }
                    warp::reply()
                },
            );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Ok(Self { url, tally, unique })
    }

    /// Distinct deliveries so far.
    pub fn unique(&self) -> u64 {
        self.unique.load(Ordering::Relaxed)
    }

    /// Waits until `expected` distinct deliveries arrived; false after `timeout`.
    pub async fn wait_unique(&self, expected: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.unique() < expected {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Reads the tally.
    pub fn with_tally<T>(&self, f: impl FnOnce(&Tally) -> T) -> T {
        f(&self.tally.lock().expect("tally lock"))
    }
}

/// What the producers send.
#[derive(Debug, Clone)]
pub struct Load {
    /// Where every event is POSTed.
    pub url: String,
    /// Extra headers (`Authorization`, ...); `Content-Type: application/json` is always sent.
    pub headers: Vec<(String, String)>,
    /// The body of each event.
    pub body: BodyTemplate,
    /// Events to send, numbered from `first_seq`.
    pub events: u64,
    /// The first event's number.
    pub first_seq: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// What the producers saw.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Answers 2xx (one per event: refused events are sent again until accepted).
    pub accepted: u64,
    /// Answers other than 2xx, and failed requests, each followed by a retry 20 ms later.
    pub refused: u64,
    /// When the first event was sent.
    pub started: Instant,
    /// From the first event sent to the last one accepted.
    pub took: Duration,
}

/// Sends `load.events` events, `load.concurrency` at a time, each until a 2xx answers it.
pub async fn send(http: &reqwest::Client, load: &Load) -> Sent {
    let next = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let load = Arc::new(load.clone());
    let started = Instant::now();
    let producers: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (http, next, refused, load) = (http.clone(), next.clone(), refused.clone(), load.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= load.events {
                        break;
                    }
                    let body = load.body.render(load.first_seq + n);
                    loop {
                        let mut request = http
                            .post(&load.url)
                            .header("content-type", "application/json")
                            .body(body.clone());
                        for (name, value) in &load.headers {
                            request = request.header(name, value);
                        }
                        match request.send().await {
                            Ok(r) if r.status().is_success() => break,
                            _ => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for producer in producers {
        producer.await.expect("a producer ran to the end");
    }
    Sent {
        accepted: load.events,
        refused: refused.load(Ordering::Relaxed),
        started,
        took: started.elapsed(),
    }
}

/// Parses `Name: value`.
pub fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header {text:?} is not `Name: value`"))?;
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("header {text:?} has no valid name"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}
