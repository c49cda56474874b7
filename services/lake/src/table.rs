//! The reward table: a Delta Lake table at `<lake root>/rewards`, its Hive
//! layout, validated partition values, and the commits that make files
//! visible atomically and exactly once, over any [`Storage`].
//!
//! Layout under the lake root:
//! - `rewards/_delta_log/`: the Delta log (JSON commits, Parquet
//!   checkpoints). It, not a directory scan, says which files are in the
//!   table: read it with DuckDB `delta_scan`, Spark, Trino, polars or Python
//!   `deltalake`;
//! - `rewards/tenant=<t>/date=YYYY-MM-DD/hour=HH/<topic>-<partition>-<first>-<last>.parquet`:
//!   data files, named from the source offsets of their rows; the table is
//!   partitioned by `tenant` (string), `date` (date) and `hour` (integer);
//! - `_flywheel_state/`: the manifest publisher's progress; `_flywheel_tmp/`:
//!   the local store's temp files (both outside the table).
//!
//! A commit of source partition `p` carries a Delta `txn` action whose
//! application id names `p` and whose version is the last offset covered;
//! its `commitInfo` carries what the lake writer publishes afterwards (file
//! hashes, offset ranges, rejected records). Before committing, the writer
//! re-reads the table and refuses if another writer moved `p` on; a writer
//! racing it on the same id loses in Delta's conflict check. A crash before
//! the commit leaves complete files no commit names: no reader sees them,
//! the next commit of the same range replaces them, and vacuum deletes
//! what is left once it is older than the retention period.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Once};

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use deltalake_core::kernel::engine::arrow_conversion::TryIntoKernel as _;
use deltalake_core::kernel::transaction::{CommitBuilder, CommitConflictError, CommitProperties, TransactionError};
use deltalake_core::kernel::{
    Action, Add, DataType as DeltaType, MetadataExt as _, Remove, StructField, StructType, Transaction,
};
use deltalake_core::logstore::{LogStore, LogStoreFactory, LogStoreRef, ObjectStoreRef, StorageConfig};
use deltalake_core::protocol::{DeltaOperation, SaveMode};
use deltalake_core::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::LakeError;
use crate::store::Storage;

/// Directory of the reward table under the lake root.
pub const REWARDS_DIR: &str = "rewards";
/// Directory of the publisher's progress under the lake root.
pub const STATE_DIR: &str = "_flywheel_state";
/// The table's partition columns, in path order.
pub const PARTITION_COLUMNS: [&str; 3] = ["tenant", "date", "hour"];
/// Longest accepted partition value.
pub const MAX_PARTITION_VALUE_LEN: usize = 64;
/// Key of the lake's own record in each Delta `commitInfo`.
const COMMIT_INFO_KEY: &str = "flywheel";

/// Checks a value taken from data before it becomes a path component:
/// `[a-z0-9_-]`, 1 to 64 characters. Nothing else can name a directory, so no
/// event can build a path outside the lake root.
pub fn validate_partition_value(name: &str, value: &str) -> Result<(), LakeError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_PARTITION_VALUE_LEN
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LakeError::InvalidPartitionValue { name: name.to_string(), value: value.chars().take(80).collect() })
    }
}

/// The Hive partition directory (relative to the lake root) of a reward of
/// `tenant` shown at `shown_time` (ms since epoch, UTC).
pub fn partition_dir(tenant: &str, shown_time: i64) -> Result<PathBuf, LakeError> {
    validate_partition_value("tenant", tenant)?;
    let hours = shown_time.div_euclid(3_600_000);
    let (y, m, d) = flywheel_core::civil_from_days(hours.div_euclid(24));
    let hour = hours.rem_euclid(24);
    Ok(PathBuf::from(REWARDS_DIR)
        .join(format!("tenant={tenant}"))
        .join(format!("date={y:04}-{m:02}-{d:02}"))
        .join(format!("hour={hour:02}")))
}

/// The Delta partition values of a file at `path` (relative to the lake
/// root), read from its Hive directories: the values are exactly the ones
/// the path was built from.
pub fn partition_values(path: &str) -> Result<HashMap<String, Option<String>>, LakeError> {
    let mut values = HashMap::new();
    for part in path.split('/') {
        if let Some((k, v)) = part.split_once('=')
            && PARTITION_COLUMNS.contains(&k)
        {
            // Delta spells integers without padding: `hour=07` is 7.
            let v = if k == "hour" { v.trim_start_matches('0').to_string() } else { v.to_string() };
            values.insert(k.to_string(), Some(if v.is_empty() { "0".to_string() } else { v }));
        }
    }
    if values.len() != PARTITION_COLUMNS.len() {
        return Err(LakeError::Integrity(format!("{path} is not under tenant=/date=/hour= directories")));
    }
    Ok(values)
}

/// A fresh file name for the rows of `topic`/`partition` in `[first, last]`:
/// named by the offsets (so names sort by offset), plus a part no other
/// call makes, so a file is never written twice under one name (what Delta
/// needs: vacuum may be deleting an uncommitted file of that name).
pub fn file_name(topic: &str, partition: i32, first: i64, last: i64) -> Result<String, LakeError> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let seed = format!("{host}/{}/{nanos}/{n}", std::process::id());
    let unique = flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes())[..6]);
    Ok(format!("{}{first:020}-{last:020}-{unique}.parquet", file_prefix(topic, partition)?))
}

/// The prefix of every file name (data and temp) of a source partition.
pub fn file_prefix(topic: &str, partition: i32) -> Result<String, LakeError> {
    let safe = topic.replace('.', "_");
    validate_partition_value("source topic", &safe)?;
    Ok(format!("{safe}-{partition}-"))
}

/// The key of a source partition in commit records: `topic/partition`.
pub fn source_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

