//! The lake as analysts see it: files committed by the lake writer's commit
//! path (the same `prepare` and `commit_partition` the service runs) to the
//! Delta table, read back by two independent Delta readers from `make
//! setup`'s `.venv` (DuckDB's `delta_scan`, and Python `deltalake` with
//! DuckDB aggregating its Arrow data), checked against the rewards written;
//! plus rejected tenants, schema evolution, compaction and time travel.

use std::collections::BTreeMap;
use std::sync::Arc;

use flywheel_core::codec::{encode, header_of};
use flywheel_core::records::{Outcome, Reward};
use flywheel_lake::compact::{CompactOptions, compact};
use flywheel_lake::parquet::{ParquetSettings, RewardSchemas};
use flywheel_lake::store::{LocalStore, Storage};
use flywheel_lake::table::{Lake, Rejected, partition_dir};
use flywheel_tests::{commit_records, delta_query, lake_runtime, workspace_root};

/// The engines every lake query runs on; their answers must agree.
const ENGINES: [&str; 2] = ["duckdb", "deltalake"];

/// Runs `sql` (`TABLE` names the table) on both engines, checks they
/// agree, and returns the rows.
fn query(root: &std::path::Path, sql: &str) -> Vec<Vec<serde_json::Value>> {
    query_env(root, sql, &[])
}

fn query_env(root: &std::path::Path, sql: &str, env: &[(String, String)]) -> Vec<Vec<serde_json::Value>> {
    let table = root.join("rewards").display().to_string();
    let [first, second] = ENGINES.map(|e| delta_query(e, &table, sql, env));
    assert_eq!(first, second, "DuckDB delta_scan and Python deltalake disagree on {sql}");
    first
}

fn reward(i: i64) -> Reward {
    let fixture = workspace_root().join("schemas/fixtures/reward.accepted.json");
    let mut r: Reward = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    r.reward_id = format!("reward-{i}");
    r.tenant = if i % 3 == 0 { "globex".into() } else { "acme".into() };
    // Spread over three hours.
    r.shown_time = 1_795_424_400_000 + (i % 3) * 3_600_000 + i;
    r.outcome = if i % 2 == 0 { Outcome::Accepted } else { Outcome::Rejected };
    r.reward = i as f64 / 10.0;
    r
}

struct TestLake {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    lake: Lake,
    settings: ParquetSettings,
}

impl TestLake {
    fn new() -> TestLake {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(&root).unwrap());
        let settings = ParquetSettings { row_group_rows: 16, ..ParquetSettings::default() };
        let schema = RewardSchemas::released().unwrap().file_schema().unwrap();
        let lake = Lake::create_or_open(storage, lake_runtime(), &schema).unwrap();
        TestLake { _dir: dir, root, lake, settings }
    }

    /// Commits encoded records as offsets `first..` of partition 0, the way
    /// the service does; returns the rejected records.
    fn commit(&mut self, records: &[Vec<u8>], first: i64, schemas: &RewardSchemas) -> Vec<Rejected> {
        commit_records(&mut self.lake, &self.settings, records, first, schemas)
    }
}

