//! From raw buffered records of one source partition to the files, rejected
//! records and manifests of one commit. Pure: no Kafka, no storage, so the
//! same input always yields the same files.
//!
//! Rows are decoded once, by `arrow-avro`, straight into columns; routing,
//! replay detection and statistics then work on those columns.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::BuildHasher as _;
use std::time::Instant;

use arrow_array::cast::AsArray as _;
use arrow_array::types::{Int32Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch, StringArray, UInt32Array};
use flywheel_core::codec::{Codec, HEADER_LEN, MAGIC, RecordKind};
use flywheel_core::records::{OffsetRange, ShardManifest, ShardStats, ShardVersionStats};

use crate::LakeError;
use crate::parquet::{ParquetSettings, RewardBatcher, RewardSchemas, write_parquet};
use crate::table::{NewFile, Rejected, file_name, partition_dir, source_key, validate_partition_value};

/// Raw records of one source partition waiting for the next commit, kept
/// as their bytes (one allocation per buffer, not per record).
#[derive(Debug, Default)]
pub struct RowBuffer {
    values: Vec<u8>,
    value_ends: Vec<usize>,
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    offsets: Vec<i64>,
    timestamps: Vec<i64>,
    /// When the first record of this buffer arrived.
    pub first_at: Option<Instant>,
    /// When the last record arrived.
    pub last_at: Option<Instant>,
}

impl RowBuffer {
    /// Adds a record read at `offset`, with its Kafka timestamp (ms).
    pub fn push(&mut self, key: Option<&[u8]>, value: Option<&[u8]>, offset: i64, timestamp: i64) {
        self.values.extend_from_slice(value.unwrap_or_default());
        self.value_ends.push(self.values.len());
        self.keys.extend_from_slice(key.unwrap_or_default());
        self.key_ends.push(self.keys.len());
        self.offsets.push(offset);
        self.timestamps.push(timestamp);
        let now = Instant::now();
        self.first_at.get_or_insert(now);
        self.last_at = Some(now);
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Bytes held (keys and values).
    pub fn bytes(&self) -> usize {
        self.values.len() + self.keys.len()
    }

    /// Offsets of the first and last record.
    pub fn range(&self) -> Option<(i64, i64)> {
        Some((*self.offsets.first()?, *self.offsets.last()?))
    }

    /// Kafka timestamps of the records (ms).
    pub fn timestamps(&self) -> &[i64] {
        &self.timestamps
    }

    fn value(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.value_ends[i - 1] };
        &self.values[start..self.value_ends[i]]
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] };
        &self.keys[start..self.key_ends[i]]
    }
}

/// 128-bit fingerprints of the reward ids last written from one source
/// partition, oldest evicted first: a replay of any of them is dropped.
#[derive(Debug)]
pub struct RecentIds {
    order: VecDeque<u128>,
    set: HashSet<u128, foldhash::fast::FixedState>,
    capacity: usize,
}

/// The fingerprint of a reward id.
pub fn id_fingerprint(reward_id: &str) -> u128 {
    let a = foldhash::quality::FixedState::with_seed(0x5eed_0001).hash_one(reward_id);
    let b = foldhash::quality::FixedState::with_seed(0x5eed_0002).hash_one(reward_id);
    (u128::from(a) << 64) | u128::from(b)
}

impl RecentIds {
    /// Remembers up to `capacity` ids.
    pub fn new(capacity: usize) -> RecentIds {
        RecentIds { order: VecDeque::new(), set: HashSet::default(), capacity }
    }

