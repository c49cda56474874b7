//! Flywheel core: the one small library every service shares.
//!
//! - [`records`]: the record types on every topic (mirroring `schemas/*.avsc`);
//! - [`kind`]: the record kinds and their schema files;
//! - [`codec`]: Avro single-object encoding with writer→reader schema resolution;
//! - [`topics`]: the topic map and per-deployment overrides;
//! - [`kafka`]: librdkafka configuration (pass-through, secrets masked) and topic creation;
//! - [`runtime`]: flags, tracing, graceful shutdown and the ops endpoint.
//!
//! It deliberately has no Arrow, Parquet or CUDA dependencies.

pub mod codec;
pub mod error;
pub mod kafka;
pub mod kind;
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

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (H. Hinnant's civil-from-days: eras of 400 years, 146,097 days,
/// starting on March 1st so leap days fall at the end of a year).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_is_lower_case_and_two_digits_per_byte() {
        assert_eq!(super::hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(super::hex(&[]), "");
    }
}
