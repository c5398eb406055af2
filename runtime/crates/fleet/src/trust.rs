//! Follows the fleet's trust roots ([`TRUST_BUCKET`], one key per version: `v1`, `v2`,
//! ...) from the version an agent holds: it reads `v<held+1>`, `v<held+2>`, ... with
//! direct gets until a version is missing, and hands what it read to the agent, which
//! verifies the chain (nothing here is trusted). It reads again when a root is
//! published (it subscribes to the bucket's put subjects), after a reconnect, and every
//! resync period, so an agent that slept through several rotations catches up at once.
//!
//! Like the settings watch, it needs no right but direct gets by subject on the bucket
//! and a subscription to its put subjects (docs/nats-server.conf).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::watch::{ReadError, read_key};
use super::{TRUST_BUCKET, root_key};

/// Most versions read in one pass: a chain longer than this is caught up over several
/// passes (each taken root moves the start).
pub const MAX_ROOTS_PER_PASS: u64 = 32;
/// How long notices are gathered before reading.
const SETTLE: Duration = Duration::from_millis(25);
/// A read after a notice that finds nothing new (the notice can come before the server
/// that answers has stored the root) is made again after these pauses, then left to the
/// next resync.
const REREAD: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1500),
];
/// How often the connection is checked for a reconnect.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// Follows the trust roots after `held` (kept current by the agent as it takes roots)
/// until the task is dropped. `on_roots` gets the values read in one pass (with a name
/// for messages), only when one of them differs from what it was given before: a root
/// refused once is not offered again until it is replaced.
pub async fn follow(
    client: async_nats::Client,
    held: Arc<AtomicU64>,
    resync: Duration,
    mut on_roots: impl FnMut(String, Vec<Vec<u8>>) + Send,
) {
    let js = jetstream::new(client.clone());
    let subject = format!("$KV.{TRUST_BUCKET}.>");
    let mut delay = Duration::from_millis(250);
    let mut notices = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to trust root notices; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    };
    if let Err(e) = client.flush().await {
        tracing::debug!(error = %e, "flush after subscribing");
    }
    // What was offered, by key: a digest of its bytes.
    let mut offered: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    let mut connects = client.statistics().connects.load(Ordering::Relaxed);
    let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
    reconnect_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_due = Some(Instant::now());
    let mut next_resync = Instant::now() + resync;
    let mut missing_reported = false;
    // Re-reads left after the last notice (see REREAD).
    let mut rereads: Option<usize> = None;
    loop {
        if read_due.is_some_and(|at| at <= Instant::now()) {
            read_due = None;
            next_resync = Instant::now() + resync;
            let from = held.load(Ordering::Relaxed) + 1;
            let mut roots = Vec::new();
            let mut news = false;
            for version in from..from + MAX_ROOTS_PER_PASS {
                let key = root_key(version);
                match read_key(&js, TRUST_BUCKET, &key).await {
                    Ok(read) => {
                        missing_reported = false;
                        let Some(value) = read.value else {
                            break;
                        };
                        let digest: [u8; 32] = Sha256::digest(&value).into();
                        news |= offered.insert(key, digest) != Some(digest);
                        roots.push(value.to_vec());
                    }
                    Err(ReadError::NoBucket) => {
                        if !missing_reported {
                            tracing::info!(
                                "no trust root bucket ({TRUST_BUCKET}) answers: roots are looked for again every {resync:?}"
                            );
                            missing_reported = true;
                        }
                        break;
                    }
                    Err(ReadError::Failed(e)) => {
                        tracing::debug!(key, error = %e, "cannot read a trust root; reading again later");
                        read_due = Some(Instant::now() + Duration::from_secs(1));
                        break;
                    }
                }
            }
            if roots.len() as u64 == MAX_ROOTS_PER_PASS {
                // More may follow once these are taken.
                read_due = Some(Instant::now() + Duration::from_millis(200));
            }
            match rereads {
                Some(i) if !news && read_due.is_none() && i < REREAD.len() => {
                    read_due = Some(Instant::now() + REREAD[i]);
                    rereads = Some(i + 1);
                }
                Some(_) if news => rereads = None,
                _ => {}
            }
            if news && !roots.is_empty() {
                let source = format!(
                    "{TRUST_BUCKET} {}",
                    if roots.len() == 1 {
                        root_key(from)
                    } else {
                        format!(
                            "{}..{}",
                            root_key(from),
                            root_key(from + roots.len() as u64 - 1)
                        )
                    }
                );
                on_roots(source, roots);
            }
            // What was offered below the held version is settled.
            let held_now = held.load(Ordering::Relaxed);
            offered.retain(|k, _| {
                k.strip_prefix('v')
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v > held_now)
            });
        }
        let wake = read_due.unwrap_or(next_resync).min(next_resync);
        tokio::select! {
            notice = notices.next() => {
                if notice.is_none() {
                    tracing::warn!("the trust root notices ended; no further roots are followed");
                    std::future::pending::<()>().await;
                    return;
                }
                let at = Instant::now() + SETTLE;
                read_due = Some(read_due.map_or(at, |d| d.min(at)));
                rereads = Some(0);
            }
            _ = reconnect_check.tick() => {
                let now = client.statistics().connects.load(Ordering::Relaxed);
                if now != connects {
                    connects = now;
                    read_due = Some(Instant::now());
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if next_resync <= Instant::now() {
                    read_due = Some(Instant::now());
                }
            }
        }
    }
}