    /// Whether `id` was written recently.
    pub fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    /// Remembers `id`, forgetting the oldest beyond capacity.
    pub fn insert(&mut self, id: u128) {
        if self.capacity == 0 || !self.set.insert(id) {
            return;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// A file of a commit and the manifest announcing it (commit fields filled
/// in once committed).
#[derive(Debug)]
pub struct PreparedFile {
    /// The file.
    pub file: NewFile,
    /// Its manifest.
    pub manifest: ShardManifest,
}

/// What one flush of a source partition commits.
#[derive(Debug, Default)]
pub struct Prepared {
    /// One file per (tenant, hour, reward function version).
    pub files: Vec<PreparedFile>,
    /// Records rejected, with reasons.
    pub rejected: Vec<Rejected>,
    /// Rows dropped as replays of rows already written.
    pub replays: u64,
    /// Fingerprints of the ids written.
    pub written: Vec<u128>,
}

/// Where a flush's output goes.
#[derive(Debug, Clone)]
pub struct ShardContext<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Lake root URL, for manifests.
    pub lake_url: &'a str,
    /// Parquet settings.
    pub settings: &'a ParquetSettings,
    /// Reward schemas.
    pub schemas: &'a RewardSchemas,
}

/// Shown times a row may have (ms): 1970-01-01 to 9999-12-31 UTC. The date
/// becomes a Delta `date` partition value, which readers parse as a
/// four-digit year; a negative time is a client clock bug, not a reward.
pub const SHOWN_TIME_RANGE: std::ops::Range<i64> = 0..253_402_300_800_000;

/// Decodes, routes, de-duplicates and encodes a buffer.
pub fn prepare(ctx: &ShardContext<'_>, buf: &RowBuffer, recent: &RecentIds) -> Result<Prepared, LakeError> {
    let mut out = Prepared::default();
    let reject = |i: usize, code: &str, reason: String| Rejected {
        topic: ctx.topic.to_string(),
        partition: ctx.partition,
        offset: buf.offsets[i],
        reason_code: code.to_string(),
        reason,
        key: Some(buf.key(i).to_vec()).filter(|k| !k.is_empty()),
        value: Some(buf.value(i).to_vec()).filter(|v| !v.is_empty()),
    };
    // Header check first: a record of another kind or an unknown schema
    // never reaches the columnar decoder.
    let codec = Codec::global();
    // A handful of released versions: a scan beats hashing.
    let known: Vec<[u8; 8]> = ctx.schemas.writers.iter().map(|(f, _)| *f).collect();
    let mut candidates = Vec::with_capacity(buf.len());
    for i in 0..buf.len() {
        let value = buf.value(i);
        let header_ok = value.len() >= HEADER_LEN && value[..2] == MAGIC;
        if header_ok && value[2..HEADER_LEN].try_into().is_ok_and(|f: [u8; 8]| known.contains(&f)) {
            candidates.push(i);
            continue;
        }
        match codec.identify(value) {
            Ok((kind, _)) => {
                let why = if kind == RecordKind::Reward {
                    "a reward schema this writer was not built with".to_string()
                } else {
                    format!("a {kind} record on the rewards topic")
                };
                let code = if kind == RecordKind::Reward { "unknown_schema" } else { "wrong_record_kind" };
                out.rejected.push(reject(i, code, why));
            }
            Err(e) => out.rejected.push(reject(i, e.reason_code(), e.to_string())),
        }
    }
    let (batch, rows) = match decode(ctx, buf, &candidates) {
        Ok(decoded) => decoded,
        Err(_) => {
            // A malformed body: find it with the row-by-row decoder, then
            // decode the rest.
            let mut valid = Vec::new();
            for i in candidates {
                match codec.decode::<flywheel_core::records::Reward>(buf.value(i)) {
                    Ok(_) => valid.push(i),
                    Err(e) => out.rejected.push(reject(i, e.reason_code(), e.to_string())),
                }
            }
            decode(ctx, buf, &valid)?
        }
    };
    let Some(batch) = batch else {
        out.rejected.sort_by_key(|r| r.offset);
        return Ok(out);
    };
    let ids = string_column(&batch, "reward_id")?;
    let tenants = string_column(&batch, "tenant")?;
    let versions = string_column(&batch, "reward_fn_version")?;
    let shown = batch
        .column_by_name("shown_time")
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        .ok_or_else(|| LakeError::Config("shown_time is not a millisecond timestamp column".into()))?;
    let mut groups: HashMap<(&str, i64, &str), Vec<u32>, foldhash::fast::FixedState> = HashMap::default();
    let mut in_batch: HashSet<u128, foldhash::fast::FixedState> = HashSet::default();
    for (j, &i) in rows.iter().enumerate() {
        let id = id_fingerprint(ids.value(j));
        if recent.contains(id) || !in_batch.insert(id) {
            out.replays += 1;
            continue;
        }
        let tenant = tenants.value(j);
        if let Err(e) = validate_partition_value("tenant", tenant) {
            in_batch.remove(&id);
            out.rejected.push(reject(i, "invalid_tenant", e.to_string()));
            continue;
        }
        if !SHOWN_TIME_RANGE.contains(&shown.value(j)) {
            in_batch.remove(&id);
            let why = format!("shown_time {} ms is outside years 1970-9999: it cannot name a date", shown.value(j));
            out.rejected.push(reject(i, "invalid_shown_time", why));
            continue;
        }
        out.written.push(id);
        let hour = shown.value(j).div_euclid(3_600_000);
        groups.entry((tenant, hour, versions.value(j))).or_default().push(j as u32);
    }
    // Files in key order, so the same buffer always yields the same commit.
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for ((tenant, hour, version), indices) in groups {
        // The common case, every row in one directory, needs no copy.
        let part = if indices.len() == batch.num_rows() {
            batch.clone()
        } else {
            arrow_select::take::take_record_batch(&batch, &UInt32Array::from(indices))
                .map_err(LakeError::arrow("splitting rows by partition"))?
        };
        out.files.push(encode_file(ctx, part, tenant, hour, version)?);
    }
    out.rejected.sort_by_key(|r| r.offset);
    Ok(out)
}

/// Decodes the buffer rows `which` into one batch; returns it with the
/// buffer index of each of its rows.
fn decode(
    ctx: &ShardContext<'_>,
    buf: &RowBuffer,
    which: &[usize],
) -> Result<(Option<RecordBatch>, Vec<usize>), LakeError> {
    let mut batcher = RewardBatcher::with_schemas(ctx.schemas, which.len().max(1))?;
    // Records written before fingerprints followed the specification carry
    // the legacy one; the Arrow decoder ends its batch at every fingerprint
    // change, so they are given the specification's header first (same
    // schema, same datum bytes).
    let codec = Codec::global();
    let legacy = |i: usize| {
        let value = buf.value(i);
        codec.spec_fingerprint(value).is_ok_and(|f| value.get(2..HEADER_LEN) != Some(&f[..]))
    };
    if which.len() == buf.len() && !which.iter().any(|&i| legacy(i)) {
        batcher.push_all(&buf.values, ctx.partition, &buf.offsets)?;
    } else {
        for &i in which {
            if legacy(i) {
                let mut value = buf.value(i).to_vec();
                let spec = codec.spec_fingerprint(&value)?;
                value[2..HEADER_LEN].copy_from_slice(&spec);
                batcher.push(&value, ctx.partition, buf.offsets[i])?;
            } else {
                batcher.push(buf.value(i), ctx.partition, buf.offsets[i])?;
            }
        }
    }
    let batch = batcher.take()?;
    // The decoder must have produced exactly one row per record.
    if batch.as_ref().map_or(0, RecordBatch::num_rows) != which.len() {
        return Err(LakeError::Config("decoded row count differs from the records given".into()));
    }
    Ok((batch, which.to_vec()))
}

fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray, LakeError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| LakeError::Config(format!("reward column {name} is missing or not a string")))
}

