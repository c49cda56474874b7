//! The lake on a local filesystem: Hive layout, validated partition values,
//! and the commit protocol that makes files visible atomically.
//!
//! Layout under the lake root:
//! - `rewards/tenant=<t>/date=YYYY-MM-DD/hour=HH/<topic>-<partition>-<first>-<last>.parquet`:
//!   committed data files, named from the source position they hold, so a
//!   replay of the same range produces the same name;
//! - `_flywheel_tmp/`: files being written (a name starting with `_` is
//!   skipped by DuckDB, Spark and pyarrow scans, and nothing here is ever
//!   inside `rewards/`); removed on start;
//! - `_flywheel_log/<seq>.json`: the commit log. A commit is visible once its
//!   entry exists; the entry is created with `create_new`, so two writers can
//!   never both commit the same sequence number.
//!
//! A commit: write each file under `_flywheel_tmp`, fsync, rename into place,
//! fsync the directories, then write the log entry (temp, fsync, link to its
//! final name). A crash before the entry leaves renamed files no entry names:
//! [`Lake::open`] deletes them, so readers scanning directories see them at
//! most until the writer restarts, and never partially written.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::LakeError;

/// Directory of the commit log under the lake root.
pub const LOG_DIR: &str = "_flywheel_log";
/// Directory of files being written.
pub const TMP_DIR: &str = "_flywheel_tmp";
/// Directory of the reward table.
pub const REWARDS_DIR: &str = "rewards";
/// Longest accepted partition value.
pub const MAX_PARTITION_VALUE_LEN: usize = 64;

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

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (the civil-from-days algorithm of H. Hinnant).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
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

/// The Hive partition directory (relative to the lake root) of a reward of
/// `tenant` shown at `shown_time` (ms since epoch, UTC).
pub fn partition_dir(tenant: &str, shown_time: i64) -> Result<PathBuf, LakeError> {
    validate_partition_value("tenant", tenant)?;
    let hours = shown_time.div_euclid(3_600_000);
    let (y, m, d) = civil_from_days(hours.div_euclid(24));
    let hour = hours.rem_euclid(24);
    Ok(PathBuf::from(REWARDS_DIR)
        .join(format!("tenant={tenant}"))
        .join(format!("date={y:04}-{m:02}-{d:02}"))
        .join(format!("hour={hour:02}")))
}

/// The deterministic file name of the rows of `topic`/`partition` in
/// `[first, last]`.
pub fn file_name(topic: &str, partition: i32, first: i64, last: i64) -> Result<String, LakeError> {
    let safe = topic.replace('.', "_");
    validate_partition_value("source topic", &safe)?;
    Ok(format!("{safe}-{partition}-{first:020}-{last:020}.parquet"))
}

/// One file added by a commit.
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
}

/// A commit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Sequence number, from 0.
    pub seq: u64,
    /// Files made visible.
    pub added: Vec<AddedFile>,
    /// Files removed (compaction).
    #[serde(default)]
    pub removed: Vec<String>,
    /// Per source `topic/partition`: the inclusive offset range this commit
    /// covers. The next commit of that partition starts right after it.
    pub offsets: BTreeMap<String, (i64, i64)>,
    /// Wall-clock time of the commit (ms), for operators only.
    pub committed_at: i64,
}

/// A file staged under the temp directory, waiting for its commit.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    /// Final path relative to the lake root.
    pub path: PathBuf,
    /// Rows.
    pub rows: u64,
}

/// A lake root with its replayed commit log.
#[derive(Debug)]
pub struct Lake {
    root: PathBuf,
    commits: Vec<Commit>,
    /// Files staged so far: keeps temp names unique when files of one commit
    /// share a name in different partition directories.
    staged: std::sync::atomic::AtomicU64,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LakeError {
    let context = context.into();
    move |e| LakeError::Io { context, detail: e.to_string() }
}

fn sync_dir(dir: &Path) -> Result<(), LakeError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("syncing {}", dir.display())))
}

