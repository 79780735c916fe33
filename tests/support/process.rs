//! The operator binary as a child process, for what only the real binary does (SIGKILL, its
//! operations port, start-up against an unreachable API server).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::operator::INGEST_TOKEN;

/// The operator binary as a child process; killed with SIGKILL when dropped.
pub struct OperatorProcess {
    pub child: Child,
}

impl OperatorProcess {
    /// Runs `capy-webhooks run --namespace ns` against the cluster `kubeconfig` names, with the
    /// test ingest token (written to `dir`), HTTP and loopback receivers allowed, status summaries
    /// every second, and `args` on top; its log goes to `dir/log_name`.
    pub fn start(ns: &str, kubeconfig: &Path, dir: &Path, log_name: &str, args: &[String]) -> Self {
        let token_file = dir.join("ingest-token");
        std::fs::write(&token_file, INGEST_TOKEN).unwrap();
        let log = std::fs::File::create(dir.join(log_name)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_capy-webhooks"))
            .args(["run", "--namespace", ns])
            .arg("--ingest-token-file")
            .arg(&token_file)
            .args(["--allow-http", "--allow-private-targets"])
            .args(["--summary-interval", "1s"])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("operator binary starts");
        Self { child }
    }

    /// [`Self::start`] with `flags` as `--flag value` pairs, logging to `<name>-<random>.log` (a
    /// replica started again keeps the log of its earlier run).
    #[allow(dead_code)] // not every test binary runs replicas
    pub fn start_replica(ns: &str, dir: &Path, name: &str, flags: Vec<(&str, String)>) -> Self {
        let args: Vec<String> = flags
            .into_iter()
            .flat_map(|(flag, value)| [flag.to_string(), value])
            .collect();
        let log = format!("{name}-{}.log", rand::random::<u16>());
        Self::start(ns, &super::kubeconfig_path(), dir, &log, &args)
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates an endpoint of `org` for `url` over the REST port `api_port` of an operator process,
/// with API key `key`; returns its id. Retries until the operator's key index (a watch) knows the
/// key.
pub async fn create_endpoint(http: &reqwest::Client, api_port: u16, org: &str, key: &str, url: &str) -> String {
    let base = format!("http://127.0.0.1:{api_port}/v1/organizations/{org}/webhook-endpoints");
    let created: serde_json::Value = super::wait_for("endpoint created over REST", Duration::from_secs(60), || async {
        let res = http
            .post(&base)
            .bearer_auth(key)
            .json(&serde_json::json!({"url": url}))
            .send()
            .await
            .ok()?;
        (res.status() == 201).then_some(())?;
        res.json().await.ok()
    })
    .await;
    created["webhook_endpoint"]["id"]
        .as_str()
        .expect("an endpoint id")
        .to_string()
}
