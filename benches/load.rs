//! `cargo bench --bench load -- --url URL [options]`: the load of `make bench` sent to any
//! webhook server, with a receiver that counts what that server delivers. See `--help` and
//! "Measuring another system with the same load" in BENCHMARKS.md.

#[path = "loadgen.rs"]
mod loadgen;

use std::time::Duration;

use loadgen::{BodyTemplate, Load, TallyingReceiver};

const HELP: &str = "\
Sends events to a webhook server and counts what it delivers, as `make bench` does for capy-webhooks.

  cargo bench --bench load -- --url URL [options]

  --url URL            where each event is POSTed (required)
  --header 'N: v'      an extra request header (repeat for more), e.g. 'Authorization: Bearer KEY'
  --body TEMPLATE      the request body; {{seq}}, {{blob}} and {{data}} ({\"seq\": N, \"blob\": \"...\"},
                       about 539 bytes enveloped) are replaced per event
                       [default: {\"type\":\"bench.event\",\"data\":{{data}}}, capy-webhooks' ingest]
  --events N           events to send [default: 4000]
  --endpoints K        deliveries the server should make per event (its endpoints that match) [default: 1]
  --concurrency C      requests in flight [default: 64]
  --listen ADDR        the receiver's address; point the server's endpoints at http://ADDR/<any path>,
                       one path per endpoint [default: 127.0.0.1:9999]
  --id-header NAME     the header that carries a delivery's id [default: webhook-id, else svix-id]
  --first-seq N        the first event's number (another run's events stay distinct) [default: 0]
  --timeout SECS       how long to wait for every delivery after the last event [default: 300]
";

/// The command line.
struct Args {
    load: Load,
    endpoints: u64,
    listen: std::net::SocketAddr,
    id_header: Option<String>,
    timeout: Duration,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut url = None;
    let mut headers = Vec::new();
    let mut body = loadgen::INGEST_BODY.to_string();
    let (mut events, mut endpoints, mut concurrency, mut first_seq, mut timeout) =
        (4000u64, 1u64, 64usize, 0u64, 300u64);
    let mut listen = "127.0.0.1:9999".to_string();
    let mut id_header = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: {v:?} is not a number"));
        match flag.as_str() {
            "--url" => url = Some(value()?),
            "--header" => headers.push(loadgen::parse_header(&value()?)?),
            "--body" => body = value()?,
            "--events" => events = number(value()?)?,
            "--endpoints" => endpoints = number(value()?)?,
            "--concurrency" => concurrency = number(value()?)? as usize,
            "--first-seq" => first_seq = number(value()?)?,
            "--timeout" => timeout = number(value()?)?,
            "--listen" => listen = value()?,
            "--id-header" => id_header = Some(value()?),
            // What `cargo bench` adds.
            "--bench" => {}
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(Args {
        load: Load {
            url: url.ok_or("--url is required")?,
            headers,
            body: BodyTemplate::parse(&body)?,
            events,
            first_seq,
            concurrency,
        },
        endpoints,
        listen: listen
            .parse()
            .map_err(|_| format!("--listen: {listen:?} is not an address"))?,
        id_header,
        timeout: Duration::from_secs(timeout),
    })
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            print!("{HELP}");
            return;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    let receiver = match TallyingReceiver::start(args.listen, args.id_header.clone()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.load.concurrency)
        .build()
        .expect("an HTTP client");
    eprintln!(
        "receiver on {}; sending {} events to {} ({} in flight)",
        receiver.url, args.load.events, args.load.url, args.load.concurrency
    );
    let sent = loadgen::send(&http, &args.load).await;
    let expected = args.load.events * args.endpoints;
    let all = receiver.wait_unique(expected, args.timeout).await;
    // Let late duplicates in before counting them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (unique, duplicates, without_id, endpoints, (fewest, most), last) = receiver.with_tally(|t| {
        (
            t.unique(),
            t.duplicates(),
            t.without_id(),
            t.endpoints(),
            t.per_endpoint_range(),
            t.last_new(),
        )
    });
    let span = last.map_or(sent.took, |l| l.duration_since(sent.started));
    println!(
        "events: {} accepted in {:.1} s ({:.0}/s), {} refused and sent again",
        sent.accepted,
        sent.took.as_secs_f64(),
        sent.accepted as f64 / sent.took.as_secs_f64(),
        sent.refused
    );
    println!(
        "deliveries: {unique} of {expected} distinct, {duplicates} duplicates, {without_id} without an id; \
         {endpoints} endpoints, {fewest}..{most} each"
    );
    println!(
        "throughput: {:.0} deliveries/s (first event sent to last distinct delivery, {:.1} s)",
        unique as f64 / span.as_secs_f64(),
        span.as_secs_f64()
    );
    if !all {
        eprintln!(
            "error: {expected} deliveries expected, {unique} arrived within {:?}",
            args.timeout
        );
        std::process::exit(1);
    }
}
