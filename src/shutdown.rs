//! One shutdown signal (Ctrl-C or SIGTERM) for every long-running command. It flips a
//! `watch` channel that the worker's claim loop, its cleanup loop and the HTTP server all
//! wait on.

use tokio::sync::watch;

/// Start listening for Ctrl-C and SIGTERM; the receiver turns `true` on the first one.
pub fn on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        let _ = tx.send(true);
        // Keep the sender alive so receivers see `true`, not a closed channel.
        std::future::pending::<()>().await;
    });
    rx
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

/// Resolve once `rx` turns true (or its sender is gone).
pub async fn wait(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
