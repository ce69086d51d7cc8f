//! The store's layout version, and the upgrade from older layouts.
//!
//! Records are plain postcard, which carries no version of its own: a record of an older
//! layout could decode as a newer one and be misread. So the store keeps its layout in the
//! `meta` table, and opening an older store rewrites its records in the current layout, in the
//! same write transaction that records the new version (all or nothing, and at most once).
//!
//! * layout 1: profiles in wire format 1 (users, sink marks, the older shared `acked` values);
//! * layout 2: profiles carry `folded` (wire format 2);
//! * layout 3: a user's value carries their stamp ahead of their state
//!   (`partitions::user_value`); the `stamps` table is emptied into it. The state itself is
//!   still layout 2's ([`STATE_LAYOUT`], what changelog records carry).
//! * layout 4: the outbox in fixed-width rows (`OUTBOX`, table `outbox_fixed`); the postcard
//!   entries of table `outbox` are moved into it.
//!
//! There is no downgrade: an older origin-sync must not open a store this one has upgraded.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use shared::wire::v1;

use super::partitions::{STAMPS, user_value_raw};
use super::sinks::{SINK_MARKS, SinkMark};
use super::state::UserState;
use super::{ACKED, OUTBOX, Pending, StoreError, USERS, decode, encode};

/// `"layout"` → the layout the store's records are in.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// A sink mark's key, owned.
type SinkAndKey = (String, Vec<u8>);
/// A key and its value, owned.
type Row = (Vec<u8>, Vec<u8>);
/// The outbox of layouts 1 to 3: `UserKey` → [`Pending`] in postcard.
const OUTBOX_POSTCARD: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");

/// The layout this build writes.
pub(super) const LAYOUT: u64 = 4;

/// The layout of a user's state encoding, which changelog records name: unchanged by layout 3
/// (which changed what surrounds the state), so instances before and after it read each
/// other's changelog records during a rolling upgrade.
pub(super) const STATE_LAYOUT: u64 = 2;

/// Brings the store to [`LAYOUT`]; returns how many records were rewritten.
pub(super) fn upgrade(tx: &WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META)?;
    let layout = meta.get("layout")?.map(|g| g.value());
    match layout {
        Some(LAYOUT) => return Ok(0),
        Some(newer) if newer > LAYOUT => {
            return Err(StoreError::Corrupt(format!(
                "the store has layout {newer}, written by a newer origin-sync; this build reads \
                 layout {LAYOUT} and older (run the newer build, or start from an empty store)"
            )));
        }
        _ => {}
    }
    let mut rewritten = 0;
    let from = layout.unwrap_or(0);
    if from < 3 {
        let mut users = tx.open_table(USERS)?;
        let stamps = tx.open_table(STAMPS)?;
        for (k, v) in byte_rows(&users)? {
            let state = if from < 2 {
                encode(&UserState::decode_layout1(&v)?)
            } else {
                v
            };
            // the whole table goes below
            let stamp = stamps.get(k.as_slice())?.map(|g| g.value().to_vec());
            users.insert(
                k.as_slice(),
                user_value_raw(stamp.as_deref().unwrap_or_default(), &state).as_slice(),
            )?;
            rewritten += 1;
        }
    }
    tx.delete_table(STAMPS)?;
    {
        let old = tx.open_table(OUTBOX_POSTCARD)?;
        let mut outbox = tx.open_table(OUTBOX)?;
        for (k, v) in byte_rows(&old)? {
            let key = super::partitions::user_key(&k, "outbox")?;
            outbox.insert(&key.0, Pending::decode(&v)?)?;
            rewritten += 1;
        }
    }
    tx.delete_table(OUTBOX_POSTCARD)?;
    if from < 2 {
        {
            let mut marks = tx.open_table(SINK_MARKS)?;
            let old: Vec<(SinkAndKey, Vec<u8>)> = marks
                .iter()?
                .map(|r| {
                    r.map(|(k, v)| {
                        let (sink, key) = k.value();
                        ((sink.to_owned(), key.to_vec()), v.value().to_vec())
                    })
                })
                .collect::<Result<_, _>>()?;
            for ((sink, key), v) in old {
                let mark = SinkMark::decode_layout1(&v)?;
                marks.insert((sink.as_str(), key.as_slice()), encode(&mark).as_slice())?;
                rewritten += 1;
            }
        }
        {
            let mut acked = tx.open_table(ACKED)?;
            for (k, v) in byte_rows(&acked)? {
                let stored: shared::delta::Stored = decode::<v1::Stored>(&v, "acked")?.into();
                acked.insert(k.as_slice(), encode(&stored).as_slice())?;
                rewritten += 1;
            }
        }
    }
    meta.insert("layout", LAYOUT)?;
    Ok(rewritten)
}