impl Lake {
    /// Opens (creating) the lake at `root`: reads the commit log, removes temp
    /// files and data files no commit names (left by a crash mid-commit).
    pub fn open(root: &Path) -> Result<Lake, LakeError> {
        for dir in [LOG_DIR, TMP_DIR, REWARDS_DIR] {
            std::fs::create_dir_all(root.join(dir)).map_err(io(format!("creating {}", root.join(dir).display())))?;
        }
        let mut commits = Vec::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(root.join(LOG_DIR))
            .map_err(io("listing the commit log"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        entries.sort();
        for (i, path) in entries.iter().enumerate() {
            let commit: Commit = serde_json::from_slice(&std::fs::read(path).map_err(io(path.display().to_string()))?)
                .map_err(|e| LakeError::Log { path: path.display().to_string(), detail: e.to_string() })?;
            if commit.seq != i as u64 {
                return Err(LakeError::Log {
                    path: path.display().to_string(),
                    detail: format!("expected commit {i}, found {}", commit.seq),
                });
            }
            commits.push(commit);
        }
        let lake = Lake { root: root.to_path_buf(), commits, staged: Default::default() };
        lake.remove_uncommitted()?;
        Ok(lake)
    }

    /// The lake root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every commit, in order.
    pub fn commits(&self) -> &[Commit] {
        &self.commits
    }

    /// The committed data files (added and not removed since), relative paths.
    pub fn files(&self) -> Vec<&AddedFile> {
        let mut live: BTreeMap<&str, &AddedFile> = BTreeMap::new();
        for c in &self.commits {
            for f in &c.added {
                live.insert(&f.path, f);
            }
            for r in &c.removed {
                live.remove(r.as_str());
            }
        }
        live.into_values().collect()
    }

    /// The last committed offset of each source `topic/partition`.
    pub fn committed_offsets(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for c in &self.commits {
            for (tp, (_, last)) in &c.offsets {
                let e = out.entry(tp.clone()).or_insert(*last);
                *e = (*e).max(*last);
            }
        }
        out
    }

    fn remove_uncommitted(&self) -> Result<(), LakeError> {
        let tmp = self.root.join(TMP_DIR);
        for e in std::fs::read_dir(&tmp).map_err(io("listing temp files"))?.flatten() {
            std::fs::remove_file(e.path()).map_err(io(format!("removing {}", e.path().display())))?;
        }
        let live: std::collections::HashSet<PathBuf> =
            self.files().into_iter().map(|f| self.root.join(&f.path)).collect();
        let mut stack = vec![self.root.join(REWARDS_DIR)];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))?.flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if !live.contains(&path) {
                    tracing::warn!(file = %path.display(), "removing a data file no commit names (crash mid-commit)");
                    std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
                }
            }
        }
        Ok(())
    }

    /// Writes a file under the temp directory with `write` and fsyncs it.
    pub fn stage(
        &self,
        path: PathBuf,
        rows: u64,
        write: impl FnOnce(&mut File) -> Result<(), LakeError>,
    ) -> Result<StagedFile, LakeError> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let n = self.staged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join(TMP_DIR).join(format!("{n}-{name}"));
        let mut file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        write(&mut file)?;
        file.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
        Ok(StagedFile { tmp, path, rows })
    }

    /// Moves `files` into place and appends the commit entry that makes them
    /// visible, covering `offsets`. Returns the commit.
    pub fn commit(
        &mut self,
        files: Vec<StagedFile>,
        offsets: BTreeMap<String, (i64, i64)>,
        committed_at: i64,
    ) -> Result<&Commit, LakeError> {
        let mut added = Vec::new();
        for f in files {
            let target = self.root.join(&f.path);
            let dir = target.parent().expect("data files live in a partition directory");
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            let bytes = std::fs::read(&f.tmp).map_err(io(format!("reading {}", f.tmp.display())))?;
            let sha256 = flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            std::fs::rename(&f.tmp, &target).map_err(io(format!("renaming into {}", target.display())))?;
            sync_dir(dir)?;
            added.push(AddedFile {
                path: f.path.to_string_lossy().replace('\\', "/"),
                rows: f.rows,
                bytes: bytes.len() as u64,
                sha256,
            });
        }
        let commit = Commit { seq: self.commits.len() as u64, added, removed: Vec::new(), offsets, committed_at };
        let log = self.root.join(LOG_DIR);
        let tmp = self.root.join(TMP_DIR).join(format!("commit-{}.json", commit.seq));
        let mut file = File::create(&tmp).map_err(io("creating a commit entry"))?;
        serde_json::to_writer_pretty(&mut file, &commit)
            .map_err(|e| LakeError::Log { path: tmp.display().to_string(), detail: e.to_string() })?;
        file.flush().and_then(|()| file.sync_all()).map_err(io("syncing a commit entry"))?;
        // A hard link fails if the name exists: a second writer cannot take
        // the same sequence number.
        let entry = log.join(format!("{:020}.json", commit.seq));
        std::fs::hard_link(&tmp, &entry).map_err(io(format!("committing {}", entry.display())))?;
        std::fs::remove_file(&tmp).map_err(io("removing a temp commit entry"))?;
        sync_dir(&log)?;
        self.commits.push(commit);
        Ok(self.commits.last().expect("just pushed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn commits_survive_reopen_and_uncommitted_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut lake = Lake::open(dir.path()).unwrap();
        let path = partition_dir("acme", 0).unwrap().join(file_name("rewards", 1, 0, 9).unwrap());
        let staged = lake.stage(path.clone(), 10, |f| f.write_all(b"ten rows").map_err(io("test"))).unwrap();
        lake.commit(vec![staged], [("rewards/1".to_string(), (0, 9))].into(), 1).unwrap();
        // A crash mid-commit: a staged file, and a renamed one without an entry.
        let ghost = partition_dir("acme", 0).unwrap().join(file_name("rewards", 1, 10, 19).unwrap());
        let staged = lake.stage(ghost.clone(), 10, |f| f.write_all(b"x").map_err(io("test"))).unwrap();
        std::fs::rename(&staged.tmp, dir.path().join(&ghost)).unwrap();
        lake.stage(ghost.clone(), 10, |f| f.write_all(b"y").map_err(io("test"))).unwrap();

        let lake = Lake::open(dir.path()).unwrap();
        assert_eq!(lake.committed_offsets(), [("rewards/1".to_string(), 9)].into());
        let files = lake.files();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, path.to_string_lossy());
        assert_eq!((files[0].rows, files[0].bytes), (10, 8));
        assert!(dir.path().join(&path).exists());
        assert!(!dir.path().join(&ghost).exists(), "uncommitted file removed");
        assert_eq!(std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_second_writer_cannot_take_a_committed_sequence_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Lake::open(dir.path()).unwrap();
        let mut b = Lake::open(dir.path()).unwrap();
        a.commit(Vec::new(), BTreeMap::new(), 1).unwrap();
        let err = b.commit(Vec::new(), BTreeMap::new(), 2).unwrap_err();
        assert!(err.to_string().contains("committing"), "{err}");
    }
}
