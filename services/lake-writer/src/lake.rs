//! The lake: Hive layout, validated partition values, and the commit
//! protocol that makes files visible atomically, over any [`Storage`].
//!
//! Layout under the lake root:
//! - `rewards/tenant=<t>/date=YYYY-MM-DD/hour=HH/<topic>-<partition>-<first>-<last>.parquet`:
//!   data files, named from the source offsets of their rows;
//! - `_flywheel_log/<seq>.json`: the commit log. A file is committed once an
//!   entry names it; entries are created with `put_new`, so two writers can
//!   never both take a sequence number;
//! - `_flywheel_state/`: intents (files a commit in flight is about to add)
//!   and the manifest publisher's progress; `_flywheel_tmp/`: the local
//!   store's temp files. Names starting with `_` are skipped by DuckDB,
//!   Spark and pyarrow directory scans.
//!
//! A commit of source partition `p`: check in the log that nobody committed
//! `p` past where this writer started; record the intent; create each data
//! file (whole or not at all); create the next log entry, re-checking `p`
//! if another writer took that number. A crash before the entry leaves
//! complete files no entry names: the next owner of `p` deletes them using
//! the intent, before it writes anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::LakeError;
use crate::store::Storage;

/// Directory of the commit log under the lake root.
pub const LOG_DIR: &str = "_flywheel_log";
/// Directory of intents and publisher progress.
pub const STATE_DIR: &str = "_flywheel_state";
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
    Ok(format!("{}{first:020}-{last:020}.parquet", file_prefix(topic, partition)?))
}

/// The prefix of every file name (data and temp) of a source partition.
pub fn file_prefix(topic: &str, partition: i32) -> Result<String, LakeError> {
    let safe = topic.replace('.', "_");
    validate_partition_value("source topic", &safe)?;
    Ok(format!("{safe}-{partition}-"))
}

/// The key of a source partition in commit entries: `topic/partition`.
pub fn source_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
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
    /// Per source `topic/partition`: the lowest and highest offset of its
    /// rows in this file.
    #[serde(default)]
    pub sources: BTreeMap<String, (i64, i64)>,
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
    /// Original key.
    #[serde(default)]
    pub key: Option<Vec<u8>>,
    /// Original value.
    #[serde(default)]
    pub value: Option<Vec<u8>>,
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

#[derive(Debug, Serialize, Deserialize)]
struct Intent {
    paths: Vec<String>,
}

/// A lake root with its replayed commit log.
#[derive(Debug)]
pub struct Lake {
    storage: Arc<dyn Storage>,
    commits: Vec<Commit>,
    /// Live files by path, derived from `commits` as they are read.
    live: BTreeMap<String, AddedFile>,
    /// Last committed offset per source `topic/partition`, likewise.
    committed: BTreeMap<String, i64>,
    writer: String,
}

fn log_path(seq: u64) -> String {
    format!("{LOG_DIR}/{seq:020}.json")
}

fn intent_path(name: &str) -> String {
    format!("{STATE_DIR}/intent/{name}.json")
}

