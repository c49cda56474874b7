//! Compaction: merges the small files of closed hours into larger ones with
//! one Delta commit per merged file (old files removed, new one added, both
//! with `dataChange = false`), so readers of any snapshot never see a row
//! twice or miss one. Row content is unchanged; files of an older schema gain
//! the newer columns as nulls. The old files stay readable by older
//! snapshots (time travel) until a vacuum past the retention period.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, new_null_array};
use arrow_schema::Schema;

use crate::LakeError;
use crate::parquet::{ParquetSettings, write_parquet};
use crate::shard::read_file;
use crate::table::{Lake, LiveFile, NewFile, REWARDS_DIR};

/// What to compact.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Files at least this big are left alone; merged files aim at it.
    pub target_bytes: u64,
    /// Only hours that ended before this time (ms) are touched: a writer
    /// may still add late rows to recent hours.
    pub closed_before_ms: i64,
    /// Parquet settings of merged files.
    pub settings: ParquetSettings,
    /// Names the tool in commit entries.
    pub writer: String,
    /// Vacuum afterwards, deleting files unreferenced for this long.
    pub vacuum_retention: Option<std::time::Duration>,
    /// Stop after this many merged files (a run in steps); `None`: all.
    pub max_merges: Option<usize>,
}

/// What a compaction did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CompactReport {
    /// Files merged away.
    pub files_in: usize,
    /// Files written.
    pub files_out: usize,
    /// Rows moved.
    pub rows: u64,
    /// Files a vacuum afterwards deleted.
    pub vacuumed: usize,
}

/// The end (ms) of the hour a `rewards/tenant=t/date=YYYY-MM-DD/hour=HH`
/// directory holds, if the path has that shape.
fn hour_end(dir: &str) -> Option<i64> {
    let mut date = None;
    let mut hour = None;
    for part in dir.split('/') {
        if let Some(d) = part.strip_prefix("date=") {
            date = Some(d);
        } else if let Some(h) = part.strip_prefix("hour=") {
            hour = h.parse::<i64>().ok();
        }
    }
    let mut ymd = date?.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    // Days from civil (H. Hinnant), the inverse of the layout's date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 24 + hour? + 1) * 3_600_000)
}

/// Aligns a batch to `schema` by column name, with nulls for missing columns.
fn align(batch: &RecordBatch, schema: &Arc<Schema>) -> Result<RecordBatch, LakeError> {
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => Err(LakeError::Config(format!(
                "column {} is {} in one file and {} in another",
                f.name(),
                c.data_type(),
                f.data_type()
            ))),
            None => Ok(new_null_array(f.data_type(), batch.num_rows())),
        })
        .collect::<Result<_, _>>()?;
    RecordBatch::try_new(schema.clone(), columns).map_err(LakeError::arrow("aligning schemas"))
}

/// Merges `files` (one partition directory) into one file.
fn merge(lake: &Lake, dir: &str, files: &[LiveFile], settings: &ParquetSettings) -> Result<NewFile, LakeError> {
    let mut batches = Vec::new();
    for f in files {
        let bytes = lake
            .storage()
            .get(&f.path)?
            .ok_or_else(|| LakeError::Integrity(format!("committed file {} is missing", f.path)))?;
        batches.extend(read_file(bytes)?);
    }
    // The widest schema is the newest: columns are only ever added.
    let schema = batches
        .iter()
        .map(RecordBatch::schema)
        .max_by_key(|s| s.fields().len())
        .ok_or_else(|| LakeError::Config(format!("{dir}: nothing to merge")))?;
    let aligned: Vec<RecordBatch> = batches.iter().map(|b| align(b, &schema)).collect::<Result<_, _>>()?;
    let mut bytes = Vec::new();
    write_parquet(&aligned, settings, &mut bytes)?;
    let digest = flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    Ok(NewFile {
        path: format!("{dir}/compacted-{}.parquet", &digest[..16]),
        rows: aligned.iter().map(|b| b.num_rows() as u64).sum(),
        bytes,
        sources: BTreeMap::new(),
        columns: schema,
    })
}

/// Merges small files of closed hours. Safe to run beside writers (they only
/// add files); run one compaction at a time.
pub fn compact(lake: &mut Lake, opts: &CompactOptions) -> Result<CompactReport, LakeError> {
    let mut report = CompactReport::default();
    lake.refresh()?;
    let mut by_dir: BTreeMap<String, Vec<LiveFile>> = BTreeMap::new();
    for f in lake.files()? {
        let Some((dir, _)) = f.path.rsplit_once('/') else { continue };
        if dir.starts_with(REWARDS_DIR)
            && f.bytes < opts.target_bytes
            && hour_end(dir).is_some_and(|end| end <= opts.closed_before_ms)
        {
            by_dir.entry(dir.to_string()).or_default().push(f);
        }
    }
    for (dir, files) in by_dir {
        let mut chunk: Vec<LiveFile> = Vec::new();
        let mut chunks = Vec::new();
        for f in files {
            if !chunk.is_empty() && chunk.iter().map(|c| c.bytes).sum::<u64>() + f.bytes > opts.target_bytes {
                chunks.push(std::mem::take(&mut chunk));
            }
            chunk.push(f);
        }
        chunks.push(chunk);
        for chunk in chunks.into_iter().filter(|c| c.len() >= 2) {
            if opts.max_merges.is_some_and(|m| report.files_out >= m) {
                break;
            }
            let merged = match merge(lake, &dir, &chunk, &opts.settings) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(%dir, error = %e, "skipping a directory that cannot be merged");
                    continue;
                }
            };
            let rows = merged.rows;
            let files_in = chunk.len();
            lake.commit_replace(vec![merged], chunk, flywheel_core::now_millis(), &opts.writer)?;
            report.files_in += files_in;
            report.files_out += 1;
            report.rows += rows;
        }
    }
    if let Some(retention) = opts.vacuum_retention {
        report.vacuumed = lake.vacuum(retention)?.deleted;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_ends_follow_the_layout() {
        assert_eq!(hour_end("rewards/tenant=t/date=1970-01-01/hour=00"), Some(3_600_000));
        // 2026-11-23T09:00Z is 1_795_424_400_000; its hour ends an hour later.
        assert_eq!(hour_end("rewards/tenant=acme/date=2026-11-23/hour=09"), Some(1_795_428_000_000));
        assert_eq!(hour_end("rewards/tenant=t/date=2028-02-29/hour=23"), Some(1_835_481_600_000));
        assert_eq!(hour_end("rewards/tenant=t"), None);
    }
}