/// The Delta application id under which a source partition's offset is kept
/// (`txn.appId`); the topic name carries the deployment's topic prefix.
pub fn app_id(topic: &str, partition: i32) -> String {
    format!("flywheel-lake-writer:{topic}:{partition}")
}

/// One file added by a commit, as the commit records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedFile {
    /// Path relative to the lake root (`/`-separated).
    pub path: String,
    /// Rows.
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// Per source `topic/partition`: the lowest and highest offset of its
    /// rows in this file.
    #[serde(default)]
    pub sources: BTreeMap<String, (i64, i64)>,
}

/// A file of the table's current snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFile {
    /// Path relative to the lake root (`/`-separated).
    pub path: String,
    /// Rows (from the file's Delta statistics).
    pub rows: u64,
    /// Bytes.
    pub bytes: u64,
}

/// A record the writer rejected; published to the dead-letter topic after
/// the commit that covers its offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Machine-readable reason.
    pub reason_code: String,
    /// What is wrong.
    pub reason: String,
    /// Original key (base64 in the commit record).
    #[serde(default, with = "base64_bytes")]
    pub key: Option<Vec<u8>>,
    /// Original value (base64 in the commit record).
    #[serde(default, with = "base64_bytes")]
    pub value: Option<Vec<u8>>,
}

/// Bytes as base64 strings in the Delta log's JSON (a third the size of a
/// JSON array of numbers, which every reader of the log would parse).
mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| STANDARD.decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// What the lake records of one Delta commit (in its `commitInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The Delta table version.
    #[serde(skip)]
    pub seq: u64,
    /// Files made visible.
    pub added: Vec<AddedFile>,
    /// Files removed (compaction).
    #[serde(default)]
    pub removed: Vec<String>,
    /// Per source `topic/partition`: the inclusive offset range this commit
    /// covers (rows written, replays dropped and records rejected). The next
    /// commit of that partition starts right after it.
    pub offsets: BTreeMap<String, (i64, i64)>,
    /// Records rejected in those ranges.
    #[serde(default)]
    pub rejected: Vec<Rejected>,
    /// Wall-clock time of the commit (ms), for operators only.
    pub committed_at: i64,
    /// Who wrote it (`host/pid` or a tool name), for operators only.
    #[serde(default)]
    pub writer: String,
}

/// A file to add in a commit.
#[derive(Debug)]
pub struct NewFile {
    /// Path relative to the lake root.
    pub path: String,
    /// Rows.
    pub rows: u64,
    /// Content.
    pub bytes: Vec<u8>,
    /// Source offset ranges of its rows.
    pub sources: BTreeMap<String, (i64, i64)>,
    /// Its columns (a newer reward schema adds columns to the table).
    pub columns: arrow_schema::SchemaRef,
}

impl NewFile {
    fn added(&self) -> AddedFile {
        AddedFile {
            path: self.path.clone(),
            rows: self.rows,
            bytes: self.bytes.len() as u64,
            sha256: flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&self.bytes)),
            sources: self.sources.clone(),
        }
    }
}

/// What one source partition commits.
#[derive(Debug)]
pub struct PartitionCommit<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// The partition's last committed offset when this writer started
    /// reading it.
    pub previous: Option<i64>,
    /// Inclusive offset range covered: rows written, replays dropped and
    /// records rejected.
    pub range: (i64, i64),
    /// Files to add.
    pub files: Vec<NewFile>,
    /// Records rejected in the range.
    pub rejected: Vec<Rejected>,
    /// Wall-clock time (ms).
    pub committed_at: i64,
}

/// What a vacuum did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VacuumReport {
    /// Files deleted: removed by compaction, or never committed (a crashed
    /// writer's), and older than the retention period.
    pub deleted: usize,
}

/// Object stores beyond local disk and memory get Delta's default log
/// store, which commits with a conditional create (`If-None-Match: *` on
/// S3): safe for concurrent writers on stores that honour it.
#[derive(Debug)]
struct ConditionalPutLogStores;

impl LogStoreFactory for ConditionalPutLogStores {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake_core::DeltaResult<Arc<dyn LogStore>> {
        Ok(deltalake_core::logstore::default_logstore(prefixed_store, root_store, location, options))
    }
}

fn register_log_stores() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let factories = deltalake_core::logstore::logstore_factories();
        for scheme in ["s3://", "s3a://", "gs://", "az://", "abfss://"] {
            if let Ok(url) = Url::parse(scheme) {
                factories.insert(url, Arc::new(ConditionalPutLogStores));
            }
        }
    });
}

/// The table's columns for files of `schema`: Delta has no dictionary or
/// millisecond types, so enums read as strings and timestamps as
/// microseconds (every Delta reader casts the files' own types to these).
fn delta_arrow_type(t: &DataType) -> DataType {
    match t {
        DataType::Dictionary(_, value) => delta_arrow_type(value),
        // Reward times are UTC instants.
        DataType::Timestamp(..) => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        DataType::Struct(fields) => DataType::Struct(delta_fields(fields)),
        DataType::List(item) => DataType::List(Arc::new(delta_field(item))),
        other => other.clone(),
    }
}

fn delta_field(f: &Field) -> Field {
    Field::new(f.name(), delta_arrow_type(f.data_type()), f.is_nullable())
}

fn delta_fields(fields: &Fields) -> Fields {
    fields.iter().map(|f| delta_field(f)).collect()
}

