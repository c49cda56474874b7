//! Avro single-object codec for every Flywheel record.
//!
//! Wire format (Avro spec, "single object encoding"): `C3 01`, the 8-byte
//! little-endian CRC-64-AVRO (Rabin) fingerprint of the writer schema's
//! Parsing Canonical Form, then the Avro binary datum. Every record is
//! therefore self-describing without a registry server: the decoder finds the
//! writer schema by fingerprint among every schema version the repository has
//! ever shipped (`schemas/history/`).
//!
//! The canonical form is computed here, as the specification defines it
//! ([`parsing_canonical_form`]): apache-avro 0.22's own form keeps
//! `{"type":"long"}` for a field with a logical type where the specification
//! (and fastavro, and the Java library) has `"long"`, so its fingerprints are
//! foreign to every other Avro implementation. Releases before this fix wrote
//! that library fingerprint ([`legacy_fingerprint`]); records carrying it stay
//! readable, since every schema version is registered under both.
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
pub use crate::kind::RecordKind;
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
    /// The specification's fingerprint of this schema (what this codec writes).
    fingerprint: [u8; 8],
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
    /// Every known writer schema.
    writers: Vec<WriterEntry>,
    /// Index into `writers` by fingerprint: each schema is there under the
    /// specification's fingerprint and under its legacy one.
    by_fingerprint: HashMap<[u8; 8], usize>,
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
/// is not released yet) with each 8-byte fingerprint its records may carry:
/// the specification's fingerprint, which this codec writes, and, where it
/// differs, the [`legacy_fingerprint`] earlier releases wrote. For other Avro
/// readers (the lake writer's Arrow decoder) to be taught every fingerprint
/// found on the topics.
pub fn released_schemas(kind: RecordKind) -> Result<Vec<([u8; 8], &'static str)>> {
    let mut out: Vec<([u8; 8], &'static str)> = Vec::new();
    for text in kind.history().iter().chain([&kind.current_schema()]) {
        let schema = Schema::parse_str(text).map_err(|e| Error::Schema(e.to_string()))?;
        for fingerprint in [fingerprint_of_text(text)?, legacy_fingerprint(&schema)] {
            if !out.iter().any(|(f, _)| *f == fingerprint) {
                out.push((fingerprint, text));
            }
        }
    }
    Ok(out)
}

/// The single-object header (magic + the specification's fingerprint) of a schema.
pub fn header_of(schema: &Schema) -> [u8; HEADER_LEN] {
    let json = serde_json::to_value(schema).expect("an apache-avro schema serializes to JSON");
    let canonical = canonical_form_of_value(&json).expect("a parsed schema has a canonical form");
    header_with(crc64_avro(canonical.as_bytes()))
}

fn header_with(fingerprint: [u8; 8]) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..2].copy_from_slice(&MAGIC);
    out[2..].copy_from_slice(&fingerprint);
    out
}

/// The specification's fingerprint of a schema given as JSON text: the
/// CRC-64-AVRO of its Parsing Canonical Form, in header (little-endian) order.
pub fn fingerprint_of_text(schema_json: &str) -> Result<[u8; 8]> {
    Ok(crc64_avro(parsing_canonical_form(schema_json)?.as_bytes()))
}

/// The fingerprint releases before the canonical-form fix wrote: apache-avro
/// 0.22's Rabin fingerprint of its own canonical form, which keeps
/// `{"type":"long"}` where the specification has `"long"`. Only read, never
/// written.
pub fn legacy_fingerprint(schema: &Schema) -> [u8; 8] {
    let header = RabinFingerprintHeader::from_schema(schema).build_header();
    header[2..HEADER_LEN].try_into().expect("a 10-byte header")
}

