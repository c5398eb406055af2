//! The NATS plumbing the operator commands share: opening a bucket (or creating it for a
//! fleet that has none yet) and read-modify-write of one KV key with compare-and-swap on
//! its revision, so that two operators editing the same scope never lose each other's
//! change (the semantics of kanade's own `kv_cas`).

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::object_store::ObjectStore;
use async_nats::jetstream::{self, Context};

/// How many times a read-modify-write re-reads and retries after losing a race. Each
/// lost round means another writer succeeded; hitting the bound means something keeps
/// rewriting the key.
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// How many servers store the JetStream stream `stream`, or `None` when it does not
/// exist.
///
/// # Errors
///
/// When the server cannot be asked.
pub async fn stream_replicas(js: &Context, stream: &str) -> anyhow::Result<Option<usize>> {
    match js.get_stream(stream).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .with_context(|| format!("cannot read JetStream stream {stream}"))?;
            Ok(Some(info.config.num_replicas))
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(anyhow!(e).context(format!("cannot look up JetStream stream {stream}"))),
        },
    }
}

/// Largest status record the status bucket stores: a record is a few KiB, and a reader
/// of every record (`collector fleet status`) must not be made to hold megabytes each.
pub const MAX_STATUS_RECORD: i32 = 64 * 1024;

/// Makes an existing bucket what agents under docs/nats-server.conf need, and returns
/// what it changed, in words: direct gets on (agents read a key with nothing else; a
/// bucket made by another tool may lack them); on the status bucket, rollup headers
/// refused (a put with `Nats-Rollup: all` on an agent's own key would purge every other
/// record) and records capped at [`MAX_STATUS_RECORD`].
///
/// # Errors
///
/// When the bucket cannot be read or updated (the operator's credential lacks
/// `$JS.API.STREAM.UPDATE.KV_<bucket>`).
pub async fn harden(js: &Context, bucket: &str) -> anyhow::Result<Vec<String>> {
    let name = format!("KV_{bucket}");
    let mut stream = js
        .get_stream(&name)
        .await
        .with_context(|| format!("cannot open JetStream stream {name}"))?;
    let mut config = stream
        .info()
        .await
        .with_context(|| format!("cannot read JetStream stream {name}"))?
        .config
        .clone();
    let mut changes = Vec::new();
    if !config.allow_direct {
        config.allow_direct = true;
        changes
            .push("direct gets turned on (agents read their keys with nothing else)".to_string());
    }
    if bucket == super::STATUS_BUCKET {
        if config.allow_rollup {
            config.allow_rollup = false;
            changes.push(
                "rollup headers refused (one agent's rollup would purge every record)".into(),
            );
        }
        if config.max_message_size <= 0 || config.max_message_size > MAX_STATUS_RECORD {
            config.max_message_size = MAX_STATUS_RECORD;
            changes.push(format!(
                "records capped at {} KiB",
                MAX_STATUS_RECORD / 1024
            ));
        }
    }
    if bucket == super::TRUST_BUCKET {
        if config.allow_rollup {
            config.allow_rollup = false;
            changes.push("rollup headers refused (a rollup would purge every root)".into());
        }
        if !config.deny_delete || !config.deny_purge {
            config.deny_delete = true;
            config.deny_purge = true;
            changes.push("deletes and purges refused (a published root stays)".into());
        }
        let cap = i32::try_from(collector_bundle::MAX_ROOT_LEN + 1024).unwrap_or(i32::MAX);
        if config.max_message_size <= 0 || config.max_message_size > cap {
            config.max_message_size = cap;
            changes.push(format!("roots capped at {} KiB", cap / 1024));
        }
    }
    if !changes.is_empty() {
        js.update_stream(&config)
            .await
            .with_context(|| format!("cannot update JetStream stream {name}"))?;
    }
    Ok(changes)
}

/// Whether the JetStream stream `stream` exists.
///
/// # Errors
///
/// When the server cannot be asked (no JetStream, no permission, timeout).
pub async fn stream_exists(js: &Context, stream: &str) -> anyhow::Result<bool> {
    match js.get_stream(stream).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(false)
            }
            _ => Err(anyhow!(e).context(format!("cannot look up JetStream stream {stream}"))),
        },
    }
}