fn encode_file(
    ctx: &ShardContext<'_>,
    batch: RecordBatch,
    tenant: &str,
    hour: i64,
    version: &str,
) -> Result<PreparedFile, LakeError> {
    let offsets = batch
        .column_by_name(crate::parquet::SOURCE_OFFSET_COLUMN)
        .and_then(|c| c.as_primitive_opt::<arrow_array::types::Int64Type>())
        .ok_or_else(|| LakeError::Config("source offset column missing".into()))?;
    let first = (0..offsets.len()).map(|i| offsets.value(i)).min().unwrap_or_default();
    let last = (0..offsets.len()).map(|i| offsets.value(i)).max().unwrap_or_default();
    let name = file_name(ctx.topic, ctx.partition, first, last)?;
    let dir = partition_dir(tenant, hour * 3_600_000)?;
    let path = format!("{}/{name}", dir.to_string_lossy().replace('\\', "/"));
    let (stats, versions, min_time, max_time) = shard_stats(&batch)?;
    let rows = batch.num_rows() as u64;
    let columns = batch.schema();
    let mut bytes = Vec::new();
    write_parquet(std::slice::from_ref(&batch), ctx.settings, &mut bytes)?;
    let manifest = ShardManifest {
        shard_id: name.trim_end_matches(".parquet").to_string(),
        tenant: tenant.to_string(),
        uri: path.clone(),
        lake_root: ctx.lake_url.to_string(),
        rows: rows as i64,
        bytes: bytes.len() as i64,
        content_sha256: String::new(),
        min_event_time: min_time,
        max_event_time: max_time,
        source: OffsetRange {
            topic: ctx.topic.to_string(),
            partition: ctx.partition,
            first_offset: first,
            last_offset: last,
        },
        stats,
        reward_fn_version: version.to_string(),
        versions,
        commit_seq: -1,
        committed_at: 0,
    };
    let sources = [(source_key(ctx.topic, ctx.partition), (first, last))].into();
    let file = NewFile { path, rows, bytes, sources, columns };
    Ok(PreparedFile { file, manifest })
}

