//! Avro single-object codec for every Flywheel record.
//!
//! Wire format (Avro spec, "single object encoding"): `C3 01`, the 8-byte
//! CRC-64-AVRO (Rabin) fingerprint of the writer schema's canonical form, then
//! the Avro binary datum. Every record is therefore self-describing without a
//! registry server: the decoder finds the writer schema by fingerprint among
//! every schema version the repository has ever shipped (`schemas/history/`).
//!
//! Schema resolution: the Rust type is the reader. The datum is decoded with
//! its writer schema straight into the type through serde; fields an older
//! writer lacked take their serde defaults (which mirror the schema defaults:
//! every optional field is `#[serde(default)]`), fields the type does not know
//! are skipped, and union branches map by index, which the append-only rule
//! for unions keeps stable. (apache-avro's generic `Value` resolution picks
//! union branches by shape, which confuses same-shaped records such as
//! `SuggestionRejected` and `SuggestionDismissed`; this path does not.)

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::Schema;
use apache_avro::headers::{HeaderBuilder, RabinFingerprintHeader};
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::records::{
    DeadLetter, Interaction, ModelCandidate, RegistryEntry, Reward, RewardMetrics, ShardManifest, TrainRequest,
    TriggerDecision,
};

/// The two magic bytes that open an Avro single-object encoded record.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus fingerprint.
pub const HEADER_LEN: usize = 10;
/// Largest allocation a decoder may make for one field; bounds memory on
/// hostile input (a garbage length prefix must not reserve gigabytes).
pub const MAX_ALLOCATION_BYTES: usize = 64 * 1024 * 1024;

/// Every record type with a schema in `schemas/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `schemas/interaction.avsc`
    Interaction,
    /// `schemas/reward.avsc`
    Reward,
    /// `schemas/reward_metrics.avsc`
    RewardMetrics,
    /// `schemas/shard_manifest.avsc`
    ShardManifest,
    /// `schemas/trigger_decision.avsc`
    TriggerDecision,
    /// `schemas/train_request.avsc`
    TrainRequest,
    /// `schemas/model_candidate.avsc`
    ModelCandidate,
    /// `schemas/registry_entry.avsc`
    RegistryEntry,
    /// `schemas/dead_letter.avsc`
    DeadLetter,
}

macro_rules! schema_file {
    ($file:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/", $file))
    };
}

impl RecordKind {
    /// All kinds, in schema-file order.
    pub const ALL: [RecordKind; 9] = [
        RecordKind::Interaction,
        RecordKind::Reward,
        RecordKind::RewardMetrics,
        RecordKind::ShardManifest,
        RecordKind::TriggerDecision,
        RecordKind::TrainRequest,
        RecordKind::ModelCandidate,
        RecordKind::RegistryEntry,
        RecordKind::DeadLetter,
    ];

