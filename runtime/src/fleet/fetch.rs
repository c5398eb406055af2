//! Downloads a signed bundle from the `collector_modules` object store with a hard size
//! cap: the object's info is checked before a byte is downloaded, and the download is
//! read through the same bound (an object store's own size and digest are not trusted:
//! the bundle checks that follow are what vouch for the bytes).

use std::time::Duration;

use async_nats::jetstream;
use tokio::io::AsyncReadExt as _;

use super::{MODULES_STORE, object_name};

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
    pub bytes: Vec<u8>,
    /// The store's digest, used only to notice that an object was replaced.
    pub digest: Option<String>,
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
    let store = js
        .get_object_store(MODULES_STORE)
        .await
        .map_err(|e| FetchError::Unavailable(format!("object store {MODULES_STORE}: {e}")))?;
    let info = store.info(object_name(name, version)).await.map_err(|e| {
        FetchError::Unavailable(format!(
            "{MODULES_STORE}/{}: {e}",
            object_name(name, version)
        ))
    })?;
    Ok(info.digest)
}

/// Downloads `name`/`version`, refusing objects over `max_len` bytes before reading them.
///
/// # Errors
///
/// [`FetchError::Refused`] for an oversize object, [`FetchError::Unavailable`] for
/// anything that may work later (no server, no store, no object yet, a timeout).
pub async fn fetch(
    js: &jetstream::Context,
    name: &str,
    version: u64,
    max_len: u64,
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let object = object_name(name, version);
    let source = format!("{MODULES_STORE}/{object}");
    let work = async {
        let store = js
            .get_object_store(MODULES_STORE)
            .await
            .map_err(|e| FetchError::Unavailable(format!("object store {MODULES_STORE}: {e}")))?;
        let info = store
            .info(&object)
            .await
            .map_err(|e| FetchError::Unavailable(format!("{source}: {e}")))?;
        if info.deleted {
            return Err(FetchError::Unavailable(format!("{source}: deleted")));
        }
        if u64::try_from(info.size).unwrap_or(u64::MAX) > max_len {
            return Err(FetchError::Refused(format!(
                "{source}: {} bytes, over the {max_len}-byte limit of a bundle; not downloaded",
                info.size
            )));
        }
        let reader = store
            .get(&object)
            .await
            .map_err(|e| FetchError::Unavailable(format!("{source}: {e}")))?;
        let mut bytes = Vec::with_capacity(info.size.min(1 << 20));
        reader
            .take(max_len + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| FetchError::Unavailable(format!("{source}: download failed: {e}")))?;
        if bytes.len() as u64 > max_len {
            return Err(FetchError::Refused(format!(
                "{source}: more than the {max_len}-byte limit of a bundle"
            )));
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