#[derive(Default)]
struct VersionAcc<'a> {
    stats: ShardVersionStats,
    users: HashMap<&'a str, i64, foldhash::fast::FixedState>,
}

/// Statistics of a batch of lake rows: totals, per model version, and the
/// shown-time range. Works on rows read back from Parquet as well, so a
/// manifest can be rebuilt from its file.
pub fn shard_stats(batch: &RecordBatch) -> Result<(ShardStats, Vec<ShardVersionStats>, i64, i64), LakeError> {
    let users = string_column(batch, "user_id")?;
    let models = string_column(batch, "model_id")?;
    let adapters = string_column(batch, "adapter_version")?;
    let reward = batch
        .column_by_name("reward")
        .and_then(|c| c.as_primitive_opt::<arrow_array::types::Float64Type>())
        .ok_or_else(|| LakeError::Config("reward column missing".into()))?;
    let shown = batch
        .column_by_name("shown_time")
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        .ok_or_else(|| LakeError::Config("shown_time column missing".into()))?;
    let outcome = batch
        .column_by_name("outcome")
        .and_then(|c| c.as_dictionary_opt::<Int32Type>())
        .ok_or_else(|| LakeError::Config("outcome is not a dictionary column".into()))?;
    let symbols = outcome.values().as_string_opt::<i32>().ok_or_else(|| LakeError::Config("outcome symbols".into()))?;
    let rating = batch
        .column_by_name("signals")
        .and_then(|c| c.as_struct_opt())
        .and_then(|s| s.column_by_name("rating"))
        .and_then(|c| c.as_primitive_opt::<arrow_array::types::Float64Type>())
        .ok_or_else(|| LakeError::Config("signals.rating column missing".into()))?;
    let mut total = ShardStats::default();
    // Keys borrowed from the columns: no allocation per row.
    let mut all_users: HashMap<&str, i64, foldhash::fast::FixedState> = HashMap::default();
    let mut per: HashMap<(&str, Option<&str>), VersionAcc<'_>, foldhash::fast::FixedState> = HashMap::default();
    let (mut min_t, mut max_t) = (i64::MAX, i64::MIN);
    for i in 0..batch.num_rows() {
        let o = symbols.value(outcome.keys().value(i) as usize);
        let r = reward.value(i);
        let user = users.value(i);
        let adapter = (!adapters.is_null(i)).then(|| adapters.value(i));
        let acc = per.entry((models.value(i), adapter)).or_default();
        acc.stats.rows += 1;
        acc.stats.reward_sum += r;
        acc.stats.reward_sum_sq += r * r;
        *acc.users.entry(user).or_default() += 1;
        *all_users.entry(user).or_default() += 1;
        total.reward_sum += r;
        total.reward_sum_sq += r * r;
        match o {
            "ACCEPTED" => (acc.stats.accepted += 1, total.accepted += 1),
            "REJECTED" => (acc.stats.rejected += 1, total.rejected += 1),
            "DISMISSED" => (acc.stats.dismissed += 1, total.dismissed += 1),
            _ => (acc.stats.ignored += 1, total.ignored += 1),
        };
        if !rating.is_null(i) {
            total.rated += 1;
            let v = rating.value(i);
            if (o == "ACCEPTED" && v < 0.0) || ((o == "REJECTED" || o == "DISMISSED") && v > 0.0) {
                total.rating_outcome_disagreements += 1;
            }
        }
        min_t = min_t.min(shown.value(i));
        max_t = max_t.max(shown.value(i));
    }
    total.user_rows = all_users.into_iter().map(|(u, n)| (u.to_string(), n)).collect();
    let mut versions: Vec<ShardVersionStats> = per
        .into_iter()
        .map(|((model_id, adapter_version), acc)| ShardVersionStats {
            model_id: model_id.to_string(),
            adapter_version: adapter_version.map(str::to_string),
            distinct_users: acc.users.len() as i64,
            max_user_rows: acc.users.values().copied().max().unwrap_or(0),
            ..acc.stats
        })
        .collect();
    versions.sort_by(|a, b| (&a.model_id, &a.adapter_version).cmp(&(&b.model_id, &b.adapter_version)));
    Ok((total, versions, min_t, max_t))
}