#[test]
fn duckdb_reads_committed_files_with_hive_partitions_and_exact_values() {
    let mut t = TestLake::new();
    let schemas = RewardSchemas::released().unwrap();
    for (first, last) in [(0i64, 59i64), (60, 119)] {
        let records: Vec<Vec<u8>> = (first..=last).map(|i| encode(&reward(i)).unwrap()).collect();
        assert!(t.commit(&records, first, &schemas).is_empty());
    }
    // globex in hour 0, acme in hours 1 and 2: three directories per commit.
    assert_eq!(t.lake.files().unwrap().len(), 6);

    let got = query(
        &t.root,
        "select tenant, cast(date as varchar), hour, count(*), round(sum(reward), 9), count(distinct reward_id),
                sum(case when outcome = 'ACCEPTED' then 1 else 0 end)::bigint, min(_source_offset), max(_source_offset),
                min(lineage.partition)
         from TABLE group by all order by all",
    );
    // The same aggregates computed here from the rewards written.
    /// Rows, Σ reward, accepted, lowest and highest source offset.
    type Totals = (i64, f64, i64, i64, i64);
    let mut expected: BTreeMap<(String, String, i64), Totals> = BTreeMap::new();
    for i in 0..120 {
        let r = reward(i);
        let dir_path = partition_dir(&r.tenant, r.shown_time).unwrap();
        let parts: Vec<String> = dir_path.iter().map(|c| c.to_string_lossy().to_string()).collect();
        let date = parts[2].trim_start_matches("date=").to_string();
        let hour: i64 = parts[3].trim_start_matches("hour=").parse().unwrap();
        let e = expected.entry((r.tenant.clone(), date, hour)).or_insert((0, 0.0, 0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 += r.reward;
        e.2 += i64::from(r.outcome == Outcome::Accepted);
        e.3 = e.3.min(i);
        e.4 = e.4.max(i);
    }
    assert_eq!(got.len(), expected.len(), "{got:?}");
    for (row, ((tenant, date, hour), (n, sum, accepted, lo, hi))) in got.iter().zip(&expected) {
        assert_eq!(row[0], serde_json::json!(tenant));
        assert_eq!(row[1], serde_json::json!(date));
        // The table's `hour` partition column is an integer.
        assert_eq!(row[2], serde_json::json!(hour));
        assert_eq!(row[3].as_i64(), Some(*n));
        assert!((row[4].as_f64().unwrap() - sum).abs() < 1e-9);
        assert_eq!(row[5].as_i64(), Some(*n), "reward ids distinct");
        assert_eq!(row[6].as_i64(), Some(*accepted));
        assert_eq!((row[7].as_i64(), row[8].as_i64()), (Some(*lo), Some(*hi)));
        assert!(row[9].is_number(), "lineage struct readable: {row:?}");
    }
}

#[test]
fn hostile_tenants_are_rejected_and_nothing_lands_outside_the_lake() {
    let mut t = TestLake::new();
    let schemas = RewardSchemas::released().unwrap();
    let hostile = ["../../etc", "/abs", "a/../../b", "UPPER", "tenant=x", "..", "", "x\u{0}y", &"y".repeat(65)];
    let mut records = Vec::new();
    for (i, tenant) in hostile.iter().enumerate() {
        let mut r = reward(i as i64);
        r.tenant = tenant.to_string();
        records.push(encode(&r).unwrap());
    }
    records.push(encode(&reward(100)).unwrap());
    records.push(b"not avro at all".to_vec());
    let rejected = t.commit(&records, 0, &schemas);
    let codes: Vec<(i64, &str)> = rejected.iter().map(|r| (r.offset, r.reason_code.as_str())).collect();
    let mut expected: Vec<(i64, &str)> = (0..hostile.len() as i64).map(|o| (o, "invalid_tenant")).collect();
    expected.push((hostile.len() as i64 + 1, "bad_magic"));
    assert_eq!(codes, expected);
    assert!(rejected.iter().all(|r| r.value.is_some() && r.key.as_deref() == Some(&b"key"[..])), "originals kept");
    // Every file in the lake directory tree is under the root, and only the
    // valid row was written.
    let parent = t.root.parent().unwrap();
    let outside: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("etc") || e.file_name() == "b")
        .collect();
    assert!(outside.is_empty(), "{outside:?}");
    let files = t.lake.files().unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0].path.starts_with("rewards/tenant=acme/"));
    let committed = t.lake.committed_offset("rewards", 0).unwrap();
    assert_eq!(committed, Some(hostile.len() as i64 + 1), "rejected offsets are covered");
    assert_eq!(
        query(&t.root, "select tenant, count(*) from TABLE group by all"),
        vec![vec![serde_json::json!("acme"), serde_json::json!(1)]]
    );
}

/// The reward schema with one more optional field, as a future release
/// would add it.
fn reward_schema_v2() -> String {
    let mut schema: serde_json::Value =
        serde_json::from_str(flywheel_core::RecordKind::Reward.current_schema()).unwrap();
    schema["fields"].as_array_mut().unwrap().push(serde_json::json!({
        "name": "serving_latency_ms", "type": ["null", "long"], "default": null,
        "doc": "Test-only field: time the model took to produce the suggestion."
    }));
    schema.to_string()
}

