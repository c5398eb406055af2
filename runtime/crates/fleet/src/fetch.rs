//! Downloads a signed bundle from the `collector_modules` object store with a hard size
//! cap: the object's info is checked before a byte is downloaded, and every chunk is
//! checked against it as it arrives (an object store's own size and digest are not
//! trusted: the bundle checks that follow are what vouch for the bytes).

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectInfo;
use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;

use super::{MODULES_STORE, MODULES_STREAM, object_name};

/// Why a bundle could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying: the server, the store or the object is not reachable now.
    #[error("{0}")]
    Unavailable(String),
    /// Not worth retrying until the object changes.
    #[error("{0}")]
    Refused(String),
}

/// A downloaded object and the store's description of it.
#[derive(Debug)]
pub struct Fetched {
    /// The object's content, at most the `max_len` asked for; not yet verified.
    pub bytes: Vec<u8>,
    /// The store's digest, used only to notice that an object was replaced.
    pub digest: Option<String>,
}

/// Fewest bytes a chunk of a downloaded object may average.
pub const MIN_CHUNK: u64 = 1024;
/// Most chunks one object may have (a 32 MiB bundle in 8 KiB chunks).
pub const MAX_CHUNKS: u64 = 4096;

/// One object of the module store: the store's stream (opened without a request) and
/// the object's name, and `source`, how messages name it.
struct Target {
    stream: stream::Stream<()>,
    object: String,
    source: String,
}

impl Target {
    async fn open(js: &jetstream::Context, name: &str, version: u64) -> Result<Self, FetchError> {
        let object = object_name(name, version);
        let stream = js
            .get_stream_no_info(MODULES_STREAM)
            .await
            .map_err(|e| FetchError::Unavailable(format!("object store {MODULES_STORE}: {e}")))?;
        Ok(Self {
            stream,
            source: format!("{MODULES_STORE}/{object}"),
            object,
        })
    }

    /// The store's description of the object, read with one direct get of its metadata.
    async fn info(&self) -> Result<ObjectInfo, FetchError> {
        let source = &self.source;
        let subject = format!("$O.{MODULES_STORE}.M.{}", URL_SAFE.encode(&self.object));
        let message = self
            .stream
            .direct_get_last_for_subject(subject)
            .await
            .map_err(|e| match e.kind() {
                DirectGetErrorKind::NotFound => {
                    FetchError::Unavailable(format!("{source}: not found"))
                }
                _ => FetchError::Unavailable(direct_get_error(source, "metadata", &e)),
            })?;
        serde_json::from_slice(&message.payload).map_err(|e| {
            FetchError::Refused(format!("{source}: its metadata is not an object's: {e}"))
        })
    }
}

/// A direct get's error, in words an operator can act on.
fn direct_get_error(source: &str, what: &str, e: &stream::DirectGetError) -> String {
    match e.kind() {
        DirectGetErrorKind::Request => format!(
            "{source}: {what}: {e} (no server answered a direct get: the store must allow \
             them, as `collector fleet init` creates it)"
        ),
        _ => format!("{source}: {what}: {e}"),
    }
}

/// The store's digest of `name`/`version` (cheap: no download), to tell whether a
/// refused object was replaced since.
///
/// # Errors
///
/// [`FetchError::Unavailable`] when the store cannot be asked.
pub async fn digest(
    js: &jetstream::Context,
    name: &str,
    version: u64,
) -> Result<Option<String>, FetchError> {
    match Target::open(js, name, version).await?.info().await {
        Ok(info) => Ok(info.digest),
        Err(FetchError::Refused(e)) => Err(FetchError::Unavailable(e)),
        Err(e) => Err(e),
    }
}

