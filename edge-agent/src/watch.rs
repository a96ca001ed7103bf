//! Notices writes to the database from any process by watching its directory (inotify on
//! Linux): no polling, so an idle agent uses no CPU.

use std::path::Path;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::error::Result;

/// Watches `db` (and its WAL) and sends a unit on `tx` after writes; sends coalesce while one
/// is pending. The watcher stops when dropped.
pub(crate) fn watch_database(db: &Path, tx: mpsc::Sender<()>) -> Result<RecommendedWatcher> {
    let name = db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !matches!(event.kind, notify::EventKind::Modify(_) | notify::EventKind::Create(_)) {
            return;
        }
        let ours = event.paths.iter().any(|p| p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&name)));
        if ours {
            // A full channel already holds a wake-up; that one will see this write too.
            let _ = tx.try_send(());
        }
    })?;
    let dir = db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