    /// File stem of the schema under `schemas/` (and its history folder).
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::Interaction => "interaction",
            Self::Reward => "reward",
            Self::RewardMetrics => "reward_metrics",
            Self::ShardManifest => "shard_manifest",
            Self::TriggerDecision => "trigger_decision",
            Self::TrainRequest => "train_request",
            Self::ModelCandidate => "model_candidate",
            Self::RegistryEntry => "registry_entry",
            Self::DeadLetter => "dead_letter",
        }
    }

    /// The current (reader) schema text.
    pub fn current_schema(self) -> &'static str {
        match self {
            Self::Interaction => schema_file!("interaction.avsc"),
            Self::Reward => schema_file!("reward.avsc"),
            Self::RewardMetrics => schema_file!("reward_metrics.avsc"),
            Self::ShardManifest => schema_file!("shard_manifest.avsc"),
            Self::TriggerDecision => schema_file!("trigger_decision.avsc"),
            Self::TrainRequest => schema_file!("train_request.avsc"),
            Self::ModelCandidate => schema_file!("model_candidate.avsc"),
            Self::RegistryEntry => schema_file!("registry_entry.avsc"),
            Self::DeadLetter => schema_file!("dead_letter.avsc"),
        }
    }

    /// Every released version of the schema, oldest first
    /// (`schemas/history/<stem>/v<N>.avsc`). Records written with any of them
    /// stay readable.
    pub fn history(self) -> &'static [&'static str] {
        match self {
            Self::Interaction => &[schema_file!("history/interaction/v1.avsc")],
            Self::Reward => &[schema_file!("history/reward/v1.avsc")],
            Self::RewardMetrics => {
                &[schema_file!("history/reward_metrics/v1.avsc"), schema_file!("history/reward_metrics/v2.avsc")]
            }
            Self::ShardManifest => {
                &[schema_file!("history/shard_manifest/v1.avsc"), schema_file!("history/shard_manifest/v2.avsc")]
            }
            Self::TriggerDecision => &[schema_file!("history/trigger_decision/v1.avsc")],
            Self::TrainRequest => &[schema_file!("history/train_request/v1.avsc")],
            Self::ModelCandidate => &[schema_file!("history/model_candidate/v1.avsc")],
            Self::RegistryEntry => &[schema_file!("history/registry_entry/v1.avsc")],
            Self::DeadLetter => &[schema_file!("history/dead_letter/v1.avsc")],
        }
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// A Rust type that is carried on a topic as Avro.
pub trait AvroRecord: Serialize + DeserializeOwned {
    /// Which schema describes it.
    const KIND: RecordKind;
}

macro_rules! avro_record {
    ($($ty:ident),* $(,)?) => {
        $(impl AvroRecord for $ty { const KIND: RecordKind = RecordKind::$ty; })*
    };
}
avro_record!(
    Interaction,
    Reward,
    RewardMetrics,
    ShardManifest,
    TriggerDecision,
    TrainRequest,
    ModelCandidate,
    RegistryEntry,
    DeadLetter
);

/// Calls the generic function `$f::<R>(args)` for the Rust type `R` of a
/// runtime [`RecordKind`].
macro_rules! with_record_type {
    ($kind:expr, $f:ident, $($arg:expr),*) => {
        match $kind {
            RecordKind::Interaction => $f::<Interaction>($($arg),*),
            RecordKind::Reward => $f::<Reward>($($arg),*),
            RecordKind::RewardMetrics => $f::<RewardMetrics>($($arg),*),
            RecordKind::ShardManifest => $f::<ShardManifest>($($arg),*),
            RecordKind::TriggerDecision => $f::<TriggerDecision>($($arg),*),
            RecordKind::TrainRequest => $f::<TrainRequest>($($arg),*),
            RecordKind::ModelCandidate => $f::<ModelCandidate>($($arg),*),
            RecordKind::RegistryEntry => $f::<RegistryEntry>($($arg),*),
            RecordKind::DeadLetter => $f::<DeadLetter>($($arg),*),
        }
    };
}

/// A known writer schema: which kind it belongs to and a reader for its data.
struct WriterEntry {
    kind: RecordKind,
    version: usize,
    reader: GenericDatumReader<'static>,
}

struct KindEntry {
    header: [u8; HEADER_LEN],
    writer: GenericDatumWriter<'static>,
    schema: &'static Schema,
}

/// The process-wide catalogue of schemas; build once via [`Codec::global`].
pub struct Codec {
    kinds: HashMap<RecordKind, KindEntry>,
    writers: HashMap<[u8; 8], WriterEntry>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("kinds", &self.kinds.len()).field("writer_schemas", &self.writers.len()).finish()
    }
}

static GLOBAL: LazyLock<Codec> =
    LazyLock::new(|| Codec::new().unwrap_or_else(|e| panic!("schemas compiled into the binary are invalid: {e}")));

/// Parses a schema and leaks it: the catalogue lives for the whole process and
/// the Avro readers borrow their schemas.
fn leak_schema(text: &str) -> Result<&'static Schema> {
    let schema = Schema::parse_str(text).map_err(|e| Error::Schema(e.to_string()))?;
    Ok(Box::leak(Box::new(schema)))
}