/// CRC-64-AVRO ("Rabin") of `bytes` as the specification defines it, as the
/// 8 bytes of the little-endian value (the order single-object headers use).
pub fn crc64_avro(bytes: &[u8]) -> [u8; 8] {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: LazyLock<[u64; 256]> = LazyLock::new(|| {
        let mut table = [0u64; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        table
    });
    let mut fp = EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp.to_le_bytes()
}

/// The Parsing Canonical Form of a schema given as JSON text, as the Avro
/// specification defines it: primitives in their simple form (so a logical
/// type such as `{"type":"long","logicalType":"timestamp-millis"}` becomes
/// `"long"`), full names, only `name`, `type`, `fields`, `symbols`, `items`,
/// `values` and `size` kept, in that order, and no whitespace.
pub fn parsing_canonical_form(schema_json: &str) -> Result<String> {
    let json: serde_json::Value =
        serde_json::from_str(schema_json).map_err(|e| Error::Schema(format!("schema is not JSON: {e}")))?;
    canonical_form_of_value(&json)
}

fn canonical_form_of_value(json: &serde_json::Value) -> Result<String> {
    let mut canonical = Canonicalizer { out: String::new(), defined: Vec::new() };
    canonical.node(json, "")?;
    Ok(canonical.out)
}

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// Writes the Parsing Canonical Form of a schema tree.
struct Canonicalizer {
    out: String,
    /// Full names of the named types defined so far, to resolve references.
    defined: Vec<String>,
}

impl Canonicalizer {
    fn string(&mut self, s: &str) {
        self.out.push_str(&serde_json::Value::from(s).to_string());
    }

    /// A name's full name within `namespace` ([FULLNAMES]).
    fn full_name(name: &str, namespace: &str) -> String {
        if name.contains('.') || namespace.is_empty() { name.to_string() } else { format!("{namespace}.{name}") }
    }

    /// A reference to a named type: the full name it was defined under.
    fn reference(&mut self, name: &str, namespace: &str) -> Result<()> {
        let qualified = Self::full_name(name, namespace);
        let resolved = if self.defined.contains(&qualified) {
            qualified
        } else if self.defined.iter().any(|d| d == name) {
            name.to_string()
        } else {
            return Err(Error::Schema(format!("reference to undefined type '{name}'")));
        };
        self.string(&resolved);
        Ok(())
    }

    /// Defines a named type; returns its full name and the namespace its
    /// members are resolved in.
    fn define(
        &mut self,
        obj: &serde_json::Map<String, serde_json::Value>,
        namespace: &str,
    ) -> Result<(String, String)> {
        let name = obj
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| Error::Schema("named type without a name".into()))?;
        let ns = match obj.get("namespace").and_then(|n| n.as_str()) {
            Some(explicit) if !name.contains('.') => explicit,
            _ => namespace,
        };
        let full = Self::full_name(name, ns);
        let inner_ns = full.rsplit_once('.').map(|(ns, _)| ns.to_string()).unwrap_or_default();
        self.defined.push(full.clone());
        Ok((full, inner_ns))
    }

    fn node(&mut self, node: &serde_json::Value, namespace: &str) -> Result<()> {
        use serde_json::Value;
        match node {
            Value::String(s) if PRIMITIVES.contains(&s.as_str()) => self.string(s),
            Value::String(s) => self.reference(s, namespace)?,
            Value::Array(branches) => {
                self.out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.node(branch, namespace)?;
                }
                self.out.push(']');
            }
            Value::Object(obj) => {
                let Some(ty) = obj.get("type") else {
                    return Err(Error::Schema(format!("schema without a type: {node}")));
                };
                let Value::String(ty) = ty else {
                    // {"type": {...}} or {"type": [...]}: the wrapper adds nothing.
                    return self.node(ty, namespace);
                };
                match ty.as_str() {
                    "record" | "error" => {
                        let (full, inner) = self.define(obj, namespace)?;
                        self.out.push_str("{\"name\":");
                        self.string(&full);
                        // An error is a record to the canonical form (as in Java and fastavro).
                        self.out.push_str(",\"type\":\"record\",\"fields\":[");
                        let fields = obj
                            .get("fields")
                            .and_then(Value::as_array)
                            .ok_or_else(|| Error::Schema(format!("record {full} has no fields array")))?;
                        for (i, field) in fields.iter().enumerate() {
                            if i > 0 {
                                self.out.push(',');
                            }
                            let name = field
                                .get("name")
                                .and_then(Value::as_str)
                                .ok_or_else(|| Error::Schema(format!("a field of {full} has no name")))?;
                            let ty = field
                                .get("type")
                                .ok_or_else(|| Error::Schema(format!("field {full}.{name} has no type")))?;
                            self.out.push_str("{\"name\":");
                            self.string(name);
                            self.out.push_str(",\"type\":");
                            self.node(ty, &inner)?;
                            self.out.push('}');
                        }
                        self.out.push_str("]}");
                    }
                    "enum" => {
                        let (full, _) = self.define(obj, namespace)?;
                        self.out.push_str("{\"name\":");
                        self.string(&full);
                        self.out.push_str(",\"type\":\"enum\",\"symbols\":[");
                        let symbols = obj
                            .get("symbols")
                            .and_then(Value::as_array)
                            .ok_or_else(|| Error::Schema(format!("enum {full} has no symbols array")))?;
                        for (i, symbol) in symbols.iter().enumerate() {
                            if i > 0 {
                                self.out.push(',');
                            }
                            let symbol = symbol
                                .as_str()
                                .ok_or_else(|| Error::Schema(format!("enum {full}: a symbol is not a string")))?;
                            self.string(symbol);
                        }
                        self.out.push_str("]}");
                    }
                    "fixed" => {
                        let (full, _) = self.define(obj, namespace)?;
                        let size = obj
                            .get("size")
                            .and_then(Value::as_u64)
                            .ok_or_else(|| Error::Schema(format!("fixed {full} has no integer size")))?;
                        self.out.push_str("{\"name\":");
                        self.string(&full);
                        self.out.push_str(&format!(",\"type\":\"fixed\",\"size\":{size}}}"));
                    }
                    "array" => {
                        let items = obj.get("items").ok_or_else(|| Error::Schema("array without items".into()))?;
                        self.out.push_str("{\"type\":\"array\",\"items\":");
                        self.node(items, namespace)?;
                        self.out.push('}');
                    }
                    "map" => {
                        let values = obj.get("values").ok_or_else(|| Error::Schema("map without values".into()))?;
                        self.out.push_str("{\"type\":\"map\",\"values\":");
                        self.node(values, namespace)?;
                        self.out.push('}');
                    }
                    // A primitive in object form, with or without a logical type ([PRIMITIVES], [STRIP]).
                    primitive if PRIMITIVES.contains(&primitive) => self.string(primitive),
                    // {"type": "SomeNamedType"}
                    other => self.reference(other, namespace)?,
                }
            }
            other => return Err(Error::Schema(format!("not a schema: {other}"))),
        }
        Ok(())
    }
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
        let mut codec = Codec { kinds: HashMap::new(), writers: Vec::new(), by_fingerprint: HashMap::new() };
        for kind in RecordKind::ALL {
            let current = leak_schema(kind.current_schema())?;
            let header = header_with(fingerprint_of_text(kind.current_schema())?);
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

    /// Makes data written with `schema_text` decodable as `kind`, under the
    /// specification's fingerprint and the [`legacy_fingerprint`] earlier
    /// releases wrote. The schema must be an allowed evolution of the current
    /// one, in either direction (see [`check_evolution`]); registering a known
    /// schema is a no-op.
    pub fn register_writer(&mut self, kind: RecordKind, schema_text: &str) -> Result<()> {
        let fingerprint = fingerprint_of_text(schema_text)?;
        if self.by_fingerprint.contains_key(&fingerprint) {
            return Ok(());
        }
        let writer_schema = leak_schema(schema_text)?;
        let legacy = legacy_fingerprint(writer_schema);
        let version = self.writers.iter().filter(|w| w.kind == kind).count() + 1;
        let reader = GenericDatumReader::builder(writer_schema)
            .build()
            .map_err(|e| Error::Schema(format!("{kind} v{version}: {e}")))?;
        let index = self.writers.len();
        self.writers.push(WriterEntry { kind, version, fingerprint, reader });
        self.by_fingerprint.insert(fingerprint, index);
        // A legacy fingerprint never displaces a schema known by its own.
        self.by_fingerprint.entry(legacy).or_insert(index);
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

    /// The specification's fingerprint of the schema that wrote `bytes`,
    /// whichever of its fingerprints the header carries. For readers that
    /// key writer schemas by fingerprint and must see one fingerprint per
    /// schema: arrow-avro's decoder flushes its batch at every fingerprint
    /// change, so a record with a legacy header among current ones is best
    /// given the current header first.
    pub fn spec_fingerprint(&self, bytes: &[u8]) -> Result<[u8; 8]> {
        Ok(self.writer_entry(bytes)?.fingerprint)
    }

    fn writer_entry(&self, bytes: &[u8]) -> Result<&WriterEntry> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated { len: bytes.len() });
        }
        if bytes[..2] != MAGIC {
            return Err(Error::BadMagic { found: [bytes[0], bytes[1]] });
        }
        let fingerprint: [u8; 8] = bytes[2..HEADER_LEN].try_into().expect("8 bytes");
        self.by_fingerprint
            .get(&fingerprint)
            .map(|&i| &self.writers[i])
            .ok_or(Error::UnknownFingerprint { fingerprint: u64::from_le_bytes(fingerprint) })
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
