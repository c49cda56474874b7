//! Partition checkpoints: what one holds, where it lies, and how it is read
//! and written whole or not at all, in a local directory or an object store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use flywheel_core::kafka::TopicOffsets;
use flywheel_lake::store::{LocalStore, Storage, open_storage};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::RewarderError;
use crate::join::JoinState;

/// What a checkpoint file holds.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) next_offset: i64,
    pub(crate) reward_fn_version: String,
    /// Output topic → partition → end offset when the checkpoint was taken.
    pub(crate) output_ends: TopicOffsets,
    pub(crate) state: JoinState,
    /// Outputs a previous owner wrote after an earlier checkpoint that the
    /// replay had not regenerated yet when this one was taken: they lie before
    /// `output_ends`, so the next owner's read-back cannot find them. Each
    /// with the input offset whose processing emits it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) skip: Vec<(String, i64)>,
}

/// A partition's checkpoint, relative to the checkpoint storage:
/// `<group>/<input topic>/<partition>.json` (the layout of the directory
/// store before object stores were supported, so existing checkpoints load).
pub(crate) fn checkpoint_path(group_id: &str, topic: &str, partition: i32) -> String {
    format!("{group_id}/{topic}/{partition}.json")
}

/// Parses a checkpoint, migrating the join state of older releases.
pub(crate) fn parse_checkpoint(bytes: &[u8]) -> Result<Checkpoint, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(state) = value.get_mut("state").map(serde_json::Value::take)
        && let Some(migrated) = JoinState::migrate_json(state)
    {
        value["state"] = migrated;
    }
    serde_json::from_value(value)
}

/// Opens the checkpoint storage `config` names: `--checkpoint-store` when
/// given, else the local `--checkpoint-dir` (created if missing). Storage
/// calls block on `runtime`: make them from blocking threads.
pub fn open_checkpoint_storage(
    config: &Config,
    runtime: tokio::runtime::Handle,
) -> Result<Arc<dyn Storage>, RewarderError> {
    let Some(url) = &config.checkpoint_store else {
        let dir = &config.checkpoint_dir;
        return Ok(Arc::new(
            LocalStore::open(dir).map_err(RewarderError::checkpoint_storage(dir.display().to_string()))?,
        ));
    };
    if url.starts_with("memory://") {
        // One in-memory store per URL and process, so that several instances
        // in one process (tests, trials) can hand partitions to each other.
        static MEMORY: OnceLock<Mutex<HashMap<String, Arc<dyn Storage>>>> = OnceLock::new();
        let mut stores = MEMORY.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = stores.get(url) {
            return Ok(store.clone());
        }
        let store = open_storage(url, runtime).map_err(RewarderError::checkpoint_storage(url.as_str()))?;
        stores.insert(url.clone(), store.clone());
        return Ok(store);
    }
    open_storage(url, runtime).map_err(RewarderError::checkpoint_storage(url.as_str()))
}

/// The checkpoints of one consumer group's input topic.
pub(crate) struct Checkpoints {
    storage: Arc<dyn Storage>,
    group_id: String,
    topic: String,
}

impl Checkpoints {
    pub(crate) fn new(storage: Arc<dyn Storage>, group_id: &str, topic: &str) -> Checkpoints {
        Checkpoints { storage, group_id: group_id.to_string(), topic: topic.to_string() }
    }

    /// The storage's URL, for logs.
    pub(crate) fn url(&self) -> String {
        self.storage.url()
    }

    /// A partition's checkpoint path, and its URL for messages.
    fn location(&self, partition: i32) -> (String, String) {
        let path = checkpoint_path(&self.group_id, &self.topic, partition);
        let url = format!("{}/{path}", self.storage.url().trim_end_matches('/'));
        (path, url)
    }

    /// A partition's checkpoint; `None` when it never had one.
    pub(crate) fn read(&self, partition: i32) -> Result<Option<Checkpoint>, RewarderError> {
        let (path, url) = self.location(partition);
        let bytes = self.storage.get(&path).map_err(RewarderError::checkpoint_storage(url.as_str()))?;
        bytes
            .map(|b| parse_checkpoint(&b).map_err(|source| RewarderError::CheckpointFormat { path: url, source }))
            .transpose()
    }

