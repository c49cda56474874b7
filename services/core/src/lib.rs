//! Flywheel core: the one small library every service shares.
//!
//! - [`records`]: the record types on every topic (mirroring `schemas/*.avsc`);
//! - [`codec`]: Avro single-object encoding with writer→reader schema resolution;
//! - [`topics`]: the topic map and per-deployment overrides;
//! - [`kafka`]: librdkafka configuration (pass-through, secrets masked) and topic creation;
//! - [`runtime`]: flags, tracing, graceful shutdown and the ops endpoint.
//!
//! It deliberately has no Arrow, Parquet or CUDA dependencies.

pub mod codec;
pub mod error;
pub mod kafka;
pub mod policy;
pub mod records;
pub mod rng;
pub mod runtime;
pub mod stats;
pub mod topics;

pub use codec::{AvroRecord, Codec, RecordKind};
pub use error::{Error, Result};

/// Lower-case hex of a byte string (digests in ids and pseudonyms).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> records::EpochMillis {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