impl Lake {
    /// Opens the lake on `storage` and reads its commit log.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Lake, LakeError> {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let mut lake = Lake {
            storage,
            commits: Vec::new(),
            live: BTreeMap::new(),
            committed: BTreeMap::new(),
            writer: format!("{host}/{}", std::process::id()),
        };
        lake.refresh()?;
        Ok(lake)
    }

    /// Reads log entries committed since the last read (by any writer).
    pub fn refresh(&mut self) -> Result<(), LakeError> {
        loop {
            let seq = self.commits.len() as u64;
            let path = log_path(seq);
            let Some(bytes) = self.storage.get(&path)? else { return Ok(()) };
            let commit: Commit = serde_json::from_slice(&bytes)
                .map_err(|e| LakeError::Log { path: path.clone(), detail: e.to_string() })?;
            if commit.seq != seq {
                return Err(LakeError::Log { path, detail: format!("expected commit {seq}, found {}", commit.seq) });
            }
            self.push(commit);
        }
    }

    /// Appends a commit read or written, keeping the derived views current.
    fn push(&mut self, commit: Commit) {
        for f in &commit.added {
            self.live.insert(f.path.clone(), f.clone());
        }
        for r in &commit.removed {
            self.live.remove(r);
        }
        for (tp, (_, last)) in &commit.offsets {
            let e = self.committed.entry(tp.clone()).or_insert(*last);
            *e = (*e).max(*last);
        }
        self.commits.push(commit);
    }

    /// The storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Every commit, in order.
    pub fn commits(&self) -> &[Commit] {
        &self.commits
    }

    /// The committed data files (added and not removed since), by path.
    pub fn files(&self) -> Vec<&AddedFile> {
        self.live.values().collect()
    }

    /// Whether `path` is a committed, live data file.
    pub fn is_live(&self, path: &str) -> bool {
        self.live.contains_key(path)
    }

    /// The last committed offset of each source `topic/partition`.
    pub fn committed_offsets(&self) -> BTreeMap<String, i64> {
        self.committed.clone()
    }

    /// The last committed offset of one source partition.
    pub fn committed_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.committed.get(&source_key(topic, partition)).copied()
    }

    /// Makes the lake consistent for a source partition this writer just
    /// took over: deletes the files a crashed commit of it created but never
    /// committed, and its leftover temp files.
    pub fn recover_partition(&mut self, topic: &str, partition: i32) -> Result<(), LakeError> {
        let name = file_prefix(topic, partition)?;
        self.storage.discard_temp(&name)?;
        self.discard_intent(&name)
    }

    fn discard_intent(&mut self, name: &str) -> Result<(), LakeError> {
        let path = intent_path(name);
        let Some(bytes) = self.storage.get(&path)? else { return Ok(()) };
        self.refresh()?;
        let intent: Intent =
            serde_json::from_slice(&bytes).map_err(|e| LakeError::Log { path: path.clone(), detail: e.to_string() })?;
        for file in intent.paths.iter().filter(|p| !self.is_live(p)) {
            tracing::warn!(file, "removing a data file no commit names (crash mid-commit)");
            self.storage.delete(file)?;
        }
        self.storage.delete(&path).map(drop)
    }

    /// Creates `files`, replacing an uncommitted leftover of the same name.
    fn create_files(&mut self, files: &[NewFile]) -> Result<(), LakeError> {
        for f in files {
            match self.storage.put_new(&f.path, &f.bytes) {
                Ok(()) => {}
                Err(LakeError::Exists(_)) => {
                    self.refresh()?;
                    if self.is_live(&f.path) {
                        return Err(LakeError::Conflict(format!("{} is already committed", f.path)));
                    }
                    self.storage.delete(&f.path)?;
                    self.storage.put_new(&f.path, &f.bytes)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Appends the next log entry; `still_valid` re-checks the commit's
    /// precondition against entries other writers added meanwhile.
    fn append(
        &mut self,
        mut commit: Commit,
        still_valid: impl Fn(&Lake) -> Result<(), LakeError>,
    ) -> Result<&Commit, LakeError> {
        loop {
            self.refresh()?;
            still_valid(self)?;
            commit.seq = self.commits.len() as u64;
            let bytes = serde_json::to_vec_pretty(&commit)
                .map_err(|e| LakeError::Log { path: log_path(commit.seq), detail: e.to_string() })?;
            match self.storage.put_new(&log_path(commit.seq), &bytes) {
                Ok(()) => break,
                Err(LakeError::Exists(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        self.push(commit);
        Ok(self.commits.last().expect("just pushed"))
    }

    /// Commits one source partition's files, offsets and rejected records
    /// (see [`PartitionCommit`]). If the log shows another writer committed
    /// the partition past `previous`, this fails with [`LakeError::Conflict`]
    /// (the caller drops its buffer and re-reads).
    pub fn commit_partition(&mut self, c: PartitionCommit<'_>) -> Result<&Commit, LakeError> {
        let PartitionCommit { topic, partition, previous, range, files, rejected, committed_at } = c;
        let name = file_prefix(topic, partition)?;
        let check = move |lake: &Lake| {
            let now = lake.committed_offset(topic, partition);
            if now == previous {
                Ok(())
            } else {
                Err(LakeError::Conflict(format!(
                    "{topic}/{partition} was committed up to {now:?} by another writer; this one read from {previous:?}"
                )))
            }
        };
        self.refresh()?;
        check(self)?;
        let intent = Intent { paths: files.iter().map(|f| f.path.clone()).collect() };
        if !files.is_empty() {
            let bytes = serde_json::to_vec(&intent).map_err(|e| LakeError::Config(e.to_string()))?;
            self.storage.put(&intent_path(&name), &bytes)?;
        }
        self.create_files(&files)?;
        let commit = Commit {
            seq: 0,
            added: files.iter().map(NewFile::added).collect(),
            removed: Vec::new(),
            offsets: [(source_key(topic, partition), range)].into(),
            rejected,
            committed_at,
            writer: self.writer.clone(),
        };
        // On failure the intent stays: the partition's next owner removes the files.
        self.append(commit, check)?;
        if !files.is_empty() {
            self.storage.delete(&intent_path(&name))?;
        }
        Ok(self.commits.last().expect("just committed"))
    }

    /// Replaces `removed` (committed files) by `added` in one commit. Fails
    /// with [`LakeError::Conflict`] if another commit removed any of them.
    pub fn commit_replace(
        &mut self,
        added: Vec<NewFile>,
        removed: Vec<String>,
        committed_at: i64,
        writer: &str,
    ) -> Result<&Commit, LakeError> {
        const NAME: &str = "compaction";
        self.discard_intent(NAME)?;
        let bytes = serde_json::to_vec(&Intent { paths: added.iter().map(|f| f.path.clone()).collect() })
            .map_err(|e| LakeError::Config(e.to_string()))?;
        self.storage.put(&intent_path(NAME), &bytes)?;
        self.create_files(&added)?;
        let wanted: BTreeSet<String> = removed.iter().cloned().collect();
        let commit = Commit {
            seq: 0,
            added: added.iter().map(NewFile::added).collect(),
            removed,
            offsets: BTreeMap::new(),
            rejected: Vec::new(),
            committed_at,
            writer: writer.to_string(),
        };
        self.append(commit, |lake| match wanted.iter().find(|p| !lake.is_live(p)) {
            Some(gone) => Err(LakeError::Conflict(format!("{gone} was removed by another commit"))),
            None => Ok(()),
        })?;
        self.storage.delete(&intent_path(NAME))?;
        Ok(self.commits.last().expect("just committed"))
    }

    /// Deletes the bytes of files that commits removed (idempotent).
    pub fn vacuum(&self) -> Result<usize, LakeError> {
        let mut n = 0;
        for path in self.commits.iter().flat_map(|c| &c.removed).filter(|p| !self.is_live(p)) {
            n += usize::from(self.storage.delete(path)?);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

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

    fn pc(
        topic: &str,
        partition: i32,
        previous: Option<i64>,
        range: (i64, i64),
        files: Vec<NewFile>,
        rejected: Vec<Rejected>,
        committed_at: i64,
    ) -> PartitionCommit<'_> {
        PartitionCommit { topic, partition, previous, range, files, rejected, committed_at }
    }

    fn new_file(first: i64, last: i64, content: &[u8]) -> NewFile {
        let dir = partition_dir("acme", 0).unwrap();
        NewFile {
            path: format!("{}/{}", dir.display(), file_name("rewards", 1, first, last).unwrap()),
            rows: (last - first + 1) as u64,
            bytes: content.to_vec(),
            sources: [(source_key("rewards", 1), (first, last))].into(),
        }
    }

    /// Commits offsets 0-9 of rewards/1, then leaves what a crash mid-commit
    /// of 10-19 leaves: the intent and a created file, no log entry.
    fn commit_then_crash_mid_commit(storage: &Arc<dyn Storage>) -> (String, NewFile) {
        let mut lake = Lake::open(storage.clone()).unwrap();
        let kept = new_file(0, 9, b"ten rows");
        let kept_path = kept.path.clone();
        lake.commit_partition(pc("rewards", 1, None, (0, 9), vec![kept], Vec::new(), 1)).unwrap();
        let ghost = new_file(10, 19, b"x");
        let intent = serde_json::to_vec(&Intent { paths: vec![ghost.path.clone()] }).unwrap();
        storage.put(&intent_path("rewards-1-"), &intent).unwrap();
        storage.put_new(&ghost.path, &ghost.bytes).unwrap();
        (kept_path, ghost)
    }

    #[test]
    fn commits_survive_reopen_and_a_crashed_commit_is_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let (kept_path, ghost) = commit_then_crash_mid_commit(&storage);

        let mut lake = Lake::open(storage.clone()).unwrap();
        assert_eq!(lake.committed_offsets(), [("rewards/1".to_string(), 9)].into());
        lake.recover_partition("rewards", 1).unwrap();
        let files = lake.files();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, kept_path);
        assert_eq!((files[0].rows, files[0].bytes), (10, 8));
        assert!(dir.path().join(&kept_path).exists());
        assert!(!dir.path().join(&ghost.path).exists(), "uncommitted file removed");
        assert!(storage.list(STATE_DIR).unwrap().is_empty(), "intent removed");
        // The same range again commits cleanly over a leftover of the same name.
        storage.put_new(&ghost.path, b"stale").unwrap();
        lake.commit_partition(pc("rewards", 1, Some(9), (10, 19), vec![new_file(10, 19, b"y")], Vec::new(), 2))
            .unwrap();
        assert_eq!(storage.get(&ghost.path).unwrap().as_deref(), Some(&b"y"[..]));
    }

    #[test]
    fn the_commit_protocol_runs_on_an_object_store() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let storage = crate::store::open_storage("memory://", runtime.handle().clone()).unwrap();
        let (kept_path, ghost) = commit_then_crash_mid_commit(&storage);

        let mut lake = Lake::open(storage.clone()).unwrap();
        lake.recover_partition("rewards", 1).unwrap();
        assert_eq!(lake.files().iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), vec![kept_path.as_str()]);
        assert_eq!(storage.get(&ghost.path).unwrap(), None, "uncommitted object removed");
        let mut zombie = Lake::open(storage.clone()).unwrap();
        lake.commit_partition(pc("rewards", 1, Some(9), (10, 19), vec![new_file(10, 19, b"y")], Vec::new(), 2))
            .unwrap();
        let err = zombie.commit_partition(pc("rewards", 1, Some(9), (10, 12), Vec::new(), Vec::new(), 3));
        assert!(matches!(err, Err(LakeError::Conflict(_))), "{err:?}");
        assert_eq!(Lake::open(storage).unwrap().committed_offsets(), [("rewards/1".to_string(), 19)].into());
    }

    #[test]
    fn a_zombie_writer_cannot_commit_a_partition_another_writer_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let mut a = Lake::open(storage.clone()).unwrap();
        let mut b = Lake::open(storage.clone()).unwrap();
        a.commit_partition(pc("rewards", 1, None, (0, 9), vec![new_file(0, 9, b"a")], Vec::new(), 1)).unwrap();
        // b read partition 1 from the start too, before a committed.
        let err = b.commit_partition(pc("rewards", 1, None, (0, 4), vec![new_file(0, 4, b"b")], Vec::new(), 2));
        assert!(matches!(err, Err(LakeError::Conflict(_))), "{err:?}");
        // Other partitions and the next sequence number are fine.
        b.commit_partition(pc("rewards", 2, None, (0, 0), Vec::new(), Vec::new(), 3)).unwrap();
        a.refresh().unwrap();
        assert_eq!(a.commits().len(), 2);
        assert_eq!(a.committed_offsets(), [("rewards/1".into(), 9), ("rewards/2".into(), 0)].into());
    }

    #[test]
    fn replacing_files_is_one_commit_and_vacuum_deletes_the_old_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let mut lake = Lake::open(storage.clone()).unwrap();
        let (one, two) = (new_file(0, 4, b"1"), new_file(5, 9, b"2"));
        let old = vec![one.path.clone(), two.path.clone()];
        lake.commit_partition(pc("rewards", 1, None, (0, 9), vec![one, two], Vec::new(), 1)).unwrap();
        let mut merged = new_file(0, 9, b"12");
        merged.path = merged.path.replace("rewards-1-", "compacted-");
        lake.commit_replace(vec![merged], old.clone(), 2, "test").unwrap();
        assert_eq!(lake.files().len(), 1);
        assert_eq!(lake.vacuum().unwrap(), 2);
        assert!(old.iter().all(|p| !dir.path().join(p).exists()));
        let again = lake.commit_replace(Vec::new(), old, 3, "test");
        assert!(matches!(again, Err(LakeError::Conflict(_))), "cannot remove twice");
    }
}