/// Every released schema of `kind` (oldest first, then the current one if it
/// is not released yet) with the 8-byte fingerprint its records carry, for
/// other Avro readers (the lake writer's Arrow decoder) to be taught the
/// exact fingerprints this codec writes.
pub fn released_schemas(kind: RecordKind) -> Result<Vec<([u8; 8], &'static str)>> {
    let mut out: Vec<([u8; 8], &'static str)> = Vec::new();
    for text in kind.history().iter().chain([&kind.current_schema()]) {
        let schema = Schema::parse_str(text).map_err(|e| Error::Schema(e.to_string()))?;
        let fingerprint: [u8; 8] = header_of(&schema)[2..].try_into().expect("8 bytes");
        if !out.iter().any(|(f, _)| *f == fingerprint) {
            out.push((fingerprint, text));
        }
    }
    Ok(out)
}

/// The single-object header (magic + fingerprint) of a schema.
pub fn header_of(schema: &Schema) -> [u8; HEADER_LEN] {
    let header = RabinFingerprintHeader::from_schema(schema).build_header();
    let mut out = [0u8; HEADER_LEN];
    out.copy_from_slice(&header);
    out
}

impl Codec {
    /// The catalogue of every schema compiled into this binary.
    pub fn global() -> &'static Codec {
        &GLOBAL
    }

    /// A catalogue of every schema compiled into this binary. Services use
    /// [`Codec::global`]; a separate instance lets tools and tests teach a
    /// codec extra writer schemas ([`Codec::register_writer`]).
    pub fn new() -> Result<Codec> {
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let mut codec = Codec { kinds: HashMap::new(), writers: HashMap::new() };
        for kind in RecordKind::ALL {
            let current = leak_schema(kind.current_schema())?;
            let header = header_of(current);
            let writer = GenericDatumWriter::builder(current).build().map_err(|e| Error::Schema(e.to_string()))?;
            codec.kinds.insert(kind, KindEntry { header, writer, schema: current });
            // The current schema is readable even before it is recorded in the
            // history (the evolution test insists that it is).
            for text in kind.history().iter().chain([&kind.current_schema()]) {
                codec.register_writer(kind, text)?;
            }
        }
        Ok(codec)
    }

    /// Makes data written with `schema_text` decodable as `kind`. The schema
    /// must be an allowed evolution of the current one, in either direction
    /// (see [`check_evolution`]); registering a known schema is a no-op.
    pub fn register_writer(&mut self, kind: RecordKind, schema_text: &str) -> Result<()> {
        let writer_schema = leak_schema(schema_text)?;
        let fingerprint: [u8; 8] = header_of(writer_schema)[2..].try_into().expect("8 bytes");
        if self.writers.contains_key(&fingerprint) {
            return Ok(());
        }
        let version = self.writers.values().filter(|w| w.kind == kind).count() + 1;
        let reader = GenericDatumReader::builder(writer_schema)
            .build()
            .map_err(|e| Error::Schema(format!("{kind} v{version}: {e}")))?;
        self.writers.insert(fingerprint, WriterEntry { kind, version, reader });
        Ok(())
    }

    fn kind(&self, kind: RecordKind) -> &KindEntry {
        self.kinds.get(&kind).expect("every RecordKind is in the catalogue")
    }

    /// The current schema of a kind.
    pub fn schema(&self, kind: RecordKind) -> &'static Schema {
        self.kind(kind).schema
    }

    /// The 8-byte fingerprint records of this kind are written with now.
    pub fn fingerprint(&self, kind: RecordKind) -> [u8; 8] {
        self.kind(kind).header[2..].try_into().expect("8 bytes")
    }

    /// Encodes a record as an Avro single object with the current schema.
    pub fn encode<R: AvroRecord>(&self, record: &R) -> Result<Vec<u8>> {
        let entry = self.kind(R::KIND);
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&entry.header);
        entry.writer.write_ser(&mut out, record).map_err(|e| Error::Encode { kind: R::KIND, detail: e.to_string() })?;
        Ok(out)
    }

    /// Identifies which kind (and schema version) wrote `bytes`, from the
    /// header alone.
    pub fn identify(&self, bytes: &[u8]) -> Result<(RecordKind, usize)> {
        let entry = self.writer_entry(bytes)?;
        Ok((entry.kind, entry.version))
    }

    fn writer_entry(&self, bytes: &[u8]) -> Result<&WriterEntry> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated { len: bytes.len() });
        }
        if bytes[..2] != MAGIC {
            return Err(Error::BadMagic { found: [bytes[0], bytes[1]] });
        }
        let fingerprint: [u8; 8] = bytes[2..HEADER_LEN].try_into().expect("8 bytes");
        self.writers.get(&fingerprint).ok_or(Error::UnknownFingerprint { fingerprint: u64::from_le_bytes(fingerprint) })
    }

    /// Decodes a single object into `R`, resolving an older (or newer but
    /// known) writer schema to the current one. Never panics on bad input.
    pub fn decode<R: AvroRecord>(&self, bytes: &[u8]) -> Result<R> {
        let entry = self.writer_entry(bytes)?;
        if entry.kind != R::KIND {
            return Err(Error::WrongKind { expected: R::KIND, found: entry.kind });
        }
        let mut body = &bytes[HEADER_LEN..];
        let record: R = entry
            .reader
            .read_deser(&mut body)
            .map_err(|e| Error::Malformed { kind: R::KIND, detail: e.to_string() })?;
        if !body.is_empty() {
            return Err(Error::Malformed {
                kind: R::KIND,
                detail: format!("{} trailing bytes after the datum", body.len()),
            });
        }
        Ok(record)
    }

    /// Decodes any known record into its JSON form (for tools like
    /// `flywheel tail` and dead-letter inspection).
    pub fn decode_to_json(&self, bytes: &[u8]) -> Result<(RecordKind, serde_json::Value)> {
        fn json<R: AvroRecord>(codec: &Codec, bytes: &[u8]) -> Result<serde_json::Value> {
            let record: R = codec.decode(bytes)?;
            serde_json::to_value(&record).map_err(|e| Error::Malformed { kind: R::KIND, detail: e.to_string() })
        }
        let kind = self.writer_entry(bytes)?.kind;
        let value = with_record_type!(kind, json, self, bytes)?;
        Ok((kind, value))
    }
}

