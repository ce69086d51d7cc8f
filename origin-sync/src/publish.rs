//! Publication of the catalog and rules: the files are validated (catalog compiled, rules
//! compiled against it), versioned in the store when they change, and handed to the sender;
//! an invalid file is reported and the last valid version stays live.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shared::catalog::Catalog;
use shared::rules::CompiledRules;
use shared::wire::ConfigKind;
use tokio::sync::watch;

use crate::pipeline::{Shared, blocking};

fn read_document(kind: ConfigKind, path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {kind:?} file {}: {e}", path.display()))
}

/// Loads, validates and versions the catalog and rules; republishes when the files change.
pub async fn watch_documents(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let cfg = shared.config.documents.clone();
    if cfg.catalog.is_none() && cfg.rules.is_none() {
        return;
    }
    let mut last_error = String::new();
    loop {
        match check_documents(&shared, &cfg).await {
            Ok(changed) => {
                last_error.clear();
                shared.metrics.documents_invalid.store(0, Relaxed);
                if changed {
                    shared.documents.send_modify(|v| *v += 1);
                }
            }
            Err(e) => {
                shared.metrics.documents_invalid.store(1, Relaxed);
                if e != last_error {
                    tracing::error!(error = %e, "catalog/rules not published; fix the file, the last valid version stays live");
                    last_error = e;
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(Duration::from_millis(cfg.poll_ms.max(100))) => {}
        }
    }
}

/// Returns true when a document got a new version.
pub async fn check_documents(
    shared: &Shared,
    cfg: &crate::config::DocumentsConfig,
) -> Result<bool, String> {
    let catalog_src = match &cfg.catalog {
        Some(p) => Some(read_document(ConfigKind::Catalog, p)?),
        None => None,
    };
    let rules_src = match &cfg.rules {
        Some(p) => Some(read_document(ConfigKind::Rules, p)?),
        None => None,
    };
    let catalog = match &catalog_src {
        Some(src) => Catalog::from_toml(src).map_err(|e| format!("catalog: {e}"))?,
        None => Catalog::demo().map_err(|e| format!("demo catalog: {e}"))?,
    };
    if let Some(src) = &rules_src {
        CompiledRules::compile(src, &catalog).map_err(|e| format!("rules: {e}"))?;
    }
    // Two SKUs whose 32-bit item ids collide are served, but profiles cannot tell them apart
    // (a view of one counts as a view of both): worth an operator's attention, not a refusal.
    let collisions = catalog.id_collisions();
    let before = shared
        .metrics
        .catalog_id_collisions
        .swap(collisions.len() as u64, Relaxed);
    if !collisions.is_empty() && before != collisions.len() as u64 {
        tracing::warn!(
            count = collisions.len(),
            pairs = ?collisions.iter().take(10).collect::<Vec<_>>(),
            "catalog SKUs share an item id; profiles will not tell each pair apart"
        );
    }
    let mut changed = false;
    for (kind, src) in [
        (ConfigKind::Catalog, catalog_src),
        (ConfigKind::Rules, rules_src),
    ] {
        if let Some(src) = src {
            let store = shared.store.clone();
            let v = blocking(move || store.put_document(kind, &src))
                .await
                .map_err(|e| e.to_string())?;
            if let Some(v) = v {
                tracing::info!(kind = ?kind, version = v, "document changed; publishing");
                changed = true;
            }
        }
    }
    Ok(changed)
}
