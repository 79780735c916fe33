//! For test binaries with their own harness (libtest-mimic): async tests as trials, and an honest
//! "ignored" in the runner's count for those that need a control plane this process starts when
//! `KUBECONFIG` names another cluster.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use libtest_mimic::{Failed, Trial};

/// What a trial needs of the cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Any cluster: runs against `KUBECONFIG` too.
    AnyCluster,
    /// The control plane this process starts (it stops the API server, sizes etcd, ...): ignored,
    /// and counted so, when `KUBECONFIG` names another cluster.
    OwnControlPlane,
}

/// A trial that runs `test` on a runtime of its own, as `#[tokio::test]` does; a panic fails it
/// with the panic's message.
pub fn async_trial<F, Fut>(name: &'static str, needs: Needs, test: F) -> Trial
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let ignored = needs == Needs::OwnControlPlane && super::external_cluster();
    Trial::test(name, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failed::from(format!("cannot start a runtime: {e}")))?;
        std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(test()))).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the test panicked".into())
                .into()
        })
    })
    .with_ignored_flag(ignored)
}
