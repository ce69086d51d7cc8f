//! The documents origin-sync publishes (catalog, rules, and the erasure fence built from the
//! erasures it stores): their source and version, in the store's `documents` table (what each
//! sink acknowledged is in `sinks.rs`).

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use shared::fence::ErasureFence;
use shared::keys::UserKey;
use shared::wire::ConfigKind;

use super::sinks::SINK_DOCUMENTS;
use super::{DOCUMENTS, Store, StoreError, decode, encode};

/// A stored document, for `sinks.rs`.
#[derive(Clone, Debug)]
pub(super) struct DocRow {
    pub kind: ConfigKind,
    pub version: u64,
    pub source: String,
    pub legacy_acked: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DocState {
    version: u64,
    source: String,
    acked: u64,
}

pub(super) fn doc_name(kind: ConfigKind) -> &'static str {
    kind.name()
}

/// Adds erasures (user key, tombstone version, when origin stored it) to the erasure fence
/// document, in the transaction that stores them, so the fence never misses an erasure the
/// store holds. The fence keeps the window before the newest entry.
pub(super) fn fence_erasures(
    tx: &redb::WriteTransaction,
    erased: &[(UserKey, u64, u64)],
    versions: Versions,
) -> Result<(), StoreError> {
    if erased.is_empty() {
        return Ok(());
    }
    let mut t = tx.open_table(DOCUMENTS)?;
    let name = doc_name(ConfigKind::Erasures);
    let old: Option<DocState> = match t.get(name)? {
        Some(g) => Some(decode(g.value(), "document")?),
        None => None,
    };
    // origin wrote it, so it parses; were it ever unreadable, starting again from these
    // erasures beats refusing to store them
    let mut fence = old
        .as_ref()
        .and_then(|d| ErasureFence::from_json(&d.source).ok())
        .unwrap_or_default();
    for &(key, version, at_ms) in erased {
        fence.raise(key, version, at_ms);
    }
    fence.trim(fence.newest_ms());
    let source = fence.to_json();
    if old.as_ref().is_some_and(|d| d.source == source) {
        return Ok(());
    }
    let state = DocState {
        version: versions.next(old.as_ref().map(|d| d.version)),
        source,
        acked: old.map_or(0, |d| d.acked),
    };
    t.insert(name, encode(&state).as_slice())?;
    Ok(())
}

/// How a changed document's next version is picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Versions {
    /// One instance: the previous version + 1.
    Counted,
    /// Several instances (`assignment = "group"`): the publisher may change hands, and the
    /// next publisher's store holds versions of its own, so a version is the time it was made
    /// (Unix ms), and above the previous one. A new publisher's change then outranks the
    /// previous publisher's versions at the edge (clocks in sync within the time between
    /// two changes of a document).
    Timed,
}

impl Versions {
    fn next(self, old: Option<u64>) -> u64 {
        let counted = old.map_or(1, |v| v + 1);
        match self {
            Versions::Counted => counted,
            Versions::Timed => counted.max(crate::clock::now_ms()),
        }
    }
}

impl Store {
    /// Records a catalog or rules source; a changed source gets the next version.
    /// Returns the version when it changed.
    pub fn put_document(&self, kind: ConfigKind, source: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write()?;
        let changed;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            let old: Option<DocState> = match t.get(doc_name(kind))? {
                Some(g) => Some(decode(g.value(), "document")?),
                None => None,
            };
            changed = match old {
                Some(d) if d.source == source => None,
                old => {
                    let version = self.versions().next(old.as_ref().map(|d| d.version));
                    let state = DocState {
                        version,
                        source: source.to_owned(),
                        acked: old.map_or(0, |d| d.acked),
                    };
                    t.insert(doc_name(kind), encode(&state).as_slice())?;
                    Some(version)
                }
            };
        }
        tx.commit()?;
        Ok(changed)
    }

    /// Forces the next publication of every document (the `republish` command).
    pub fn republish_documents(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            let mut all = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                all.push((
                    k.value().to_owned(),
                    decode::<DocState>(v.value(), "document")?,
                ));
            }
            for (k, mut d) in all {
                d.acked = 0;
                t.insert(k.as_str(), encode(&d).as_slice())?;
            }
            // every sink's own acknowledgements too
            let mut sinks_t = tx.open_table(SINK_DOCUMENTS)?;
            sinks_t.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every document with its version, source and the acknowledged version older stores
    /// kept for all sinks (a sink without its own starts from it).
    pub(super) fn documents(&self) -> Result<Vec<DocRow>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DOCUMENTS)?;
        let mut out = Vec::new();
        for kind in ConfigKind::ALL {
            if let Some(g) = t.get(doc_name(kind))? {
                let d: DocState = decode(g.value(), "document")?;
                out.push(DocRow {
                    kind,
                    version: d.version,
                    source: d.source,
                    legacy_acked: d.acked,
                });
            }
        }
        Ok(out)
    }
}