/// The KV bucket `bucket`, or `None` when it does not exist (a read then finds nothing).
///
/// # Errors
///
/// When the bucket exists but cannot be opened, or the server cannot be asked.
pub async fn open_kv(js: &Context, bucket: &str) -> anyhow::Result<Option<Store>> {
    if !stream_exists(js, &format!("KV_{bucket}")).await? {
        return Ok(None);
    }
    js.get_key_value(bucket)
        .await
        .map(Some)
        .with_context(|| format!("cannot open KV bucket {bucket}"))
}

/// The KV bucket `bucket`, created with `history` revisions per key when missing.
///
/// # Errors
///
/// When it can be neither opened nor created.
pub async fn open_or_create_kv(js: &Context, bucket: &str, history: i64) -> anyhow::Result<Store> {
    create_kv(js, bucket, history, 1).await
}

/// The KV bucket `bucket`, created with `history` revisions per key, stored on
/// `replicas` servers of a cluster, when missing. An existing bucket is left as it is.
///
/// # Errors
///
/// When it can be neither opened nor created (for instance more replicas than servers).
pub async fn create_kv(
    js: &Context,
    bucket: &str,
    history: i64,
    replicas: usize,
) -> anyhow::Result<Store> {
    if let Some(store) = open_kv(js, bucket).await? {
        return Ok(store);
    }
    let created = js
        .create_key_value(jetstream::kv::Config {
            bucket: bucket.to_string(),
            history,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        // Someone else may have created it meanwhile, with other settings.
        Err(e) => match js.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(_) => Err(anyhow!(e).context(format!("cannot create KV bucket {bucket}"))),
        },
    }
}

/// The object store `name`, or `None` when it does not exist.
///
/// # Errors
///
/// When it exists but cannot be opened, or the server cannot be asked.
pub async fn open_objects(js: &Context, name: &str) -> anyhow::Result<Option<ObjectStore>> {
    if !stream_exists(js, &format!("OBJ_{name}")).await? {
        return Ok(None);
    }
    js.get_object_store(name)
        .await
        .map(Some)
        .with_context(|| format!("cannot open object store {name}"))
}

/// The object store `name`, created when missing.
///
/// # Errors
///
/// When it can be neither opened nor created.
pub async fn open_or_create_objects(js: &Context, name: &str) -> anyhow::Result<ObjectStore> {
    create_objects(js, name, 1).await
}

/// The object store `name`, created on `replicas` servers of a cluster when missing. An
/// existing store is left as it is.
///
/// # Errors
///
/// When it can be neither opened nor created.
pub async fn create_objects(
    js: &Context,
    name: &str,
    replicas: usize,
) -> anyhow::Result<ObjectStore> {
    if let Some(store) = open_objects(js, name).await? {
        return Ok(store);
    }
    let created = js
        .create_object_store(jetstream::object_store::Config {
            bucket: name.to_string(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        Err(e) => match js.get_object_store(name).await {
            Ok(store) => Ok(store),
            Err(_) => Err(anyhow!(e).context(format!("cannot create object store {name}"))),
        },
    }
}

/// One key as read: its value bytes (`None` when absent, deleted or purged) and the
/// revision that guards a compare-and-swap (`None` when the key never existed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The value; `None` when the key is absent, deleted or purged.
    pub value: Option<Vec<u8>>,
    /// The key's latest revision, delete markers included; `None` when it never existed.
    pub revision: Option<u64>,
}

/// Reads `key` of `kv` (named `bucket` in errors).
///
/// # Errors
///
/// When the server cannot be asked.
pub async fn read(kv: &Store, bucket: &str, key: &str) -> anyhow::Result<Read> {
    let entry = kv
        .entry(key)
        .await
        .with_context(|| format!("cannot read {bucket} key {key}"))?;
    Ok(match entry {
        Some(e) if e.operation == Operation::Put => Read {
            value: Some(e.value.to_vec()),
            revision: Some(e.revision),
        },
        // A delete marker still has a revision: writing over it is guarded like any
        // other write, so a racing delete is not silently undone.
        Some(e) => Read {
            value: None,
            revision: Some(e.revision),
        },
        None => Read {
            value: None,
            revision: None,
        },
    })
}

/// The outcome of [`read_modify_write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written<T> {
    /// The value now stored (or, when nothing changed, the value read).
    pub value: T,
    /// Whether a write happened.
    pub changed: bool,
    /// The key's revision afterwards (`None`: the key still does not exist).
    pub revision: Option<u64>,
    /// Rounds lost to other writers before this one succeeded.
    pub conflicts: u32,
    /// What the key held before, when agents refuse it and it was overwritten.
    pub replaced: Option<Replaced>,
}