/// The Delta schema of the table whose files have `file_schema`: the file
/// columns (the Hive `tenant` one included) plus the `date` and `hour`
/// partition columns.
pub fn table_schema(file_schema: &Schema) -> Result<StructType, LakeError> {
    let arrow = Schema::new(delta_fields(file_schema.fields()));
    let schema: StructType = (&arrow)
        .try_into_kernel()
        .map_err(|e| LakeError::Config(format!("the reward columns have no Delta equivalent: {e}")))?;
    let mut fields: Vec<StructField> = schema.fields().cloned().collect();
    for (name, t) in [("date", DeltaType::DATE), ("hour", DeltaType::INTEGER)] {
        if !fields.iter().any(|f| f.name() == name) {
            fields.push(StructField::new(name, t, true));
        }
    }
    StructType::try_new(fields).map_err(|e| LakeError::Config(format!("table schema: {e}")))
}

/// The columns of `wanted` the table lacks, top-level or inside struct
/// columns, added to the table's schema (columns are only ever added, so
/// this is the newer schema); `None` when nothing is new.
fn evolved(current: &StructType, wanted: &StructType) -> Result<Option<StructType>, LakeError> {
    let mut changed = false;
    let mut fields: Vec<StructField> = Vec::new();
    for f in current.fields() {
        let merged = match (f.data_type(), wanted.field(f.name()).map(StructField::data_type)) {
            (DeltaType::Struct(have), Some(DeltaType::Struct(want))) => evolved(have, want)?
                .map(|inner| StructField::new(f.name().clone(), DeltaType::Struct(Box::new(inner)), f.is_nullable())),
            _ => None,
        };
        changed |= merged.is_some();
        fields.push(merged.unwrap_or_else(|| f.clone()));
    }
    for f in wanted.fields().filter(|f| current.field(f.name()).is_none()) {
        changed = true;
        fields.push(StructField::new(f.name().clone(), f.data_type().clone(), true));
    }
    if !changed {
        return Ok(None);
    }
    StructType::try_new(fields).map(Some).map_err(|e| LakeError::Config(format!("evolving the table schema: {e}")))
}

/// The reward table with its latest loaded snapshot.
pub struct Lake {
    storage: Arc<dyn Storage>,
    table: DeltaTable,
    runtime: tokio::runtime::Handle,
    writer: String,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lake").field("url", &self.storage.url()).field("version", &self.table.version()).finish()
    }
}

fn is_conflict(e: &DeltaTableError) -> Option<&CommitConflictError> {
    match e {
        DeltaTableError::Transaction { source: TransactionError::CommitConflict(c) } => Some(c),
        _ => None,
    }
}

impl Lake {
    /// Opens the lake on `storage`, creating the table (with the schema of
    /// files of `file_schema`) if there is none. Calls block on `runtime`:
    /// use the lake from blocking threads.
    pub fn create_or_open(
        storage: Arc<dyn Storage>,
        runtime: tokio::runtime::Handle,
        file_schema: &Schema,
    ) -> Result<Lake, LakeError> {
        let mut lake = Lake::build(storage, runtime)?;
        if lake.block_on(lake.table.log_store().is_delta_table_location()).map_err(LakeError::delta("probing"))? {
            lake.refresh()?;
            return Ok(lake);
        }
        lake.check_conditional_create()?;
        let schema = table_schema(file_schema)?;
        let create = deltalake_core::operations::create::CreateBuilder::new()
            .with_log_store(lake.table.log_store())
            .with_columns(schema.fields().cloned())
            .with_partition_columns(PARTITION_COLUMNS)
            .with_table_name(REWARDS_DIR)
            .with_comment("Flywheel rewards: one row per scored suggestion, written exactly once from Kafka")
            // Tombstones outlive any sensible vacuum retention, so a removed
            // file is always judged by its removal time.
            .with_configuration_property(
                deltalake_core::TableProperty::DeletedFileRetentionDuration,
                Some("interval 30 days"),
            )
            .with_save_mode(SaveMode::ErrorIfExists)
            // No retry: a second creator must not write its own version 1.
            .with_commit_properties(CommitProperties::default().with_max_retries(0));
        match lake.block_on(create.into_future()) {
            Ok(table) => lake.table = table,
            Err(e) => {
                // Another writer created it first: then the table loads.
                if lake.refresh().is_err() {
                    return Err(LakeError::delta("creating")(e));
                }
            }
        }
        Ok(lake)
    }

    /// Refuses a store that overwrites on a conditional create (Delta
    /// commits need create-if-absent; the npm `s3rver`, for one, ignores
    /// `If-None-Match`).
    fn check_conditional_create(&self) -> Result<(), LakeError> {
        let probe = format!("{STATE_DIR}/conditional-create-probe");
        match self.storage.put_new(&probe, b"1") {
            Ok(()) | Err(LakeError::Exists(_)) => {}
            Err(e) => return Err(e),
        }
        match self.storage.put_new(&probe, b"2") {
            Err(LakeError::Exists(_)) => Ok(()),
            Ok(()) => Err(LakeError::Config(format!(
                "{} overwrote an object on a create-if-absent put: Delta commits need conditional writes",
                self.storage.url()
            ))),
            Err(e) => Err(e),
        }
    }

    /// Opens an existing lake (tools, readers); fails if there is no table.
    pub fn open(storage: Arc<dyn Storage>, runtime: tokio::runtime::Handle) -> Result<Lake, LakeError> {
        let mut lake = Lake::build(storage, runtime)?;
        lake.refresh()?;
        Ok(lake)
    }

    /// Opens the table as of `version` (time travel: a train request reads
    /// the snapshot its trigger saw, even after compaction).
    pub fn open_at(
        storage: Arc<dyn Storage>,
        runtime: tokio::runtime::Handle,
        version: u64,
    ) -> Result<Lake, LakeError> {
        let mut lake = Lake::build(storage, runtime)?;
        let runtime = lake.runtime.clone();
        runtime
            .block_on(lake.table.load_version(version))
            .map_err(LakeError::delta(format!("loading version {version}")))?;
        Ok(lake)
    }