#[test]
fn a_new_optional_field_becomes_a_nullable_column_and_old_and_new_files_read_together() {
    let mut t = TestLake::new();
    let v1 = RewardSchemas::released().unwrap();
    let old: Vec<Vec<u8>> = (0..30).map(|i| encode(&reward(i)).unwrap()).collect();
    t.commit(&old, 0, &v1);

    let text = reward_schema_v2();
    let schema = apache_avro::Schema::parse_str(&text).unwrap();
    let header = header_of(&schema);
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().unwrap();
    let mut v2 = v1.clone();
    v2.writers.push((header[2..].try_into().unwrap(), text.clone()));
    v2.reader = text;
    let new: Vec<Vec<u8>> = (30..60)
        .map(|i| {
            let apache_avro::types::Value::Record(mut fields) = apache_avro::to_value(reward(i)).unwrap() else {
                panic!("a record")
            };
            fields.push((
                "serving_latency_ms".into(),
                apache_avro::types::Value::Union(1, Box::new(apache_avro::types::Value::Long(i * 10))),
            ));
            let value = apache_avro::types::Value::Record(fields).resolve(&schema).unwrap();
            let mut bytes = header.to_vec();
            bytes.extend(writer.write_value_to_vec(value).unwrap());
            bytes
        })
        .collect();
    assert!(t.commit(&new, 30, &v2).is_empty());

    // The table's metadata gained the column; old files read it as null.
    let got = query(
        &t.root,
        "select count(*), count(serving_latency_ms), sum(serving_latency_ms)::bigint, min(_source_offset) from TABLE",
    );
    let expected_sum: i64 = (30..60).map(|i| i * 10).sum();
    assert_eq!(got, vec![vec![serde_json::json!(60), 30.into(), expected_sum.into(), 0.into()]]);
    let nulls = query(&t.root, "select count(*) from TABLE where serving_latency_ms is null and _source_offset < 30");
    assert_eq!(nulls, vec![vec![serde_json::json!(30)]], "old rows read as null");
}

#[test]
fn compaction_merges_closed_hours_in_one_commit_and_keeps_every_row() {
    let mut t = TestLake::new();
    let schemas = RewardSchemas::released().unwrap();
    for first in (0..200).step_by(20) {
        let records: Vec<Vec<u8>> = (first..first + 20).map(|i| encode(&reward(i)).unwrap()).collect();
        t.commit(&records, first, &schemas);
    }
    // Rounded sums: a merged file adds the same values in another order.
    let sql = "select tenant, hour, count(*), count(distinct reward_id), round(sum(reward), 6), min(_source_offset),
                      max(_source_offset), round(sum(_source_offset * reward), 6), string_agg(reward_id, ',' order by reward_id)
               from TABLE group by all order by all";
    let before = query(&t.root, sql);
    assert_eq!(t.lake.files().unwrap().len(), 30, "three directories per commit");
    let version_before = t.lake.version().unwrap();

    let opts = CompactOptions {
        target_bytes: 64 * 1024 * 1024,
        closed_before_ms: 1_795_424_400_000 + 2 * 3_600_000, // hours 09 and 10 closed, 11 open
        settings: t.settings,
        writer: "test".into(),
        vacuum_retention: None,
        max_merges: None,
    };
    let report = compact(&mut t.lake, &opts).unwrap();
    assert_eq!((report.files_in, report.files_out), (20, 2), "{report:?}");
    assert_eq!(t.lake.version().unwrap(), version_before + 2, "one commit per merged file");
    assert_eq!(t.lake.files().unwrap().len(), 10 + 2);
    assert_eq!(query(&t.root, sql), before, "same rows, counts and values");
    // Time travel: the snapshot before compaction still reads its own files.
    let at = [("LAKE_READ_VERSION".to_string(), version_before.to_string())];
    assert_eq!(query_env(&t.root, sql, &at), before, "the old snapshot reads the same rows");
    let data_files = |lake: &Lake| {
        let listed = lake.storage().list("rewards").unwrap();
        listed.into_iter().filter(|p| !p.starts_with("rewards/_delta_log/")).count()
    };
    assert_eq!(data_files(&t.lake), 30 + 2, "the merged-away files stay until vacuum");
    let vacuumed = t.lake.vacuum(std::time::Duration::ZERO).unwrap();
    assert_eq!(vacuumed.deleted, 20, "{vacuumed:?}");
    assert_eq!(data_files(&t.lake), t.lake.files().unwrap().len(), "a directory scan now sees the table's files");
    assert_eq!(query(&t.root, sql), before, "vacuum changes no row");
    // Nothing is left to do, and a second run changes nothing.
    assert_eq!(compact(&mut t.lake, &opts).unwrap(), Default::default());
}