/// Every row of a bytes-to-bytes table, owned (so the table can be rewritten while they are
/// read).
fn byte_rows(table: &redb::Table<&[u8], &[u8]>) -> Result<Vec<Row>, StoreError> {
    Ok(table
        .iter()?
        .map(|r| r.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())))
        .collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, Window};
    use shared::delta::Stored;
    use shared::event::parse_event;
    use shared::keys::UserKey;

    const SECRET: &[u8] = b"layout-test-secret";
    const WINDOW: Window = Window {
        reorder_ms: 0,
        max_events: 0,
    };

    fn path(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("edgewise-layout-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    fn add(id: &str, ts: u64) -> shared::event::Event {
        parse_event(
            format!(
                r#"{{"event_id":"{id}","user_id":"u1","ts":{ts},"type":"add_to_cart","item":"cam-001","category":"cameras","price":499}}"#
            )
            .as_bytes(),
        )
        .expect("valid")
    }

    /// Writes a store as an older release left it: `layout` in `meta` (none before layout 2),
    /// one user's value as given, and whatever else `more` writes, in one transaction.
    fn write_old_store(
        file: &std::path::Path,
        layout: Option<u64>,
        key: &UserKey,
        value: &[u8],
        more: impl FnOnce(&redb::WriteTransaction),
    ) {
        let db = redb::Database::create(file).expect("db");
        let tx = db.begin_write().expect("tx");
        if let Some(layout) = layout {
            tx.open_table(META)
                .expect("meta")
                .insert("layout", layout)
                .expect("insert");
        }
        tx.open_table(USERS)
            .expect("users")
            .insert(key.0.as_slice(), value)
            .expect("insert");
        more(&tx);
        tx.commit().expect("commit");
    }

    /// Opening again upgrades nothing: the upgrade ran at most once.
    fn assert_upgraded_once(store: &Store) {
        let tx = store.db.begin_write().expect("tx");
        assert_eq!(upgrade(&tx).expect("upgrade"), 0);
        tx.commit().expect("commit");
    }

    /// A store written by the previous release (profiles in wire format 1, no `meta` table)
    /// opens, is rewritten in the current layout once, and reads as it did.
    #[test]
    fn a_layout_1_store_is_upgraded_once_and_reads_the_same() {
        let file = path("upgrade");
        let key = UserKey::derive(SECRET, "u1");
        let mut state = UserState::fresh(&key);
        for (i, ts) in [1_800_000_000_000u64, 1_800_000_001_000].iter().enumerate() {
            state.insert(&add(&format!("e{i}"), *ts), None, WINDOW);
        }
        let before = match state.current() {
            Stored::Profile(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(before.cart.len(), 1);
        write_old_store(&file, None, &key, &state.encode_layout1(), |tx| {
            let old = v1::Stored::Profile((&before).into());
            tx.open_table(ACKED)
                .expect("acked")
                .insert(key.0.as_slice(), encode(&old).as_slice())
                .expect("insert");
        });

        let store = Store::open(&file, SECRET, WINDOW).expect("the old store opens");
        match store.current("u1").expect("reads") {
            // the profile as before; the tags the base lost in format 1 are simply absent
            Some(Stored::Profile(p)) => {
                assert_eq!(
                    (p.version, &p.cart, p.views),
                    (2, &before.cart, before.views)
                );
                assert!(p.folded.len() <= 2, "{:?}", p.folded);
            }
            other => panic!("{other:?}"),
        }
        let tx = store.db.begin_read().expect("read");
        let acked = tx.open_table(ACKED).expect("acked");
        let value = acked.get(key.0.as_slice()).expect("get").expect("kept");
        let stored: Stored = decode(value.value(), "acked").expect("current layout");
        assert_eq!(stored.version(), 2);
        drop((value, acked, tx));

        // at most once: the second open rewrites nothing
        assert_upgraded_once(&store);
        drop(store);
        let _ = std::fs::remove_file(&file);
    }

    /// A store of layout 2 (stamps in a table of their own) opens with each stamp moved into
    /// its user's value: same state, same stamp, the table gone, and at most once. An erasure
    /// afterwards keeps the stamp (it is not input of the user's partition).
    #[test]
    fn a_layout_2_store_moves_its_stamps_into_the_users_values() {
        let file = path("stamps");
        let key = UserKey::derive(SECRET, "u1");
        let mut state = UserState::fresh(&key);
        state.insert(&add("e0", 1_800_000_000_000), None, WINDOW);
        let stamp = crate::store::Stamp {
            partition: 3,
            next: vec![("cart_events".into(), 42)],
            epoch: 0,
        };
        write_old_store(&file, Some(2), &key, &encode(&state), |tx| {
            tx.open_table(STAMPS)
                .expect("stamps")
                .insert(key.0.as_slice(), encode(&stamp).as_slice())
                .expect("insert");
        });
        let store = Store::open(&file, SECRET, WINDOW)
            .expect("the layout 2 store opens")
            .partitioned();
        assert_eq!(store.stamp("u1").expect("reads"), Some(stamp.clone()));
        assert_eq!(
            store.current("u1").expect("reads").map(|s| s.version()),
            Some(1)
        );
        {
            let tx = store.db.begin_read().expect("read");
            assert!(tx.open_table(STAMPS).is_err(), "the stamps table is gone");
        }
        assert_upgraded_once(&store);

        store.erase("u1", 1_800_000_005_000).expect("erased");
        assert!(matches!(
            store.current("u1").expect("reads"),
            Some(Stored::Tombstone { .. })
        ));
        assert_eq!(store.stamp("u1").expect("reads"), Some(stamp));
        drop(store);
        let _ = std::fs::remove_file(&file);
    }

    /// A store of layout 3 (the outbox in postcard) opens with its outbox entries in
    /// fixed-width rows, of each earlier entry encoding, times kept; users untouched; at most
    /// once.
    #[test]
    fn a_layout_3_store_moves_its_outbox_into_fixed_width_rows() {
        let file = path("outbox");
        let keys: Vec<UserKey> = ["u1", "u2", "u3"]
            .iter()
            .map(|u| UserKey::derive(SECRET, u))
            .collect();
        let mut state = UserState::fresh(&keys[0]);
        state.insert(&add("e0", 1_800_000_000_000), None, WINDOW);
        let value = user_value_raw(&[], &encode(&state));
        write_old_store(&file, Some(3), &keys[0], &value, |tx| {
            let mut old = tx.open_table(OUTBOX_POSTCARD).expect("outbox");
            let layout_1 = encode(&1_700_000_000_001u64);
            let layout_2 = encode(&(1_700_000_000_002u64, 1_700_000_000_020u64));
            let layout_3 = encode(&(1_700_000_000_003u64, 1_700_000_000_030u64, 77u64));
            for (key, entry) in keys.iter().zip([layout_1, layout_2, layout_3]) {
                old.insert(key.0.as_slice(), entry.as_slice())
                    .expect("insert");
            }
        });
        let store = Store::open(&file, SECRET, WINDOW).expect("the layout 3 store opens");
        let mut outbox = store.outbox().expect("outbox");
        outbox.sort_by_key(|(_, ts)| *ts);
        let mut expected = vec![
            (keys[0], 1_700_000_000_001),
            (keys[1], 1_700_000_000_002),
            (keys[2], 1_700_000_000_003),
        ];
        expected.sort_by_key(|(_, ts)| *ts);
        assert_eq!(outbox, expected);
        // the entries of layouts 1 and 2 were stored at an unknown time: as old as can be
        assert_eq!(store.outbox_oldest_stored(0).expect("oldest"), Some(0));
        {
            let tx = store.db.begin_read().expect("read");
            let users = tx.open_table(USERS).expect("users");
            let got = users.get(keys[0].0.as_slice()).expect("get").expect("kept");
            assert_eq!(
                got.value(),
                value.as_slice(),
                "a user's value is not rewritten"
            );
            assert!(
                tx.open_table(OUTBOX_POSTCARD).is_err(),
                "the postcard outbox is gone"
            );
        }
        assert_upgraded_once(&store);
        drop(store);
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn a_store_of_a_newer_layout_is_refused_with_what_to_do() {
        let file = path("newer");
        {
            let db = redb::Database::create(&file).expect("db");
            let tx = db.begin_write().expect("tx");
            tx.open_table(META)
                .expect("meta")
                .insert("layout", LAYOUT + 1)
                .expect("insert");
            tx.commit().expect("commit");
        }
        let err = Store::open(&file, SECRET, WINDOW).expect_err("refused");
        assert!(err.to_string().contains("newer origin-sync"), "{err}");
        let _ = std::fs::remove_file(&file);
    }
}
