//! The bundle container: splitting a file into manifest, signatures and component without
//! ever trusting a length read from it, and writing one back.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use super::keys::KeyId;
pub use collector_fsutil::ReadProblem;
use collector_fsutil::{Links, read_regular};

/// The first eight bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"CBUNDLE1";
/// Largest manifest section accepted, in bytes.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;
/// Largest signatures section accepted, in bytes.
pub const MAX_SIGNATURES_LEN: usize = 64 * 1024;
/// Most signatures a bundle may carry; bounds the verification work an untrusted file
/// can cause.
pub const MAX_SIGNATURES: usize = 16;
/// Largest bundle file accepted, in bytes (32 MiB).
pub const MAX_BUNDLE_LEN: u64 = 32 * 1024 * 1024;

/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// Reads a whole file of at most `max` bytes that an operator named (a bundle, a
/// component, a key file): a final symbolic link is followed, but the file must be a
/// regular one, the open never blocks and the read stops past `max` (see
/// [`collector_fsutil::read_regular`]).
///
/// # Errors
///
/// When the file cannot be read, is not a regular file, or is larger than `max`. The
/// caller names the file.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, ReadProblem> {
    read_regular(path, max, Links::Follow).map_err(|e| e.problem)
}

/// Why bytes are not a well-formed bundle container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The bytes are a WebAssembly module or component (`\0asm`) that was never signed.
    #[error(
        "this is a bare WebAssembly file, not a signed bundle: sign it with \
         `collector module sign`"
    )]
    BareWasm,
    /// The bytes do not start with [`MAGIC`] (or are shorter than it).
    #[error("not a signed bundle: it does not start with the magic bytes `CBUNDLE1`")]
    BadMagic,
    /// The whole bundle, read or about to be written, is over [`MAX_BUNDLE_LEN`].
    #[error("the bundle is {len} bytes, more than the maximum of {max}")]
    TooLarge {
        /// Its length in bytes.
        len: u64,
        /// [`MAX_BUNDLE_LEN`].
        max: u64,
    },
    /// The bytes end before a fixed-size field is complete.
    #[error("the file ends inside the {field}: it needs {needed} bytes, {remaining} remain")]
    Truncated {
        /// The field cut short, such as "manifest length field".
        field: &'static str,
        /// The field's size in bytes.
        needed: usize,
        /// The bytes left in the file where the field starts.
        remaining: usize,
    },
    /// A section is longer than its cap ([`MAX_MANIFEST_LEN`], [`MAX_SIGNATURES_LEN`]).
    #[error(
        "the {section} section is declared as {declared} bytes, more than the maximum of {max}"
    )]
    SectionTooLarge {
        /// "manifest" or "signatures".
        section: &'static str,
        /// Its length in bytes: as declared in the file, or as given to [`Bundle::encode`].
        declared: u64,
        /// The section's cap in bytes.
        max: usize,
    },
    /// A section's declared length runs past the end of the file.
    #[error(
        "the {section} section is declared as {declared} bytes, but only {remaining} bytes \
         remain in the file"
    )]
    SectionPastEnd {
        /// "manifest" or "signatures".
        section: &'static str,
        /// The length the file declares, in bytes.
        declared: u64,
        /// The bytes left in the file after the length field.
        remaining: usize,
    },
    /// The signatures section is not a JSON array of `key_id`/`signature` objects, or has
    /// more than whitespace after it; the text is the JSON error, with its path.
    #[error(
        "the signatures section is not the expected JSON \
         `[{{\"key_id\": \"<16 hex digits>\", \"signature\": \"<base64>\"}}]`: {0}"
    )]
    SignaturesJson(String),
    /// The bundle carries more than [`MAX_SIGNATURES`] signatures.
    #[error("the bundle carries {count} signatures, more than the maximum of {max}")]
    TooManySignatures {
        /// How many it carries.
        count: usize,
        /// [`MAX_SIGNATURES`].
        max: usize,
    },
    /// One signature entry has a malformed key id, is not base64, or is not 64 bytes.
    #[error("signature {index}: {reason}")]
    SignatureEncoding {
        /// The entry's position in the section, counting from 1.
        index: usize,
        /// What is wrong with it, for people.
        reason: String,
    },
}