/// Reads the reward ids of `partition` from a lake file's bytes, newest
/// offset first (to refill [`RecentIds`] after a restart).
pub fn ids_in_file(bytes: Vec<u8>, partition: i32) -> Result<Vec<(i64, u128)>, LakeError> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(LakeError::parquet("opening a lake file"))?;
    let names = ["reward_id", crate::parquet::SOURCE_PARTITION_COLUMN, crate::parquet::SOURCE_OFFSET_COLUMN];
    let mask = ProjectionMask::columns(builder.parquet_schema(), names);
    let reader = builder.with_projection(mask).build().map_err(LakeError::parquet("reading a lake file"))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(LakeError::arrow("reading a lake file"))?;
        let ids = string_column(&batch, "reward_id")?;
        let parts = batch
            .column_by_name(names[1])
            .and_then(|c| c.as_primitive_opt::<Int32Type>())
            .ok_or_else(|| LakeError::Config("source partition column missing".into()))?;
        let offs = batch
            .column_by_name(names[2])
            .and_then(|c| c.as_primitive_opt::<arrow_array::types::Int64Type>())
            .ok_or_else(|| LakeError::Config("source offset column missing".into()))?;
        for i in 0..batch.num_rows() {
            if parts.value(i) == partition {
                out.push((offs.value(i), id_fingerprint(ids.value(i))));
            }
        }
    }
    out.sort_by_key(|(offset, _)| std::cmp::Reverse(*offset));
    Ok(out)
}

/// Reads a whole lake file into batches.
pub fn read_file(bytes: Vec<u8>) -> Result<Vec<RecordBatch>, LakeError> {
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(LakeError::parquet("opening a lake file"))?
        .build()
        .map_err(LakeError::parquet("reading a lake file"))?;
    reader.map(|b| b.map_err(LakeError::arrow("reading a lake file"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::codec::encode;
    use flywheel_core::records::Reward;

    fn reward(i: i64) -> Reward {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures/reward.accepted.json");
        let mut r: Reward = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        r.reward_id = format!("r{i}");
        r.user_id = format!("u{}", i % 3);
        r.adapter_version = (i % 2 == 1).then(|| "a1".to_string());
        r.reward = i as f64;
        r
    }

    #[test]
    fn replays_are_dropped_and_statistics_count_what_was_written() {
        let mut buf = RowBuffer::default();
        // r0..r5, then r2 again (a replay in the same buffer) and r9 (remembered from before).
        for (o, i) in [0, 1, 2, 3, 4, 5, 2, 9].into_iter().enumerate() {
            buf.push(None, Some(&encode(&reward(i)).unwrap()), o as i64, 0);
        }
        let mut recent = RecentIds::new(10);
        recent.insert(id_fingerprint("r9"));
        let (settings, schemas) = (ParquetSettings::default(), RewardSchemas::released().unwrap());
        let ctx = ShardContext {
            topic: "rewards",
            partition: 0,
            lake_url: "memory://",
            settings: &settings,
            schemas: &schemas,
        };
        let out = prepare(&ctx, &buf, &recent).unwrap();
        assert_eq!(out.replays, 2);
        assert_eq!(out.written.len(), 6);
        assert_eq!(out.files.len(), 1, "one tenant, one hour, one reward function");
        let m = &out.files[0].manifest;
        assert_eq!((m.rows, m.source.first_offset, m.source.last_offset), (6, 0, 5));
        assert_eq!(m.stats.reward_sum, (0..6).sum::<i64>() as f64);
        assert_eq!(m.stats.user_rows, [("u0".to_string(), 2), ("u1".into(), 2), ("u2".into(), 2)].into());
        let base = m.versions.iter().find(|v| v.adapter_version.is_none()).unwrap();
        assert_eq!((base.rows, base.reward_sum, base.distinct_users, base.max_user_rows), (3, 6.0, 3, 1));
        // A buffer that mixes records under the legacy fingerprint (written
        // by earlier releases) with current ones decodes whole.
        let mut mixed = RowBuffer::default();
        for (o, i) in [0, 1, 2].into_iter().enumerate() {
            let mut bytes = encode(&reward(i)).unwrap();
            if i != 1 {
                let schema = Codec::global().schema(RecordKind::Reward);
                bytes[2..HEADER_LEN].copy_from_slice(&flywheel_core::codec::legacy_fingerprint(schema));
            }
            mixed.push(None, Some(&bytes), o as i64, 0);
        }
        let out = prepare(&ctx, &mixed, &RecentIds::new(10)).unwrap();
        assert_eq!((out.written.len(), out.rejected.len(), out.files[0].manifest.rows), (3, 0, 3));
        // Capacity bounds what is remembered, oldest first out.
        let mut small = RecentIds::new(2);
        for id in [1, 2, 3] {
            small.insert(id);
        }
        assert!(!small.contains(1) && small.contains(2) && small.contains(3));
    }
}
