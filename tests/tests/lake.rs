//! The lake as analysts see it: files committed by the lake writer's commit
//! protocol, read back by an independent reader (DuckDB, from `make setup`'s
//! `.venv`) with Hive partitioning, checked against the rewards written.

use std::collections::BTreeMap;
use std::process::Command;

use flywheel_core::codec::encode;
use flywheel_core::records::{Outcome, Reward};
use flywheel_lake_writer::lake::{Lake, file_name, partition_dir};
use flywheel_lake_writer::parquet_shard::{ParquetSettings, RewardBatcher, write_parquet};
use flywheel_tests::workspace_root;

fn python() -> std::path::PathBuf {
    let p = workspace_root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup` (installs duckdb and pyarrow)", p.display());
    p
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

#[test]
fn duckdb_reads_committed_files_with_hive_partitions_and_exact_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut lake = Lake::open(dir.path()).unwrap();
    // Two commits of one source partition, grouped by partition directory.
    for (first, last) in [(0i64, 59i64), (60, 119)] {
        let mut groups: BTreeMap<std::path::PathBuf, Vec<Reward>> = BTreeMap::new();
        for i in first..=last {
            let r = reward(i);
            groups.entry(partition_dir(&r.tenant, r.shown_time).unwrap()).or_default().push(r);
        }
        let mut staged = Vec::new();
        for (dir_path, rows) in groups {
            let mut batcher = RewardBatcher::new(1000).unwrap();
            for r in &rows {
                let offset = r.reward_id.trim_start_matches("reward-").parse().unwrap();
                batcher.push(&encode(r).unwrap(), 0, offset).unwrap();
            }
            let batch = batcher.take().unwrap().unwrap();
            let path = dir_path.join(file_name("rewards", 0, first, last).unwrap());
            let settings = ParquetSettings { row_group_rows: 16, ..ParquetSettings::default() };
            staged.push(lake.stage(path, rows.len() as u64, |f| write_parquet(&[batch], &settings, f)).unwrap());
        }
        lake.commit(staged, [("rewards/0".to_string(), (first, last))].into(), 0).unwrap();
    }
    // globex in hour 0, acme in hours 1 and 2: three directories per commit.
    assert_eq!(Lake::open(dir.path()).unwrap().files().len(), 6);

    let script = r#"
import duckdb, json, sys
con = duckdb.connect()
rows = con.execute("""
  select tenant, cast(date as varchar), hour, count(*), sum(reward), count(distinct reward_id),
         sum(case when outcome = 'ACCEPTED' then 1 else 0 end), min(_source_offset), max(_source_offset),
         min(lineage.partition)
  from read_parquet(?, hive_partitioning = true)
  group by all order by all
""", [sys.argv[1] + '/rewards/**/*.parquet']).fetchall()
print(json.dumps([[str(v) if not isinstance(v, (int, float)) else v for v in r] for r in rows]))
"#;
    let out = Command::new(python()).args(["-c", script, &dir.path().display().to_string()]).output().unwrap();
    assert!(out.status.success(), "duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<serde_json::Value>> = serde_json::from_slice(&out.stdout).unwrap();

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
        // Zero-padded partition values: DuckDB keeps `hour` as a string.
        assert_eq!(row[2], serde_json::json!(format!("{hour:02}")));
        assert_eq!(row[3].as_i64(), Some(*n));
        assert!((row[4].as_f64().unwrap() - sum).abs() < 1e-9);
        assert_eq!(row[5].as_i64(), Some(*n), "reward ids distinct");
        assert_eq!(row[6].as_i64(), Some(*accepted));
        assert_eq!((row[7].as_i64(), row[8].as_i64()), (Some(*lo), Some(*hi)));
        assert!(row[9].is_number(), "lineage struct readable: {row:?}");
    }
}
