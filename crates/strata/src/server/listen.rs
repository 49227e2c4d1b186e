//! The CSI endpoint: the unix socket this server owns (bound private, removed only if still
//! its own), and serving until a signal with a bounded grace for in-flight calls.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_core::os::FileId;
use tokio::signal::unix::{SignalKind, signal};

use super::CsiRouter;

/// The unix socket this process bound, identified by device and inode: removed at exit only
/// if it is still this one (a newer server may have replaced it).
pub(super) struct OwnedSocket {
    path: PathBuf,
    id: FileId,
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        if FileId::of(&self.path).ok() == Some(self.id) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Binds the CSI socket: refuses a path where a live server answers, replaces a stale
/// socket, and never lets the socket exist with a mode wider than 0600 (bound in a private
/// directory, then renamed into place).
pub(super) fn bind_socket(
    path: &Path,
) -> Result<(std::os::unix::net::UnixListener, OwnedSocket), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "another server answers on {}; stop it first or choose another --endpoint",
                    path.display()
                ));
            }
            // Stale: replaced by the rename below.
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to overwrite it",
                path.display()
            ));
        }
        Err(_) => {}
    }
    let parent = path
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", path.display()))?;
    // A name no other process uses: only what this process made is removed below.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let private = parent.join(format!(".strata-{}-{nanos:08x}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| format!("create {}: {e}", private.display()))?;
    let bound = (|| {
        let tmp = private.join("s");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)
            .map_err(|e| format!("bind {}: {e}", path.display()))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        fs::rename(&tmp, path)
            .map_err(|e| format!("move the socket to {}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket {}: {e}", path.display()))?;
        let id = FileId::of(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
        Ok((
            listener,
            OwnedSocket {
                path: path.to_owned(),
                id,
            },
        ))
    })();
    let _ = fs::remove_dir_all(&private);
    bound
}

/// How long in-flight requests may run after SIGTERM before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests"),
    }
}

/// Serves until a shutdown signal, then lets in-flight requests finish, for at most
/// [`SHUTDOWN_GRACE`] so a client that never closes its connection cannot hold the exit.
pub(super) async fn serve_until_stopped<S, IO, IE>(
    router: CsiRouter,
    incoming: S,
) -> Result<(), String>
where
    S: tokio_stream::Stream<Item = Result<IO, IE>> + Send + 'static,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(incoming, async move {
        shutdown_signal().await;
        let _ = stopping_tx.send(());
    });
    tokio::select! {
        result = server => result.map_err(|e| format!("serve: {e}")),
        _ = async {
            if stopping_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!("shutdown grace period over; exiting with connections still open");
            Ok(())
        }
    }
}