/// Downloads `name`/`version`, refusing objects over `max_len` bytes before reading them.
///
/// The object is read with direct gets, its metadata then one chunk at a time: any
/// replica of the store may answer them, so a download needs neither the stream's
/// leader nor a consumer (which a cluster creates through its meta leader, one at a
/// time, when a whole fleet downloads a rollout at once). Each chunk is checked against
/// the metadata and the cap as it arrives; nothing the store says is trusted further.
///
/// # Errors
///
/// [`FetchError::Refused`] for an oversize or malformed object, [`FetchError::Unavailable`]
/// for anything that may work later (no server, no store, no object yet, a chunk not yet
/// on the replica that answered, a timeout).
pub async fn fetch(
    js: &jetstream::Context,
    name: &str,
    version: u64,
    max_len: u64,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let source = format!("{MODULES_STORE}/{}", object_name(name, version));
    let work = async {
        let target = Target::open(js, name, version).await?;
        let source = &target.source;
        let info = target.info().await?;
        if info.deleted {
            return Err(FetchError::Unavailable(format!("{source}: deleted")));
        }
        if info.options.as_ref().is_some_and(|o| o.link.is_some()) {
            return Err(FetchError::Refused(format!(
                "{source}: a link to another object, not a bundle; links are not followed"
            )));
        }
        let size = u64::try_from(info.size).unwrap_or(u64::MAX);
        if size > max_len {
            return Err(FetchError::Refused(format!(
                "{source}: {} bytes, over the {max_len}-byte limit of a bundle; not downloaded",
                info.size
            )));
        }
        // A download costs one request per chunk: a count no bundle needs is refused
        // before the first (the publisher's chunks are 128 KiB; 1 KiB is the least
        // accepted), so lying metadata cannot buy a hundred thousand requests a try.
        let most = (size / MIN_CHUNK + 1).min(MAX_CHUNKS);
        if info.chunks as u64 > most {
            return Err(FetchError::Refused(format!(
                "{source}: its metadata lists {} chunks for {} bytes (at most {most} are \
                 downloaded for that size); not downloaded",
                info.chunks, info.size
            )));
        }
        // The chunks' subject is built from the metadata: a token of letters and digits
        // only, so that it cannot widen into a wildcard over other objects' chunks.
        if info.nuid.is_empty() || !info.nuid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(FetchError::Refused(format!(
                "{source}: its metadata names chunks {:?}, not an object id",
                info.nuid
            )));
        }
        let chunks = format!("$O.{MODULES_STORE}.C.{}", info.nuid);
        let mut bytes = Vec::with_capacity(info.size);
        let mut next = None;
        let mut count = 0_usize;
        while bytes.len() < info.size {
            if count == info.chunks {
                return Err(FetchError::Refused(format!(
                    "{source}: {} bytes in the {} chunks its metadata lists, short of the {} it says",
                    bytes.len(),
                    info.chunks,
                    info.size
                )));
            }
            let chunk = target
                .stream
                .direct_get_next_for_subject(chunks.as_str(), next)
                .await
                .map_err(|e| match e.kind() {
                    // Written before the metadata, but the replica that answered may
                    // not have it yet, or the object was replaced meanwhile.
                    DirectGetErrorKind::NotFound => FetchError::Unavailable(format!(
                        "{source}: chunk {} of {} not found",
                        count + 1,
                        info.chunks
                    )),
                    _ => FetchError::Unavailable(direct_get_error(
                        source,
                        &format!("chunk {} of {}", count + 1, info.chunks),
                        &e,
                    )),
                })?;
            if chunk.payload.is_empty() {
                return Err(FetchError::Refused(format!(
                    "{source}: chunk {} of {} is empty",
                    count + 1,
                    info.chunks
                )));
            }
            if bytes.len() + chunk.payload.len() > info.size {
                return Err(FetchError::Refused(format!(
                    "{source}: its chunks hold more than the {} bytes its metadata says",
                    info.size
                )));
            }
            bytes.extend_from_slice(&chunk.payload);
            next = Some(chunk.sequence + 1);
            count += 1;
        }
        Ok(Fetched {
            bytes,
            digest: info.digest,
        })
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        FetchError::Unavailable(format!("{source}: download took longer than {timeout:?}"))
    })?
}
