//! Reward records → Arrow → Parquet.
//!
//! Columns come from the reward Avro schema itself: `arrow-avro` decodes the
//! single-object encoded records, resolving every released writer version
//! against the current reader schema, so a field added to `reward.avsc`
//! becomes a nullable column with no code change here. Nested records
//! (`components`, `signals`, `lineage`) stay struct columns; the enum
//! `outcome` is a dictionary column. Two columns are appended: the rewards
//! topic partition and offset each row came from, so a reader can check
//! exactly-once delivery.

use std::sync::Arc;

use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, SchemaStore};
use arrow_schema::{DataType, Field, Schema};
use flywheel_core::codec::{RecordKind, released_schemas};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

use crate::LakeError;

/// Column holding the rewards-topic partition a row was read from.
pub const SOURCE_PARTITION_COLUMN: &str = "_source_partition";
/// Column holding the rewards-topic offset a row was read from.
pub const SOURCE_OFFSET_COLUMN: &str = "_source_offset";

/// Parquet writer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetSettings {
    /// Rows per row group.
    pub row_group_rows: usize,
    /// zstd level (1–22).
    pub zstd_level: i32,
}

impl Default for ParquetSettings {
    fn default() -> Self {
        ParquetSettings { row_group_rows: 128 * 1024, zstd_level: 3 }
    }
}

impl ParquetSettings {
    fn properties(&self) -> Result<WriterProperties, LakeError> {
        let level = ZstdLevel::try_new(self.zstd_level).map_err(|e| LakeError::Config(e.to_string()))?;
        Ok(WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_dictionary_enabled(true)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(self.row_group_rows.max(1)))
            .set_created_by(format!("flywheel-lake-writer {}", env!("CARGO_PKG_VERSION")))
            .build())
    }
}

/// Accumulates encoded reward records (with their source position) and turns
/// them into one Arrow record batch.
#[derive(Debug)]
pub struct RewardBatcher {
    decoder: Decoder,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    batch_rows: usize,
}

/// The reward schemas a batcher decodes with.
#[derive(Debug, Clone)]
pub struct RewardSchemas {
    /// Writer schemas by the 8-byte fingerprint in each record's header.
    pub writers: Vec<([u8; 8], String)>,
    /// The schema whose columns the batches have.
    pub reader: String,
}

impl RewardSchemas {
    /// The columns of lake files of these schemas.
    pub fn file_schema(&self) -> Result<Schema, LakeError> {
        Ok(RewardBatcher::with_schemas(self, 1)?.file_schema())
    }

    /// Every released reward schema, read as the current one.
    pub fn released() -> Result<RewardSchemas, LakeError> {
        Ok(RewardSchemas {
            writers: released_schemas(RecordKind::Reward)?.into_iter().map(|(f, t)| (f, t.to_string())).collect(),
            reader: RecordKind::Reward.current_schema().to_string(),
        })
    }
}

fn decoder(schemas: &RewardSchemas, batch_rows: usize) -> Result<Decoder, LakeError> {
    // Fingerprints as our codec writes them: arrow-avro's own canonical-form
    // fingerprint of the same schema text differs, so it is not recomputed.
    let mut store = SchemaStore::new();
    for (fingerprint, text) in &schemas.writers {
        store
            .set(Fingerprint::Rabin(u64::from_le_bytes(*fingerprint)), AvroSchema::new(text.clone()))
            .map_err(LakeError::arrow("registering a reward schema"))?;
    }
    ReaderBuilder::new()
        .with_writer_schema_store(store)
        .with_reader_schema(AvroSchema::new(schemas.reader.clone()))
        .with_batch_size(batch_rows.max(1))
        .build_decoder()
        .map_err(LakeError::arrow("building the reward decoder"))
}

impl RewardBatcher {
    /// A batcher holding at most `batch_rows` rows of the released schemas.
    pub fn new(batch_rows: usize) -> Result<Self, LakeError> {
        Self::with_schemas(&RewardSchemas::released()?, batch_rows)
    }

    /// A batcher for explicit schemas (a reader ahead of the released ones).
    pub fn with_schemas(schemas: &RewardSchemas, batch_rows: usize) -> Result<Self, LakeError> {
        Ok(RewardBatcher {
            decoder: decoder(schemas, batch_rows)?,
            partitions: Vec::new(),
            offsets: Vec::new(),
            batch_rows,
        })
    }