/// A value agents refuse, which an edit overwrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// Its revision.
    pub revision: u64,
    /// Why agents refuse it.
    pub reason: String,
    /// The value as it was (lossy UTF-8).
    pub value: String,
}

/// Why a stored value cannot be decoded for an edit.
#[derive(Debug)]
pub enum Undecodable {
    /// Agents refuse it too: nothing the fleet uses is lost by overwriting it, so the edit
    /// starts from empty and reports what was there ([`Written::replaced`]).
    Refused(String),
    /// Readable, but an edit by this tool would lose something (fields a newer tool
    /// wrote): the edit is refused.
    Keep(anyhow::Error),
}

impl From<Undecodable> for anyhow::Error {
    fn from(e: Undecodable) -> Self {
        match e {
            Undecodable::Refused(reason) => anyhow!(reason),
            Undecodable::Keep(e) => e,
        }
    }
}

/// Reads `key` (absent or deleted: `T::default()`), applies `mutate`, and writes the
/// result back only if the key is still at the revision read (`update`, or `create` when
/// the key never existed), re-reading and re-applying after a lost race, at most
/// [`MAX_CAS_ATTEMPTS`] times. When `mutate` leaves the value equal to what was read,
/// nothing is written, so the revision does not move and no watcher wakes.
///
/// # Errors
///
/// When the stored value cannot be decoded (it is never overwritten blindly), `mutate`
/// fails, the server refuses the write for another reason than a lost race, or every
/// attempt lost.
pub async fn read_modify_write<T, D, E, M>(
    kv: &Store,
    bucket: &str,
    key: &str,
    decode: D,
    encode: E,
    mut mutate: M,
) -> anyhow::Result<Written<T>>
where
    T: Default + Clone + PartialEq,
    D: Fn(&[u8]) -> Result<T, Undecodable>,
    E: Fn(&T) -> Vec<u8>,
    M: FnMut(&mut T) -> anyhow::Result<()>,
{
    let mut conflicts = 0;
    loop {
        let current = read(kv, bucket, key).await?;
        let mut replaced = None;
        let before = match &current.value {
            Some(bytes) => match decode(bytes) {
                Ok(value) => value,
                Err(Undecodable::Refused(reason)) => {
                    replaced = Some(Replaced {
                        revision: current.revision.unwrap_or(0),
                        reason,
                        value: String::from_utf8_lossy(bytes).into_owned(),
                    });
                    T::default()
                }
                Err(Undecodable::Keep(e)) => {
                    return Err(e.context(format!(
                        "{bucket} key {key} holds a value this tool cannot rewrite without loss, so it is not overwritten"
                    )));
                }
            },
            None => T::default(),
        };
        let mut value = before.clone();
        mutate(&mut value)?;
        if value == before && replaced.is_none() {
            return Ok(Written {
                value,
                changed: false,
                revision: current.revision.filter(|_| current.value.is_some()),
                conflicts,
                replaced,
            });
        }
        let bytes = encode(&value).into();
        let written = match current.revision {
            Some(revision) => kv.update(key, bytes, revision).await.map_err(|e| {
                let lost = e.kind() == UpdateErrorKind::WrongLastRevision;
                (lost, anyhow!(e))
            }),
            None => kv.create(key, bytes).await.map_err(|e| {
                let lost = e.kind() == CreateErrorKind::AlreadyExists;
                (lost, anyhow!(e))
            }),
        };
        match written {
            Ok(revision) => {
                return Ok(Written {
                    value,
                    changed: true,
                    revision: Some(revision),
                    conflicts,
                    replaced,
                });
            }
            Err((true, e)) => {
                conflicts += 1;
                if conflicts >= MAX_CAS_ATTEMPTS {
                    return Err(e.context(format!(
                        "{bucket} key {key}: still changing under us after {conflicts} attempts; \
                         something keeps rewriting it"
                    )));
                }
                // Spread writers that collided in lockstep.
                let ms = u64::from(conflicts) * 3 + u64::from(std::process::id() % 7);
                tokio::time::sleep(Duration::from_millis(ms.min(40))).await;
            }
            Err((false, e)) => return Err(e.context(format!("cannot write {bucket} key {key}"))),
        }
    }
}
