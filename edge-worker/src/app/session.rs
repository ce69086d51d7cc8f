//! The shopper's session cookie at the edge (`shared::session`): read before a request is
//! answered, so this isolate starts from what the shopper was last shown wherever that was;
//! written after, when what they were shown changed.

use super::App;
use crate::http::HttpRequest;
use crate::identity::Identity;
use shared::delta::Stored;
use shared::keys::UserKey;
use shared::session::{self, MAX_AGE_S, OwnEvent, Session, TAG_LEN};

/// The session record a request carried.
pub(super) struct Incoming<'r> {
    value: &'r str,
    tag: [u8; TAG_LEN],
    /// The record, verified and decoded; `None` when it was recognised instead (the record
    /// this isolate's entry is known to show: adopting it again would change nothing).
    record: Option<Session>,
    /// Whose record it is (`Identity::user_id`): the user its events are taken over for.
    user: String,
}

impl App {
    /// Seeds this isolate's cache from the request's session cookie, when it carries a valid
    /// record for `who`. Returns the record, to tell later whether it changed.
    pub(super) fn adopt_session<'r>(
        &self,
        req: &'r HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        now_ms: u64,
    ) -> Option<Incoming<'r>> {
        let secret = self.config.user_key_secret.as_deref()?;
        let key = key?;
        let name = session::cookie_name(matches!(who, Identity::User(_)), self.cookie_secure(req));
        let value = crate::token::cookie(req.header("cookie")?, name)?;
        let tag = session::tag_of(value)?;
        // a browser echoing the record its last answer here set, nothing changed since: the
        // usual request, answered without verifying, decoding or adopting the record again
        if self
            .cache
            .borrow()
            .peek(&key)
            .is_some_and(|e| e.shows_record(&tag, now_ms / 1000))
        {
            return Some(Incoming {
                value,
                tag,
                record: None,
                user: who.user_id(),
            });
        }
        let record = Session::decode(secret, value, &key, now_ms / 1000)?;
        let user = who.user_id();
        self.adopt_record(key, &record, &user, now_ms);
        Some(Incoming {
            value,
            tag,
            record: Some(record),
            user,
        })
    }

    fn adopt_record(&self, key: UserKey, record: &Session, user: &str, now_ms: u64) {
        let events = record
            .events
            .iter()
            .cloned()
            .map(|e| e.into_event(user.to_owned()))
            .collect();
        self.cache
            .borrow_mut()
            .adopt(key, record.base.as_ref(), events, now_ms);
    }

    /// Takes the request's record (`incoming`, for `key`) again where `key`'s entry no
    /// longer shows it: after the request waited on KV, the entry may have been dropped
    /// meanwhile (pushed out by other requests, a sync gap) and rebuilt from what KV gave,
    /// older than what the shopper was shown. A record this request adopted is taken again
    /// as it is (nothing new: nothing changes); one recognised on arrival is decoded only now.
    pub(super) fn readopt(&self, incoming: Option<&Incoming>, key: UserKey, now_ms: u64) {
        let Some(incoming) = incoming else {
            return;
        };
        let now_s = now_ms / 1000;
        if self
            .cache
            .borrow()
            .peek(&key)
            .is_some_and(|e| e.shows_record(&incoming.tag, now_s))
        {
            return;
        }
        let decoded;
        let record = match &incoming.record {
            Some(r) => r,
            None => {
                let Some(secret) = self.config.user_key_secret.as_deref() else {
                    return;
                };
                decoded = Session::decode(secret, incoming.value, &key, now_s);
                let Some(r) = &decoded else {
                    return;
                };
                r
            }
        };
        self.adopt_record(key, record, &incoming.user, now_ms);
    }

    /// The `Set-Cookie` value carrying what this answer showed `who`, when it differs from
    /// what the request carried (`incoming`).
    pub(super) fn session_cookie(
        &self,
        req: &HttpRequest,
        who: &Identity,
        key: Option<UserKey>,
        incoming: Option<&Incoming>,
        now_ms: u64,
    ) -> Option<String> {
        let secret = self.config.user_key_secret.as_deref()?;
        let key = key?;
        let now_s = now_ms / 1000;
        if incoming.is_some_and(|i| {
            self.cache
                .borrow()
                .peek(&key)
                .is_some_and(|e| e.shows_record(&i.tag, now_s))
        }) {
            return None;
        }
        // the entry may have been dropped and rebuilt from an older KV value while the
        // request waited (after its last lookup): it takes the record again first, so the new
        // record, which this isolate will recognise as showing the entry, does
        self.readopt(incoming, key, now_ms);
        // (a record from before an erasure this isolate fenced shows the tombstone)
        self.apply_fence(key, now_ms);
        // recognised when the request came, but the entry changed since: read it now
        let decoded;
        let incoming = match incoming {
            Some(Incoming {
                record: Some(r),
                tag,
                ..
            }) => Some((r, *tag)),
            Some(Incoming {
                value,
                tag,
                record: None,
                ..
            }) => {
                decoded = Session::decode(secret, value, &key, now_s);
                decoded.as_ref().map(|r| (r, *tag))
            }
            None => None,
        };
        let (mut base, events) = self.cache.borrow().session_state(&key)?;
        // never behind what the shopper was shown (the entry may have been evicted or dropped
        // while KV was read); a tombstone wins a tie
        if let Some(old) = incoming.and_then(|(r, _)| r.base.as_ref()) {
            let newer = base.as_ref().is_none_or(|b| {
                old.version() > b.version()
                    || (old.version() == b.version()
                        && matches!(old, Stored::Tombstone { .. })
                        && !matches!(b, Stored::Tombstone { .. }))
            });
            if newer {
                base = Some(old.clone());
            }
        }
        let events: Vec<OwnEvent> = events.iter().map(OwnEvent::of).collect();
        let unchanged = match incoming {
            Some((old, _)) => old.base == base && old.events == events,
            None => base.is_none() && events.is_empty(),
        };
        if unchanged {
            if let Some((old, tag)) = incoming {
                self.cache.borrow_mut().mark_shown(&key, tag, old.issued_s);
            }
            return None;
        }
        let record = Session {
            user: key,
            issued_s: now_s,
            base,
            events,
        };
        // A record cut to fit a cookie (a large profile's base left out) is recognised too: it
        // is the most of this entry a cookie holds, and cutting the same entry again gives the
        // same record, so sending it again on every answer would only re-sign it (and have the
        // next request verify it) for nothing. Any change to the entry forgets the tag.
        let value = record.encode(secret);
        if let Some(tag) = session::tag_of(&value) {
            self.cache.borrow_mut().mark_shown(&key, tag, now_s);
        }
        Some(format!(
            "{}={}; Path=/; Max-Age={MAX_AGE_S}; HttpOnly; SameSite=Lax{}",
            session::cookie_name(matches!(who, Identity::User(_)), self.cookie_secure(req)),
            value,
            if self.cookie_secure(req) {
                "; Secure"
            } else {
                ""
            }
        ))
    }

    /// Clears the visitor's record once the visitor signed in (it joined the signed-in one).
    pub(super) fn visitor_record_clear(&self, req: &HttpRequest) -> String {
        let secure = self.cookie_secure(req);
        format!(
            "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{}",
            session::cookie_name(false, secure),
            if secure { "; Secure" } else { "" }
        )
    }
}