    fn build(storage: Arc<dyn Storage>, runtime: tokio::runtime::Handle) -> Result<Lake, LakeError> {
        register_log_stores();
        let (store, root) = storage.object_store()?;
        let location = root
            .join(&format!("{REWARDS_DIR}/"))
            .map_err(|e| LakeError::Config(format!("table location under {root}: {e}")))?;
        let table = DeltaTableBuilder::from_url(location.clone())
            .map_err(LakeError::delta(format!("at {location}")))?
            .with_storage_backend(store, location.clone())
            .build()
            .map_err(LakeError::delta(format!("at {location}")))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        Ok(Lake { storage, table, runtime, writer: format!("{host}/{}", std::process::id()) })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Reads commits made since the last read (by any writer).
    pub fn refresh(&mut self) -> Result<(), LakeError> {
        let runtime = self.runtime.clone();
        runtime.block_on(self.table.update_state()).map_err(LakeError::delta("reading the log"))
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The loaded table version.
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// The table's data files in the loaded snapshot, by path.
    pub fn files(&self) -> Result<Vec<LiveFile>, LakeError> {
        let snapshot = self.table.snapshot().map_err(LakeError::delta("reading the snapshot"))?;
        let log_store = self.table.log_store();
        let views: Vec<_> = self
            .block_on(snapshot.snapshot().file_views(log_store.as_ref(), None).try_collect::<Vec<_>>())
            .map_err(LakeError::delta("listing files"))?;
        let mut out: Vec<LiveFile> = views
            .iter()
            .map(|v| LiveFile {
                path: format!("{REWARDS_DIR}/{}", v.path()),
                rows: v.num_records().unwrap_or_default() as u64,
                bytes: v.size().max(0) as u64,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// The last committed offset of one source partition.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, LakeError> {
        let snapshot = self.table.snapshot().map_err(LakeError::delta("reading the snapshot"))?;
        let log_store = self.table.log_store();
        self.block_on(snapshot.transaction_version(log_store.as_ref(), app_id(topic, partition)))
            .map_err(LakeError::delta("reading a txn version"))
    }

    /// The lake's record of commit `version`; `None` for commits it did not
    /// write (or whose JSON entry log cleanup removed).
    pub fn commit(&self, version: u64) -> Result<Option<Commit>, LakeError> {
        let log_store = self.table.log_store();
        let v = version;
        let Some(bytes) =
            self.block_on(log_store.read_commit_entry(v)).map_err(LakeError::delta(format!("reading commit {v}")))?
        else {
            return Ok(None);
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let action: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| LakeError::Integrity(format!("commit {v} is not JSON lines: {e}")))?;
            if let Some(ours) = action.get("commitInfo").and_then(|c| c.get(COMMIT_INFO_KEY)) {
                let mut commit: Commit = serde_json::from_value(ours.clone())
                    .map_err(|e| LakeError::Integrity(format!("commit {v}: the lake's record: {e}")))?;
                commit.seq = version;
                return Ok(Some(commit));
            }
        }
        Ok(None)
    }

    /// The lake's commits after `after` (exclusive; all when `None`) up to
    /// the loaded version that cover source partition `key`, oldest first.
    pub fn commits_of(&self, key: &str, after: Option<u64>) -> Result<Vec<Commit>, LakeError> {
        let Some(latest) = self.version() else { return Ok(Vec::new()) };
        let first = after.map_or(0, |a| a + 1);
        let mut out = Vec::new();
        for v in first..=latest {
            if let Some(c) = self.commit(v)?
                && c.offsets.contains_key(key)
            {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Creates `files` (fresh names: see [`file_name`]); never overwrites.
    fn create_files(&self, files: &[NewFile]) -> Result<(), LakeError> {
        for f in files {
            match self.storage.put_new(&f.path, &f.bytes) {
                Ok(()) => {}
                Err(LakeError::Exists(path)) => {
                    return Err(LakeError::Integrity(format!("{path} exists: file names must be fresh")));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn check_partition(&self, topic: &str, partition: i32, previous: Option<i64>) -> Result<(), LakeError> {
        let now = self.committed_offset(topic, partition)?;
        if now == previous {
            Ok(())
        } else {
            Err(LakeError::Conflict(format!(
                "{topic}/{partition} was committed up to {now:?} by another writer; this one read from {previous:?}"
            )))
        }
    }

    fn add_action(f: &NewFile, added: &AddedFile, data_change: bool) -> Result<Action, LakeError> {
        let path = f
            .path
            .strip_prefix(&format!("{REWARDS_DIR}/"))
            .ok_or_else(|| LakeError::Config(format!("{} is outside the table", f.path)))?;
        let stats = serde_json::json!({ "numRecords": f.rows }).to_string();
        Ok(Action::Add(Add {
            path: path.to_string(),
            partition_values: partition_values(&f.path)?,
            size: added.bytes as i64,
            modification_time: flywheel_core::now_millis(),
            data_change,
            stats: Some(stats),
            tags: Some([("sha256".to_string(), Some(added.sha256.clone()))].into()),
            deletion_vector: None,
            base_row_id: None,
            default_row_commit_version: None,
            clustering_provider: None,
        }))
    }

    /// A metadata action adding the columns of `files` the table lacks.
    fn schema_change(&self, files: &[NewFile]) -> Result<Option<Action>, LakeError> {
        let snapshot = self.table.snapshot().map_err(LakeError::delta("reading the snapshot"))?;
        let current = snapshot.schema();
        let mut wanted: Option<StructType> = None;
        for f in files {
            let schema = table_schema(&f.columns)?;
            let base = wanted.as_ref().unwrap_or(current.as_ref());
            if let Some(next) = evolved(base, &schema)? {
                wanted = Some(next);
            }
        }
        let Some(schema) = wanted else { return Ok(None) };
        let metadata = snapshot
            .metadata()
            .clone()
            .with_schema(&schema)
            .map_err(|e| LakeError::Config(format!("evolving the table schema: {e}")))?;
        tracing::info!(columns = schema.fields().count(), "the table schema gains columns");
        Ok(Some(Action::Metadata(metadata)))
    }

    /// Commits `actions` with the lake's record and `txns` on a fresh
    /// snapshot on which `precondition` holds; Delta retries over commits of
    /// others that do not conflict. A conflict on the same `txn` (another
    /// writer of the same source partition) is [`LakeError::Conflict`];
    /// other conflicts (a concurrent schema change) are retried on a newer
    /// snapshot, re-checking `precondition`.
    fn commit_actions(
        &mut self,
        actions: Vec<Action>,
        txns: Vec<Transaction>,
        record: &Commit,
        operation: DeltaOperation,
        precondition: impl Fn(&Lake) -> Result<(), LakeError>,
    ) -> Result<u64, LakeError> {
        let info = serde_json::to_value(record).map_err(|e| LakeError::Config(format!("commit record: {e}")))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // Checked on exactly the snapshot the commit is built on: Delta's
            // conflict check covers every version after it.
            self.refresh()?;
            precondition(self)?;
            let props = CommitProperties::default()
                .with_application_transactions(txns.clone())
                .with_metadata([(COMMIT_INFO_KEY.to_string(), info.clone())])
                .with_max_retries(50);
            let log_store: LogStoreRef = self.table.log_store();
            let runtime = self.runtime.clone();
            let snapshot = self.table.snapshot().map_err(LakeError::delta("reading the snapshot"))?;
            let builder = CommitBuilder::from(props).with_actions(actions.clone());
            let done = runtime.block_on(builder.build(Some(snapshot), log_store, operation.clone()).into_future());
            match done {
                Ok(finalized) => {
                    self.refresh()?;
                    return Ok(finalized.version);
                }
                Err(e) => match is_conflict(&e) {
                    Some(CommitConflictError::ConcurrentTransaction) => {
                        return Err(LakeError::Conflict(e.to_string()));
                    }
                    Some(other) if attempt < 5 => {
                        tracing::info!(conflict = %other, attempt, "commit conflict; retrying on a newer snapshot");
                    }
                    Some(other) => return Err(LakeError::Conflict(other.to_string())),
                    None => return Err(LakeError::delta("committing")(e)),
                },
            }
        }
    }

    /// Commits one source partition's files, offsets and rejected records
    /// (see [`PartitionCommit`]). If the table shows another writer committed
    /// the partition past `previous`, or one does while this commit is made,
    /// this fails with [`LakeError::Conflict`] (the caller drops its buffer
    /// and re-reads).
    pub fn commit_partition(&mut self, c: PartitionCommit<'_>) -> Result<Commit, LakeError> {
        let PartitionCommit { topic, partition, previous, range, files, rejected, committed_at } = c;
        self.refresh()?;
        self.check_partition(topic, partition, previous)?;
        self.create_files(&files)?;
        let mut record = Commit {
            seq: 0,
            added: files.iter().map(NewFile::added).collect(),
            removed: Vec::new(),
            offsets: [(source_key(topic, partition), range)].into(),
            rejected,
            committed_at,
            writer: self.writer.clone(),
        };
        let mut actions = Vec::new();
        if let Some(metadata) = self.schema_change(&files)? {
            actions.push(metadata);
        }
        for (f, added) in files.iter().zip(&record.added) {
            actions.push(Lake::add_action(f, added, true)?);
        }
        let txn = Transaction::new_with_last_update(app_id(topic, partition), range.1, Some(committed_at));
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: Some(PARTITION_COLUMNS.iter().map(|c| c.to_string()).collect()),
            predicate: None,
        };
        let check = |lake: &Lake| lake.check_partition(topic, partition, previous);
        match self.commit_actions(actions, vec![txn], &record, operation, check) {
            Ok(seq) => record.seq = seq,
            Err(LakeError::Conflict(why)) => {
                // A commit whose answer was lost (an S3 timeout after the put
                // landed) conflicts with itself on the retry: find it.
                self.refresh()?;
                if self.committed_offset(topic, partition)? == Some(range.1)
                    && let Some(seq) = self.find_own_commit(&record)?
                {
                    record.seq = seq;
                    return Ok(record);
                }
                return Err(LakeError::Conflict(why));
            }
            Err(e) => return Err(e),
        }
        Ok(record)
    }

    /// The version of a recent commit equal to `record` (same writer, offsets
    /// and files), if any.
    fn find_own_commit(&self, record: &Commit) -> Result<Option<u64>, LakeError> {
        let Some(latest) = self.version() else { return Ok(None) };
        for v in (latest.saturating_sub(64)..=latest).rev() {
            if let Some(c) = self.commit(v)?
                && c.writer == record.writer
                && c.offsets == record.offsets
                && c.added == record.added
            {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Replaces `removed` (live files) by `added` in one commit whose actions
    /// change no data (`dataChange = false`): readers of any snapshot see
    /// every row exactly once. Fails with [`LakeError::Conflict`] if another
    /// commit removed any of them.
    pub fn commit_replace(
        &mut self,
        added: Vec<NewFile>,
        removed: Vec<LiveFile>,
        committed_at: i64,
        writer: &str,
    ) -> Result<Commit, LakeError> {
        let all_live = |lake: &Lake| -> Result<(), LakeError> {
            let live = lake.files()?;
            match removed.iter().find(|r| !live.iter().any(|l| l.path == r.path)) {
                Some(gone) => Err(LakeError::Conflict(format!("{} was removed by another commit", gone.path))),
                None => Ok(()),
            }
        };
        self.refresh()?;
        all_live(self)?;
        self.create_files(&added)?;
        let removed_at = self.storage_now()?;
        let mut record = Commit {
            seq: 0,
            added: added.iter().map(NewFile::added).collect(),
            removed: removed.iter().map(|r| r.path.clone()).collect(),
            offsets: BTreeMap::new(),
            rejected: Vec::new(),
            committed_at,
            writer: writer.to_string(),
        };
        let mut actions = Vec::new();
        for (f, a) in added.iter().zip(&record.added) {
            actions.push(Lake::add_action(f, a, false)?);
        }
        for r in &removed {
            let path = r.path.strip_prefix(&format!("{REWARDS_DIR}/")).unwrap_or(&r.path);
            actions.push(Action::Remove(Remove {
                path: path.to_string(),
                data_change: false,
                deletion_timestamp: Some(removed_at),
                extended_file_metadata: Some(true),
                partition_values: Some(partition_values(&r.path)?),
                size: Some(r.bytes as i64),
                tags: None,
                deletion_vector: None,
                base_row_id: None,
                default_row_commit_version: None,
            }));
        }
        let target = added.iter().map(|f| f.bytes.len() as i64).max().unwrap_or_default();
        let operation = DeltaOperation::Optimize { predicate: None, target_size: target };
        record.seq = self.commit_actions(actions, Vec::new(), &record, operation, all_live)?;
        Ok(record)
    }

    /// The storage's clock (ms since the epoch): the modification time it
    /// stamps on a probe object. Retention is measured in the time the store
    /// stamps on files, so a host whose clock is off cannot make vacuum delete
    /// a file early.
    pub fn storage_now(&self) -> Result<i64, LakeError> {
        let (store, root) = self.storage.object_store()?;
        let base = object_store::path::Path::from_url_path(root.path())
            .map_err(|e| LakeError::Config(format!("lake root {root}: {e}")))?;
        let probe = base.clone().join(STATE_DIR).join("clock");
        let io = |e: object_store::Error| LakeError::Io {
            context: "probing the storage's clock".into(),
            detail: e.to_string(),
        };
        use object_store::ObjectStoreExt as _;
        self.block_on(async {
            store.put(&probe, bytes::Bytes::new().into()).await.map_err(io)?;
            let meta = store.head(&probe).await.map_err(io)?;
            Ok(meta.last_modified.timestamp_millis())
        })
    }

    /// Deletes files no snapshot newer than `retention` needs: those removed
    /// by compaction, and those no commit ever named (a crashed writer's),
    /// once unreferenced for at least `retention` by the storage's clock.
    /// Keep `retention` above the longest a writer takes from creating a file
    /// to committing it (seconds) and the longest a reader holds an old
    /// snapshot (a training job).
    pub fn vacuum(&mut self, retention: std::time::Duration) -> Result<VacuumReport, LakeError> {
        // The files of every commit up to now are kept: vacuum treats files
        // its snapshot does not name as untracked.
        self.refresh()?;
        // "At least": ages are in whole milliseconds and Delta deletes only older ones.
        let now = StorageClock(self.storage_now()? + 1);
        let period = chrono::Duration::milliseconds(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let builder = self
            .table
            .clone()
            .vacuum()
            .with_retention_period(period)
            .with_enforce_retention_duration(false)
            .with_clock(Arc::new(now))
            .with_mode(deltalake_core::operations::vacuum::VacuumMode::Full);
        let runtime = self.runtime.clone();
        let (table, metrics) = runtime.block_on(builder.into_future()).map_err(LakeError::delta("vacuuming"))?;
        self.table = table;
        Ok(VacuumReport { deleted: metrics.files_deleted.len() })
    }

    /// Writes a checkpoint of the loaded version (Delta also writes one every
    /// `delta.checkpointInterval` commits on its own): opening the table then
    /// reads one Parquet file instead of every JSON commit.
    pub fn checkpoint(&self) -> Result<(), LakeError> {
        self.block_on(deltalake_core::checkpoints::create_checkpoint(&self.table, None))
            .map_err(LakeError::delta("writing a checkpoint"))
    }
}

/// Vacuum's "now", read from the storage.
#[derive(Debug)]
struct StorageClock(i64);

impl deltalake_core::operations::vacuum::Clock for StorageClock {
    fn current_timestamp_millis(&self) -> i64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet::RewardSchemas;
    use crate::store::{LocalStore, open_storage};

    #[test]
    fn partition_values_cannot_escape_the_lake() {
        for bad in ["", "../etc", "a/b", "A", "acme corp", "..", "tenant=x", "é", &"x".repeat(65), "a\0b"] {
            assert!(validate_partition_value("tenant", bad).is_err(), "{bad:?} accepted");
            assert!(partition_dir(bad, 0).is_err());
        }
        for good in ["acme", "acme-editor_2", "0", &"x".repeat(64)] {
            validate_partition_value("tenant", good).unwrap();
        }
    }

    #[test]
    fn dates_and_hours_are_utc_calendar_values() {
        // 2026-11-23T09:00:00Z and neighbours, checked against `date -u`.
        assert_eq!(
            partition_dir("acme", 1_795_424_400_000).unwrap(),
            PathBuf::from("rewards/tenant=acme/date=2026-11-23/hour=09")
        );
        assert_eq!(partition_dir("t", 0).unwrap(), PathBuf::from("rewards/tenant=t/date=1970-01-01/hour=00"));
        assert_eq!(partition_dir("t", -1).unwrap(), PathBuf::from("rewards/tenant=t/date=1969-12-31/hour=23"));
        // Leap day 2028-02-29T23:59:59.999Z.
        assert_eq!(
            partition_dir("t", 1_835_481_599_999).unwrap(),
            PathBuf::from("rewards/tenant=t/date=2028-02-29/hour=23")
        );
        let values = partition_values("rewards/tenant=acme/date=2026-11-23/hour=09/x.parquet").unwrap();
        assert_eq!(values["hour"].as_deref(), Some("9"));
        assert_eq!(values["date"].as_deref(), Some("2026-11-23"));
        assert_eq!(
            partition_values("rewards/tenant=t/date=1970-01-01/hour=00/x").unwrap()["hour"].as_deref(),
            Some("0")
        );
        assert!(partition_values("rewards/x.parquet").is_err());
    }

    #[test]
    fn new_columns_are_added_at_the_top_and_inside_structs() {
        let file = RewardSchemas::released().unwrap().file_schema().unwrap();
        let current = table_schema(&file).unwrap();
        assert_eq!(evolved(&current, &current).unwrap(), None, "nothing new");
        let mut fields: Vec<Field> = file.fields().iter().map(|f| f.as_ref().clone()).collect();
        for f in &mut fields {
            if let DataType::Struct(inner) = f.data_type() {
                let mut inner: Vec<Field> = inner.iter().map(|x| x.as_ref().clone()).collect();
                inner.push(Field::new("added_inside", DataType::Int64, true));
                *f = Field::new(f.name(), DataType::Struct(inner.into()), f.is_nullable());
            }
        }
        fields.push(Field::new("added_on_top", DataType::Utf8, true));
        let wanted = table_schema(&Schema::new(fields)).unwrap();
        let next = evolved(&current, &wanted).unwrap().expect("columns were added");
        assert!(next.field("added_on_top").is_some_and(|f| f.is_nullable()));
        for name in ["components", "signals", "lineage"] {
            let Some(DeltaType::Struct(inner)) = next.field(name).map(StructField::data_type) else {
                panic!("{name} is a struct")
            };
            assert!(inner.field("added_inside").is_some(), "{name} gained the nested column");
        }
        let names = |t: &StructType| t.fields().map(|f| f.name().clone()).collect::<Vec<_>>();
        assert_eq!(names(&next)[..names(&current).len()], names(&current)[..], "existing columns keep their order");
        assert_eq!(evolved(&next, &wanted).unwrap(), None, "applied once");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    fn open(storage: &Arc<dyn Storage>, rt: &tokio::runtime::Runtime) -> Lake {
        let schema = RewardSchemas::released().unwrap().file_schema().unwrap();
        Lake::create_or_open(storage.clone(), rt.handle().clone(), &schema).unwrap()
    }

    fn pc(
        partition: i32,
        previous: Option<i64>,
        range: (i64, i64),
        files: Vec<NewFile>,
        committed_at: i64,
    ) -> PartitionCommit<'static> {
        PartitionCommit { topic: "rewards", partition, previous, range, files, rejected: Vec::new(), committed_at }
    }

    fn new_file(first: i64, last: i64, content: &[u8]) -> NewFile {
        let dir = partition_dir("acme", 0).unwrap();
        NewFile {
            columns: Arc::new(RewardSchemas::released().unwrap().file_schema().unwrap()),
            path: format!("{}/{}", dir.display(), file_name("rewards", 1, first, last).unwrap()),
            rows: (last - first + 1) as u64,
            bytes: content.to_vec(),
            sources: [(source_key("rewards", 1), (first, last))].into(),
        }
    }

    /// Commits offsets 0-9 of rewards/1, then leaves what a crash mid-commit
    /// of 10-19 leaves: a created file no commit names.
    fn commit_then_crash_mid_commit(storage: &Arc<dyn Storage>, rt: &tokio::runtime::Runtime) -> (String, NewFile) {
        let mut lake = open(storage, rt);
        let kept = new_file(0, 9, b"ten rows");
        let kept_path = kept.path.clone();
        let rejected = Rejected {
            topic: "rewards".into(),
            partition: 1,
            offset: 3,
            reason_code: "bad".into(),
            reason: "test".into(),
            key: None,
            value: Some(vec![1, 2]),
        };
        let mut c = pc(1, None, (0, 9), vec![kept], 1);
        c.rejected.push(rejected.clone());
        let commit = lake.commit_partition(c).unwrap();
        assert_eq!(lake.commit(commit.seq).unwrap().as_ref(), Some(&commit), "the record reads back");
        assert_eq!(commit.rejected, vec![rejected]);
        let ghost = new_file(10, 19, b"x");
        storage.put_new(&ghost.path, &ghost.bytes).unwrap();
        (kept_path, ghost)
    }

    #[test]
    fn commits_survive_reopen_and_a_crashed_commit_is_invisible_then_replaced() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let (kept_path, ghost) = commit_then_crash_mid_commit(&storage, &rt);

        let mut lake = Lake::open(storage.clone(), rt.handle().clone()).unwrap();
        assert_eq!(lake.committed_offset("rewards", 1).unwrap(), Some(9));
        assert_eq!(lake.committed_offset("rewards", 2).unwrap(), None);
        let files = lake.files().unwrap();
        assert_eq!(files, vec![LiveFile { path: kept_path.clone(), rows: 10, bytes: 8 }]);
        assert!(dir.path().join(&ghost.path).exists(), "the leftover is on disk but in no snapshot");
        // The same range again commits cleanly beside the leftover (file
        // names are fresh), which stays out of every snapshot.
        let again = new_file(10, 19, b"y");
        assert_ne!(again.path, ghost.path, "names are never reused");
        let again_path = again.path.clone();
        let c = lake.commit_partition(pc(1, Some(9), (10, 19), vec![again], 2)).unwrap();
        assert_eq!(lake.committed_offset("rewards", 1).unwrap(), Some(19));
        let live: Vec<String> = lake.files().unwrap().into_iter().map(|f| f.path).collect();
        let mut want = vec![kept_path.clone(), again_path];
        want.sort();
        assert_eq!(live, want);
        assert_eq!(lake.vacuum(std::time::Duration::ZERO).unwrap().deleted, 1, "vacuum deletes the leftover");
        assert!(!dir.path().join(&ghost.path).exists());
        assert_eq!(lake.commits_of("rewards/1", None).unwrap().len(), 2);
        assert_eq!(lake.commits_of("rewards/1", Some(c.seq - 1)).unwrap(), vec![c]);
        // An older snapshot still shows one file (time travel).
        let old = Lake::open_at(storage.clone(), rt.handle().clone(), 1).unwrap();
        assert_eq!(old.files().unwrap().len(), 1);
    }

    #[test]
    fn the_table_runs_on_an_object_store_and_a_zombie_cannot_commit() {
        let rt = runtime();
        let storage = open_storage("memory://", rt.handle().clone()).unwrap();
        let (kept_path, _) = commit_then_crash_mid_commit(&storage, &rt);
        let mut lake = Lake::open(storage.clone(), rt.handle().clone()).unwrap();
        assert_eq!(lake.files().unwrap().iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), vec![kept_path.as_str()]);
        let mut zombie = Lake::open(storage.clone(), rt.handle().clone()).unwrap();
        lake.commit_partition(pc(1, Some(9), (10, 19), vec![new_file(10, 19, b"y")], 2)).unwrap();
        let err = zombie.commit_partition(pc(1, Some(9), (10, 12), Vec::new(), 3));
        assert!(matches!(err, Err(LakeError::Conflict(_))), "{err:?}");
        // Other partitions and the next version are fine.
        zombie.commit_partition(pc(2, None, (0, 0), Vec::new(), 4)).unwrap();
        lake.refresh().unwrap();
        assert_eq!(lake.committed_offset("rewards", 1).unwrap(), Some(19));
        assert_eq!(lake.committed_offset("rewards", 2).unwrap(), Some(0));
    }

    /// The window the pre-check cannot close: a writer that checked the
    /// partition's `txn` just before another writer committed it. Delta's
    /// conflict check, on commits built the way `commit_actions` builds them,
    /// refuses it; another partition on the same stale snapshot goes through.
    #[test]
    fn delta_refuses_a_commit_racing_another_on_the_same_partition() {
        let rt = runtime();
        let storage = open_storage("memory://", rt.handle().clone()).unwrap();
        let mut winner = open(&storage, &rt);
        let stale = Lake::open(storage.clone(), rt.handle().clone()).unwrap();
        winner.commit_partition(pc(1, None, (0, 9), Vec::new(), 1)).unwrap();
        let commit_on_stale = |partition: i32| {
            let txn = Transaction::new(app_id("rewards", partition), 4);
            let props = CommitProperties::default().with_application_transactions(vec![txn]);
            let snapshot = stale.table.snapshot().unwrap();
            let operation = DeltaOperation::Write { mode: SaveMode::Append, partition_by: None, predicate: None };
            let commit = CommitBuilder::from(props).build(Some(snapshot), stale.table.log_store(), operation);
            rt.block_on(commit.into_future())
        };
        let err = commit_on_stale(1).expect_err("the racing commit must be refused");
        assert!(matches!(is_conflict(&err), Some(CommitConflictError::ConcurrentTransaction)), "{err}");
        commit_on_stale(2).unwrap();
        winner.refresh().unwrap();
        assert_eq!(winner.committed_offset("rewards", 1).unwrap(), Some(9), "the winner's offset stands");
        assert_eq!(winner.committed_offset("rewards", 2).unwrap(), Some(4));
    }

    #[test]
    fn replacing_files_is_one_commit_and_vacuum_deletes_the_old_bytes_and_leftovers() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let mut lake = open(&storage, &rt);
        let (one, two) = (new_file(0, 4, b"1"), new_file(5, 9, b"2"));
        let old = vec![one.path.clone(), two.path.clone()];
        lake.commit_partition(pc(1, None, (0, 9), vec![one, two], 1)).unwrap();
        let ghost = new_file(10, 19, b"x");
        storage.put_new(&ghost.path, &ghost.bytes).unwrap();
        let mut merged = new_file(0, 9, b"12");
        merged.path = merged.path.replace("rewards-1-", "compacted-");
        let inputs = lake.files().unwrap();
        let c = lake.commit_replace(vec![merged], inputs.clone(), 2, "test").unwrap();
        assert_eq!(c.removed, old);
        assert_eq!(lake.files().unwrap().len(), 1);
        // A long retention keeps everything (older snapshots still read it).
        assert_eq!(lake.vacuum(std::time::Duration::from_secs(7 * 24 * 3600)).unwrap().deleted, 0);
        assert_eq!(lake.vacuum(std::time::Duration::ZERO).unwrap().deleted, 3);
        assert!(old.iter().chain([&ghost.path]).all(|p| !dir.path().join(p).exists()));
        assert_eq!(lake.files().unwrap().len(), 1, "the merged file stays");
        let again = lake.commit_replace(Vec::new(), inputs, 3, "test");
        assert!(matches!(again, Err(LakeError::Conflict(_))), "cannot remove twice");
        lake.checkpoint().unwrap();
        let reopened = Lake::open(storage, rt.handle().clone()).unwrap();
        assert_eq!(reopened.files().unwrap(), lake.files().unwrap());
        assert_eq!(reopened.committed_offset("rewards", 1).unwrap(), Some(9), "txn survives a checkpoint");
    }
}