impl Codec {
    /// Encodes a record given in its JSON form (see [`crate::records`]) after
    /// checking it parses as `kind`; used by tools that produce from files.
    pub fn encode_json(&self, kind: RecordKind, json: &serde_json::Value) -> Result<Vec<u8>> {
        fn enc<R: AvroRecord>(codec: &Codec, json: &serde_json::Value) -> Result<Vec<u8>> {
            let record: R = R::deserialize(json).map_err(|e| Error::Encode { kind: R::KIND, detail: e.to_string() })?;
            codec.encode(&record)
        }
        with_record_type!(kind, enc, self, json)
    }
}

/// Encodes with the global codec.
pub fn encode<R: AvroRecord>(record: &R) -> Result<Vec<u8>> {
    Codec::global().encode(record)
}

/// Decodes with the global codec.
pub fn decode<R: AvroRecord>(bytes: &[u8]) -> Result<R> {
    Codec::global().decode(bytes)
}

/// Checks that `new` may replace `old` under Flywheel's evolution rule:
/// BACKWARD compatible (the new schema reads every old datum: new fields have
/// defaults, no type narrowing) and unions append-only (old branches keep
/// their positions; the decoder maps union branches by index). Returns every
/// violation found, with its path.
pub fn check_evolution(old: &str, new: &str) -> std::result::Result<(), Vec<String>> {
    let parse = |t: &str| Schema::parse_str(t).map_err(|e| vec![format!("invalid schema: {e}")]);
    let (old_schema, new_schema) = (parse(old)?, parse(new)?);
    let mut problems = Vec::new();
    if let Err(e) = apache_avro::schema_compatibility::SchemaCompatibility::can_read(&old_schema, &new_schema) {
        problems.push(format!("new schema cannot read old data: {e}"));
    }
    let to_json = |t: &str| serde_json::from_str::<serde_json::Value>(t).map_err(|e| vec![e.to_string()]);
    unions_append_only(&to_json(old)?, &to_json(new)?, "", &mut problems);
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

/// Identity of a union branch: a named type's name, else its type.
fn branch_id(node: &serde_json::Value) -> String {
    match node {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) => m
            .get("name")
            .or_else(|| m.get("type"))
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .unwrap_or_default(),
        other => other.to_string(),
    }
}

fn unions_append_only(old: &serde_json::Value, new: &serde_json::Value, path: &str, problems: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Array(o), Value::Array(n)) => {
            for (i, ob) in o.iter().enumerate() {
                match n.get(i) {
                    Some(nb) if branch_id(ob) == branch_id(nb) => unions_append_only(ob, nb, path, problems),
                    Some(nb) => problems.push(format!(
                        "{path}: union branch {i} changed from {} to {}; unions are append-only",
                        branch_id(ob),
                        branch_id(nb)
                    )),
                    None => problems.push(format!("{path}: union branch {i} ({}) was removed", branch_id(ob))),
                }
            }
        }
        (Value::Object(o), Value::Object(n)) => {
            if let (Some(Value::Array(of)), Some(Value::Array(nf))) = (o.get("fields"), n.get("fields")) {
                for field in of {
                    let name = field.get("name").and_then(Value::as_str).unwrap_or_default();
                    if let Some(nfield) = nf.iter().find(|f| f.get("name").and_then(Value::as_str) == Some(name)) {
                        unions_append_only(&field["type"], &nfield["type"], &format!("{path}.{name}"), problems);
                    }
                }
            }
            for key in ["type", "items", "values"] {
                if let (Some(ov), Some(nv)) = (o.get(key), n.get(key))
                    && (ov.is_array() || ov.is_object())
                {
                    unions_append_only(ov, nv, path, problems);
                }
            }
        }
        _ => {}
    }
}