    /// Writes a partition's checkpoint whole or not at all: the storage's
    /// `put` is a temp file, fsync, rename and directory fsync on local disk,
    /// and a single PUT of the whole object on an object store, so a reader
    /// (the next owner, after any crash) sees the previous checkpoint or this
    /// one, never part of one.
    pub(crate) fn write(&self, partition: i32, checkpoint: &Checkpoint) -> Result<(), RewarderError> {
        let (path, url) = self.location(partition);
        let bytes = serde_json::to_vec(checkpoint)
            .map_err(|source| RewarderError::CheckpointFormat { path: url.clone(), source })?;
        self.storage.put(&path, &bytes).map_err(RewarderError::checkpoint_storage(url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse as config;

    #[test]
    fn checkpoints_of_the_release_before_fingerprinted_ids_still_load() {
        // Written by the rewarder before closed suggestion ids became fingerprints.
        let legacy = br#"{"next_offset":24,"reward_fn_version":"cursor-default-v1","output_ends":{"rewards":{"0":0,"1":1}},"state":{"open":{},"by_deadline":[],"closed":{"sugg-000042":1795424700000},"closed_by_deadline":[[1795424700000,"sugg-000042"]],"max_event_time":1795433720945,"counters":{"duplicates":0,"late":16,"orphans":0,"closed_early":0,"rewards":1}}}"#;
        let cp = parse_checkpoint(legacy).unwrap();
        assert_eq!(cp.next_offset, 24);
        let state = serde_json::to_value(&cp.state).unwrap();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(b"sugg-000042");
        let fingerprint = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(state["closed"][fingerprint.to_string()], serde_json::json!(1_795_424_700_000_i64));
        assert_eq!(state["closed_by_deadline"][0][1], serde_json::json!(fingerprint));
        // A current checkpoint round-trips unchanged.
        let current = serde_json::to_vec(&cp).unwrap();
        assert_eq!(serde_json::to_value(parse_checkpoint(&current).unwrap().state).unwrap(), state);
    }

    #[test]
    fn checkpoint_storage_is_the_directory_by_default_and_a_store_when_named() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint_path("group", "interactions", 3);
        assert_eq!(path, "group/interactions/3.json");
        // The directory store keeps the layout of earlier releases.
        let local = config(&["--checkpoint-dir", dir.path().to_str().unwrap()]);
        open_checkpoint_storage(&local, runtime.handle().clone()).unwrap().put(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("group/interactions/3.json")).unwrap(), b"{}");
        // A file:// URL is the same local store (fsync and rename).
        let url = format!("file://{}", dir.path().display());
        let store = open_checkpoint_storage(&config(&["--checkpoint-store", &url]), runtime.handle().clone()).unwrap();
        assert_eq!(store.get(&path).unwrap().as_deref(), Some(&b"{}"[..]));
        // memory:// is one store per URL in a process: two instances share it.
        let a = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://a"]), runtime.handle().clone());
        let again = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://a"]), runtime.handle().clone());
        let other = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://b"]), runtime.handle().clone());
        a.unwrap().put(&path, b"1").unwrap();
        assert_eq!(again.unwrap().get(&path).unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(other.unwrap().get(&path).unwrap(), None);
    }

    #[test]
    fn a_checkpoint_round_trips_and_a_corrupt_one_is_a_format_error_naming_it() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let url = "memory://checkpoint-round-trip";
        let storage = open_checkpoint_storage(&config(&["--checkpoint-store", url]), runtime.handle().clone()).unwrap();
        let checkpoints = Checkpoints::new(storage.clone(), "g", "interactions");
        assert!(checkpoints.read(0).unwrap().is_none());
        let legacy = br#"{"next_offset":7,"reward_fn_version":"v1","output_ends":{},"state":{"open":{},"by_deadline":[],"closed":{},"closed_by_deadline":[],"max_event_time":0,"counters":{"duplicates":0,"late":0,"orphans":0,"closed_early":0,"rewards":0}}}"#;
        let mut cp = parse_checkpoint(legacy).unwrap();
        cp.skip = vec![("r:x".into(), 9)];
        checkpoints.write(0, &cp).unwrap();
        let back = checkpoints.read(0).unwrap().unwrap();
        assert_eq!((back.next_offset, back.reward_fn_version.as_str(), back.skip), (7, "v1", cp.skip));
        storage.put("g/interactions/1.json", b"{\"next_off").unwrap();
        let e = checkpoints.read(1).unwrap_err();
        assert_eq!(e.reason_code(), "checkpoint_format");
        assert!(e.to_string().contains("g/interactions/1.json"), "{e}");
    }
}