/// One signature as stored in a bundle: the key id it claims and the 64 signature bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureEntry {
    /// The key the signer claims; a hint only, as the signature counts for whichever
    /// trusted key it verifies under.
    pub key_id: KeyId,
    /// The Ed25519 signature over the exact manifest bytes.
    pub signature: [u8; SIGNATURE_LEN],
}

/// The JSON form of a [`SignatureEntry`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureJson {
    key_id: String,
    signature: String,
}

/// The three parts of a bundle, borrowed from the file's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// The manifest exactly as stored: the bytes the signatures cover.
    pub manifest: &'a [u8],
    /// The signatures over the manifest, in file order; the section itself is not signed.
    pub signatures: Vec<SignatureEntry>,
    /// The WebAssembly component: every byte after the signatures section.
    pub component: &'a [u8],
}

impl<'a> Bundle<'a> {
    /// Splits a bundle into its parts. Checks every declared length against the bytes
    /// that remain before slicing, and the section caps before anything else.
    ///
    /// # Errors
    ///
    /// When the bytes are not a bundle, a section is truncated or over its cap, or the
    /// signatures section is malformed.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let len = bytes.len() as u64;
        if len > MAX_BUNDLE_LEN {
            return Err(FormatError::TooLarge {
                len,
                max: MAX_BUNDLE_LEN,
            });
        }
        if bytes.starts_with(b"\0asm") {
            return Err(FormatError::BareWasm);
        }
        let mut rest = bytes;
        if take(&mut rest, MAGIC.len(), "magic").map_err(|_| FormatError::BadMagic)? != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let manifest = section(&mut rest, "manifest", MAX_MANIFEST_LEN)?;
        let signatures = section(&mut rest, "signatures", MAX_SIGNATURES_LEN)?;
        Ok(Self {
            manifest,
            signatures: parse_signatures(signatures)?,
            component: rest,
        })
    }

    /// Writes the bundle in the container format.
    ///
    /// # Errors
    ///
    /// When a section or the whole bundle exceeds its cap (so a written bundle always
    /// parses).
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(FormatError::TooManySignatures {
                count: self.signatures.len(),
                max: MAX_SIGNATURES,
            });
        }
        let signatures: Vec<SignatureJson> = self
            .signatures
            .iter()
            .map(|s| SignatureJson {
                key_id: s.key_id.to_string(),
                signature: BASE64.encode(s.signature),
            })
            .collect();
        let signatures =
            serde_json::to_vec_pretty(&signatures).expect("signature entries serialize");
        let mut out = Vec::with_capacity(
            MAGIC.len() + 8 + self.manifest.len() + signatures.len() + self.component.len(),
        );
        out.extend_from_slice(MAGIC);
        put_section(&mut out, "manifest", self.manifest, MAX_MANIFEST_LEN)?;
        put_section(&mut out, "signatures", &signatures, MAX_SIGNATURES_LEN)?;
        out.extend_from_slice(self.component);
        let len = out.len() as u64;
        if len > MAX_BUNDLE_LEN {
            return Err(FormatError::TooLarge {
                len,
                max: MAX_BUNDLE_LEN,
            });
        }
        Ok(out)
    }
}

/// Takes `n` bytes off the front of `rest`, or says how many were missing.
fn take<'a>(rest: &mut &'a [u8], n: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
    if rest.len() < n {
        return Err(FormatError::Truncated {
            field,
            needed: n,
            remaining: rest.len(),
        });
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// A `u32 LE` length followed by that many bytes, checked against the cap and then
/// against what remains, before slicing.
fn section<'a>(
    rest: &mut &'a [u8],
    name: &'static str,
    max: usize,
) -> Result<&'a [u8], FormatError> {
    let field = match name {
        "manifest" => "manifest length field",
        _ => "signatures length field",
    };
    let raw = take(rest, 4, field)?;
    let declared = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let declared_u64 = u64::from(declared);
    if declared_u64 > max as u64 {
        return Err(FormatError::SectionTooLarge {
            section: name,
            declared: declared_u64,
            max,
        });
    }
    if declared_u64 > rest.len() as u64 {
        return Err(FormatError::SectionPastEnd {
            section: name,
            declared: declared_u64,
            remaining: rest.len(),
        });
    }
    // Both checks above bound `declared` by `rest.len()`, so it fits in usize.
    take(rest, declared as usize, name)
}

