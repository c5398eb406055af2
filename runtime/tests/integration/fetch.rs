//! Bundle downloads from the module store over a real nats-server: an object of many
//! chunks arrives byte for byte, and an object whose metadata or chunks lie (as anyone
//! with write access to the store could make them) is refused without being trusted.

use std::time::Duration;

use async_nats::jetstream::object_store::ObjectMetadata;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use collector_fleet::MODULES_STORE;
use collector_fleet::fetch::{self, FetchError, Fetched};

use crate::fleet::Fleet;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes that differ at every position, so a chunk out of order shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn put(fleet: &Fleet, object: &str, bytes: &[u8], chunk_size: usize) {
    fleet.rt.block_on(async {
        let store = fleet.js.get_object_store(MODULES_STORE).await.unwrap();
        let meta = ObjectMetadata {
            name: object.into(),
            chunk_size: Some(chunk_size),
            ..Default::default()
        };
        let mut reader = bytes;
        store.put(meta, &mut reader).await.unwrap();
    });
}

/// Writes an object's metadata and chunks by hand, as a hostile writer would.
fn forge(fleet: &Fleet, object: &str, meta: serde_json::Value, chunks: &[(&str, &[u8])]) {
    fleet.rt.block_on(async {
        for (nuid, bytes) in chunks {
            fleet
                .js
                .publish(
                    format!("$O.{MODULES_STORE}.C.{nuid}"),
                    bytes.to_vec().into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let subject = format!("$O.{MODULES_STORE}.M.{}", URL_SAFE.encode(object));
        fleet
            .js
            .publish(subject, meta.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
}

fn fetch(fleet: &Fleet, name: &str, version: u64, max_len: u64) -> Result<Fetched, FetchError> {
    fleet
        .rt
        .block_on(fetch::fetch(&fleet.js, name, version, max_len, TIMEOUT))
}

fn meta(object: &str, nuid: &str, size: usize, chunks: usize) -> serde_json::Value {
    serde_json::json!({
        "name": object,
        "bucket": MODULES_STORE,
        "nuid": nuid,
        "size": size,
        "chunks": chunks,
        "deleted": false,
    })
}

#[test]
fn an_object_of_many_chunks_arrives_whole_and_in_order() {
    let fleet = Fleet::start();
    let bytes = pattern(100_000);
    put(&fleet, "m/1", &bytes, 4096);
    let got = fetch(&fleet, "m", 1, 1 << 20).expect("downloaded");
    assert_eq!(got.bytes.len(), bytes.len());
    assert!(got.bytes == bytes, "the bytes differ from what was put");

    let digest = fleet.rt.block_on(fetch::digest(&fleet.js, "m", 1)).unwrap();
    assert_eq!(got.digest, digest);
    assert!(digest.is_some_and(|d| d.starts_with("SHA-256=")));

    // Replaced under the same name: the new bytes, not a mix of both.
    let newer = pattern(9_000).into_iter().rev().collect::<Vec<_>>();
    put(&fleet, "m/1", &newer, 1000);
    assert!(fetch(&fleet, "m", 1, 1 << 20).unwrap().bytes == newer);

    // An empty object is zero bytes (the bundle checks then refuse it).
    put(&fleet, "m/2", &[], 1000);
    assert!(fetch(&fleet, "m", 2, 1 << 20).unwrap().bytes.is_empty());
}

#[test]
fn objects_missing_deleted_or_over_the_cap_are_not_downloaded() {
    let fleet = Fleet::start();
    match fetch(&fleet, "m", 1, 1 << 20) {
        Err(FetchError::Unavailable(e)) => {
            assert!(
                e.contains("collector_modules/m/1") && e.contains("not found"),
                "{e}"
            );
        }
        other => panic!("a missing object: {other:?}"),
    }

    put(&fleet, "m/2", &pattern(10_000), 4096);
    match fetch(&fleet, "m", 2, 9_999) {
        Err(FetchError::Refused(e)) => assert!(
            e.contains("10000 bytes, over the 9999-byte limit") && e.contains("not downloaded"),
            "{e}"
        ),
        other => panic!("an object over the cap: {other:?}"),
    }
    assert_eq!(fetch(&fleet, "m", 2, 10_000).unwrap().bytes.len(), 10_000);

    fleet.rt.block_on(async {
        let store = fleet.js.get_object_store(MODULES_STORE).await.unwrap();
        store.delete("m/2").await.unwrap();
    });
    match fetch(&fleet, "m", 2, 1 << 20) {
        Err(FetchError::Unavailable(e)) => assert!(e.contains("deleted"), "{e}"),
        other => panic!("a deleted object: {other:?}"),
    }
}

/// A forged object: its version, metadata, chunks (id, bytes), and what the refusal says.
type Forged = (
    u64,
    serde_json::Value,
    Vec<(&'static str, &'static [u8])>,
    &'static str,
);

#[test]
fn metadata_and_chunks_that_disagree_are_refused() {
    let fleet = Fleet::start();
    let cases: [Forged; 7] = [
        // More bytes in the chunks than the metadata admits to (and than the cap).
        (
            1,
            meta("m/1", "AAA1", 10, 1),
            vec![("AAA1", &[1; 100])],
            "more than the 10 bytes",
        ),
        // Fewer chunks than bytes said.
        (
            2,
            meta("m/2", "AAA2", 100, 1),
            vec![("AAA2", &[2; 50])],
            "short of the 100",
        ),
        // A chunk id that would widen into every object's chunks.
        (3, meta("m/3", ">", 10, 1), vec![], "not an object id"),
        (4, meta("m/4", "AAA1.>", 10, 1), vec![], "not an object id"),
        // Empty chunks, which would otherwise be read up to the chunk count.
        (
            5,
            meta("m/5", "AAA5", 10, 1),
            vec![("AAA5", &[]), ("AAA5", &[5; 10])],
            "chunk 1 of 1 is empty",
        ),
        // A chunk count no object of that size has: refused before the first request,
        // so lying metadata cannot buy a million requests a try.
        (
            8,
            meta("m/8", "AAA8", 10, 1_000_000),
            vec![("AAA8", &[8; 10])],
            "1000000 chunks for 10 bytes",
        ),
        // Not an object's metadata at all.
        (
            6,
            serde_json::json!({ "hello": "world" }),
            vec![],
            "metadata is not an object's",
        ),
    ];
    for (version, meta, chunks, why) in cases {
        forge(&fleet, &format!("m/{version}"), meta, &chunks);
        match fetch(&fleet, "m", version, 1 << 20) {
            Err(FetchError::Refused(e)) => {
                assert!(e.contains(why), "m/{version}: expected {why:?} in {e:?}");
                assert!(e.contains(&format!("collector_modules/m/{version}")), "{e}");
            }
            other => panic!("m/{version} ({why}): {other:?}"),
        }
    }

    // A chunk missing from the store may yet arrive: worth retrying, not a refusal.
    forge(&fleet, "m/7", meta("m/7", "AAA7", 10, 1), &[]);
    match fetch(&fleet, "m", 7, 1 << 20) {
        Err(FetchError::Unavailable(e)) => assert!(e.contains("chunk 1 of 1 not found"), "{e}"),
        other => panic!("a missing chunk: {other:?}"),
    }
}
