//! The catalog and rules documents origin-sync publishes: their source, version and the version
//! every sink acknowledged, in the store's `documents` table.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use shared::wire::{ConfigDoc, ConfigKind};

use super::{DOCUMENTS, Store, StoreError, decode, encode};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DocState {
    version: u64,
    source: String,
    acked: u64,
}

fn doc_name(kind: ConfigKind) -> &'static str {
    match kind {
        ConfigKind::Catalog => "catalog",
        ConfigKind::Rules => "rules",
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
                    let version = old.as_ref().map_or(1, |d| d.version + 1);
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
        }
        tx.commit()?;
        Ok(())
    }

    /// Documents not yet acknowledged at their current version.
    pub fn pending_documents(&self) -> Result<Vec<ConfigDoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DOCUMENTS)?;
        let mut out = Vec::new();
        for kind in [ConfigKind::Catalog, ConfigKind::Rules] {
            if let Some(g) = t.get(doc_name(kind))? {
                let d: DocState = decode(g.value(), "document")?;
                // The edge reads the JSON form (it carries no TOML parser). The source was
                // validated before it was stored, so conversion cannot fail; skip it if it does.
                if d.acked < d.version
                    && let Ok(source) = shared::catalog::toml_to_json(&d.source)
                {
                    out.push(ConfigDoc {
                        kind,
                        version: d.version,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn acknowledge_documents(&self, docs: &[ConfigDoc]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(DOCUMENTS)?;
            for doc in docs {
                let Some(g) = t.get(doc_name(doc.kind))? else {
                    continue;
                };
                let mut d: DocState = decode(g.value(), "document")?;
                drop(g);
                d.acked = d.acked.max(doc.version);
                t.insert(doc_name(doc.kind), encode(&d).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