fn put_section(
    out: &mut Vec<u8>,
    name: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<(), FormatError> {
    if bytes.len() > max {
        return Err(FormatError::SectionTooLarge {
            section: name,
            declared: bytes.len() as u64,
            max,
        });
    }
    let len = u32::try_from(bytes.len()).expect("bounded by the section cap");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn parse_signatures(bytes: &[u8]) -> Result<Vec<SignatureEntry>, FormatError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let raw: Vec<SignatureJson> = serde_path_to_error::deserialize(&mut *de)
        .map_err(|e| FormatError::SignaturesJson(e.to_string()))?;
    // Trailing whitespace only, as the manifest (see `Manifest::parse`).
    de.end()
        .map_err(|e| FormatError::SignaturesJson(e.to_string()))?;
    if raw.len() > MAX_SIGNATURES {
        return Err(FormatError::TooManySignatures {
            count: raw.len(),
            max: MAX_SIGNATURES,
        });
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let index = i + 1;
            let key_id = s
                .key_id
                .parse::<KeyId>()
                .map_err(|e| FormatError::SignatureEncoding {
                    index,
                    reason: e.to_string(),
                })?;
            let bytes = BASE64.decode(s.signature.as_bytes()).map_err(|e| {
                FormatError::SignatureEncoding {
                    index,
                    reason: format!("the signature is not base64: {e}"),
                }
            })?;
            let signature = <[u8; SIGNATURE_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
                FormatError::SignatureEncoding {
                    index,
                    reason: format!(
                        "the signature is {} bytes, an Ed25519 signature is {SIGNATURE_LEN}",
                        bytes.len()
                    ),
                }
            })?;
            Ok(SignatureEntry { key_id, signature })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(byte: u8) -> SignatureEntry {
        SignatureEntry {
            key_id: "0011223344556677".parse().unwrap(),
            signature: [byte; SIGNATURE_LEN],
        }
    }

    fn sample() -> Vec<u8> {
        Bundle {
            manifest: br#"{"name": "m"}"#,
            signatures: vec![entry(7)],
            component: b"\0asm\x0d\0\x01\0rest",
        }
        .encode()
        .unwrap()
    }

    /// A header with the given declared lengths, followed by `tail`.
    fn raw(manifest_len: u32, manifest: &[u8], sig_len: Option<u32>, tail: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&manifest_len.to_le_bytes());
        out.extend_from_slice(manifest);
        if let Some(s) = sig_len {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(tail);
        out
    }

    #[test]
    fn encode_then_parse_gives_back_the_parts() {
        let bytes = sample();
        assert!(bytes.starts_with(MAGIC));
        let b = Bundle::parse(&bytes).unwrap();
        assert_eq!(b.manifest, br#"{"name": "m"}"#);
        assert_eq!(b.signatures, vec![entry(7)]);
        assert_eq!(b.component, b"\0asm\x0d\0\x01\0rest");
    }

    #[test]
    fn a_bare_wasm_file_or_other_bytes_are_named_as_such() {
        assert_eq!(
            Bundle::parse(b"\0asm\x0d\0\x01\0"),
            Err(FormatError::BareWasm)
        );
        assert_eq!(Bundle::parse(b"CBUND"), Err(FormatError::BadMagic));
        assert_eq!(
            Bundle::parse(b"CBUNDLE2\0\0\0\0\0\0\0\0"),
            Err(FormatError::BadMagic)
        );
    }

    #[test]
    fn a_huge_declared_section_in_a_tiny_file_is_refused_without_allocating_it() {
        // u32::MAX is over the cap: refused before the remaining bytes are even looked at.
        let bytes = raw(u32::MAX, b"{}", Some(2), b"[]");
        assert_eq!(
            Bundle::parse(&bytes),
            Err(FormatError::SectionTooLarge {
                section: "manifest",
                declared: u64::from(u32::MAX),
                max: MAX_MANIFEST_LEN,
            })
        );
        let bytes = raw(2, b"{}", Some(u32::MAX), b"[]");
        assert!(matches!(
            Bundle::parse(&bytes),
            Err(FormatError::SectionTooLarge {
                section: "signatures",
                ..
            })
        ));
    }

    #[test]
    fn a_declared_length_larger_than_the_bytes_left_is_refused() {
        // Under the cap, but more than the file holds.
        let bytes = raw(60_000, b"{}", None, b"");
        assert_eq!(
            Bundle::parse(&bytes),
            Err(FormatError::SectionPastEnd {
                section: "manifest",
                declared: 60_000,
                remaining: 2,
            })
        );
        let bytes = raw(2, b"{}", Some(3), b"[]");
        assert_eq!(
            Bundle::parse(&bytes),
            Err(FormatError::SectionPastEnd {
                section: "signatures",
                declared: 3,
                remaining: 2,
            })
        );
    }

    #[test]
    fn a_file_cut_inside_a_length_field_is_refused() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0]);
        assert_eq!(
            Bundle::parse(&bytes),
            Err(FormatError::Truncated {
                field: "manifest length field",
                needed: 4,
                remaining: 2,
            })
        );
        let bytes = raw(2, b"{}", None, b"\x01");
        assert!(matches!(
            Bundle::parse(&bytes),
            Err(FormatError::Truncated {
                field: "signatures length field",
                ..
            })
        ));
    }

    #[test]
    fn malformed_signature_entries_are_refused_with_their_index() {
        let cases: &[(&str, &str)] = &[
            (r#"{"key_id": "00"}"#, "not the expected JSON"),
            (
                r#"[{"key_id": "0011223344556677", "signature": "AAAA", "x": 1}]"#,
                "unknown field",
            ),
            (
                r#"[{"key_id": "zz", "signature": "AAAA"}]"#,
                "signature 1: invalid key id",
            ),
            (
                r#"[{"key_id": "0011223344556677", "signature": "!!"}]"#,
                "not base64",
            ),
            (
                r#"[{"key_id": "0011223344556677", "signature": "AAAA"}]"#,
                "is 3 bytes",
            ),
        ];
        for (json, expected) in cases {
            let bytes = raw(2, b"{}", Some(json.len() as u32), json.as_bytes());
            let err = Bundle::parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn a_signatures_section_with_data_after_it_is_refused() {
        let json = r#"[{"key_id": "0011223344556677", "signature": "AAAA"}] []"#;
        let bytes = raw(2, b"{}", Some(json.len() as u32), json.as_bytes());
        let err = Bundle::parse(&bytes).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn too_many_signatures_are_refused_when_writing_and_reading() {
        let many = Bundle {
            manifest: b"{}",
            signatures: (0..=MAX_SIGNATURES as u8).map(entry).collect(),
            component: b"",
        };
        assert!(matches!(
            many.encode(),
            Err(FormatError::TooManySignatures { count: 17, .. })
        ));
        let json: Vec<SignatureJson> = many
            .signatures
            .iter()
            .map(|s| SignatureJson {
                key_id: s.key_id.to_string(),
                signature: BASE64.encode(s.signature),
            })
            .collect();
        let json = serde_json::to_vec(&json).unwrap();
        let bytes = raw(2, b"{}", Some(json.len() as u32), &json);
        assert!(matches!(
            Bundle::parse(&bytes),
            Err(FormatError::TooManySignatures { count: 17, .. })
        ));
    }

    #[test]
    fn read_bounded_checks_the_size_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        std::fs::write(&path, vec![0u8; 100]).unwrap();
        assert_eq!(read_bounded(&path, 100).unwrap().len(), 100);
        assert!(matches!(
            read_bounded(&path, 99),
            Err(ReadProblem::TooLarge { len: 100, max: 99 })
        ));
        assert!(matches!(
            read_bounded(dir.path(), 100),
            Err(ReadProblem::NotAFile("a directory"))
        ));
        assert!(matches!(
            read_bounded(&dir.path().join("missing"), 100),
            Err(ReadProblem::Io(_))
        ));
    }
}