    /// The columns of the batches (and files) this batcher makes.
    pub fn file_schema(&self) -> Schema {
        extend(self.decoder.schema().as_ref())
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Adds one single-object encoded reward read at `partition`/`offset`.
    pub fn push(&mut self, bytes: &[u8], partition: i32, offset: i64) -> Result<(), LakeError> {
        self.push_all(bytes, partition, &[offset])
    }

    /// Adds records laid end to end in `bytes` (read at `partition`, one
    /// offset each), in one decoder call: cheaper than one call per record.
    pub fn push_all(&mut self, bytes: &[u8], partition: i32, offsets: &[i64]) -> Result<(), LakeError> {
        if self.offsets.len() + offsets.len() > self.batch_rows {
            return Err(LakeError::Config(format!("batch of {} rows is full", self.batch_rows)));
        }
        let consumed = self.decoder.decode(bytes).map_err(LakeError::avro("decoding rewards"))?;
        if consumed != bytes.len() {
            return Err(LakeError::Integrity(format!(
                "decoding rewards: {consumed} of {} bytes consumed",
                bytes.len()
            )));
        }
        self.partitions.extend(std::iter::repeat_n(partition, offsets.len()));
        self.offsets.extend_from_slice(offsets);
        Ok(())
    }

    /// The rows so far as one batch (with the source columns), leaving the
    /// batcher empty.
    pub fn take(&mut self) -> Result<Option<RecordBatch>, LakeError> {
        let Some(batch) = self.decoder.flush().map_err(LakeError::avro("finishing a reward batch"))? else {
            return Ok(None);
        };
        let partitions = Int32Array::from(std::mem::take(&mut self.partitions));
        let offsets = Int64Array::from(std::mem::take(&mut self.offsets));
        with_source_columns(batch, partitions, offsets).map(Some)
    }
}

fn extend(reward: &Schema) -> Schema {
    let mut fields: Vec<Arc<Field>> = reward.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(SOURCE_PARTITION_COLUMN, DataType::Int32, false)));
    fields.push(Arc::new(Field::new(SOURCE_OFFSET_COLUMN, DataType::Int64, false)));
    Schema::new_with_metadata(fields, reward.metadata().clone())
}

fn with_source_columns(
    batch: RecordBatch,
    partitions: Int32Array,
    offsets: Int64Array,
) -> Result<RecordBatch, LakeError> {
    let schema = Arc::new(extend(batch.schema().as_ref()));
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(partitions));
    columns.push(Arc::new(offsets));
    RecordBatch::try_new(schema, columns).map_err(LakeError::arrow("adding source columns"))
}

/// Encodes `batches` (all of one schema) as one Parquet file into `out`.
pub fn write_parquet<W: std::io::Write + Send>(
    batches: &[RecordBatch],
    settings: &ParquetSettings,
    out: W,
) -> Result<(), LakeError> {
    let Some(first) = batches.first() else {
        return Err(LakeError::Config("no rows to write".into()));
    };
    let mut writer = ArrowWriter::try_new(out, first.schema(), Some(settings.properties()?))
        .map_err(LakeError::parquet("opening a Parquet writer"))?;
    for b in batches {
        writer.write(b).map_err(LakeError::parquet("writing rows"))?;
    }
    writer.close().map_err(LakeError::parquet("closing the Parquet file"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use flywheel_core::codec::encode;
    use flywheel_core::records::{FollowUpAction, Outcome, Reward};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn fixture() -> Reward {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures/reward.accepted.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn rewards_round_trip_through_parquet() {
        let mut batcher = RewardBatcher::new(100).unwrap();
        let mut expected = Vec::new();
        for i in 0..10 {
            let mut r = fixture();
            r.reward_id = format!("r{i}");
            r.outcome = if i % 2 == 0 { Outcome::Accepted } else { Outcome::Ignored };
            r.adapter_version = (i % 3 != 0).then(|| "a1".to_string());
            r.signals.follow_ups = vec![FollowUpAction::Thanks; i % 3];
            batcher.push(&encode(&r).unwrap(), 2, 100 + i as i64).unwrap();
            expected.push(r);
        }
        let batch = batcher.take().unwrap().unwrap();
        assert!(batcher.is_empty());
        let mut file = Vec::new();
        write_parquet(&[batch], &ParquetSettings::default(), &mut file).unwrap();

        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(file)).unwrap();
        let meta = reader.metadata().clone();
        let rows: Vec<RecordBatch> = reader.build().unwrap().map(Result::unwrap).collect();
        let back = arrow_select::concat::concat_batches(&rows[0].schema(), &rows).unwrap();
        assert_eq!(back.num_rows(), 10);
        let col = |name: &str| back.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")).clone();
        let ids = col("reward_id");
        let ids = arrow_array::cast::as_string_array(&ids);
        assert_eq!(ids.value(3), "r3");
        let adapters = col("adapter_version");
        assert!(adapters.is_null(0) && !adapters.is_null(1), "null adapter stays null");
        let offsets = col(SOURCE_OFFSET_COLUMN);
        assert_eq!(offsets.as_any().downcast_ref::<Int64Array>().unwrap().value(9), 109);
        for name in ["components", "signals", "lineage"] {
            assert!(matches!(col(name).data_type(), DataType::Struct(_)), "{name} is a struct column");
        }
        let rg = meta.row_group(0);
        assert!(rg.columns().iter().all(|c| c.compression().to_string().starts_with("ZSTD")));
        assert!(rg.columns().iter().any(|c| c.statistics().is_some()), "statistics written");
    }
}
