//! Turns SIGTERM and SIGINT (and, when asked, the end of the parent process) into the
//! cancellation of one token that every part watches.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT.
pub fn on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        token.cancel();
    });
    Ok(())
}

/// Cancels `token` once the process that started this one has exited (the worker is then
/// re-parented): a local-mode worker drains when `mailpipe local` is gone, however it went.
pub fn with_parent(token: CancellationToken) {
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
            if std::os::unix::process::parent_id() != parent {
                tracing::info!("the process that started this worker is gone; shutting down");
                token.cancel();
                return;
            }
        }
    });
}
