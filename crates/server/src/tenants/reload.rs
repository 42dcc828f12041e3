//! Reloading the tenants file without a restart: on SIGHUP, and when its modification time
//! or length changes (polled, so no file-watching crate and no platform quirks). A broken
//! file keeps the tenants in force and says why at warn level.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;

use super::TenantStore;

/// What a poll compares: the file's modification time and length (`None` while unreadable).
type Stamp = Option<(SystemTime, u64)>;

fn stamp(store: &TenantStore) -> Stamp {
    let meta = std::fs::metadata(store.file()?).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn reload(store: &TenantStore, why: &str) {
    let file = store.file().map(|p| p.display().to_string()).unwrap_or_default();
    match store.reload() {
        Ok(n) => tracing::info!(file = %file, tenants = n, "tenants reloaded ({why})"),
        Err(e) => tracing::warn!("tenants not reloaded ({why}), the previous ones stay in force: {e}"),
    }
}

/// Starts the reloader when there is a tenants file: it polls every `interval` and listens
/// for SIGHUP. Abort the handle to stop it.
pub fn spawn_reloader(store: Arc<TenantStore>, interval: Duration) -> Option<JoinHandle<()>> {
    store.file()?;
    Some(tokio::spawn(async move {
        let mut last = stamp(&store);
        let mut hangup = hangup_signal();
        loop {
            tokio::select! {
                _ = next_hangup(&mut hangup) => {
                    last = stamp(&store);
                    reload(&store, "SIGHUP");
                }
                _ = tokio::time::sleep(interval) => {
                    let now = stamp(&store);
                    if now != last {
                        last = now;
                        reload(&store, "the file changed");
                    }
                }
            }
        }
    }))
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    signal(SignalKind::hangup()).map_err(|e| tracing::warn!("no SIGHUP reload of the tenants file: {e}")).ok()
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

/// Resolves at the next SIGHUP; never where there is none.
async fn next_hangup(h: &mut Hangup) {
    #[cfg(unix)]
    if let Some(s) = h {
        if s.recv().await.is_some() {
            return;
        }
    }
    let _ = h;
    std::future::pending::<()>().await
}
