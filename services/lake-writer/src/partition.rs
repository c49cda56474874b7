//! The lake writer's decisions per source partition, free of Kafka and of
//! storage: what an arriving record means for the partition's buffer, when
//! buffers are due for a commit, which files refill the replay filter on a
//! take-over, and what a new owner must publish. The service
//! ([`crate::service`]) does the I/O around these.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use flywheel_core::kafka::TopicOffsets;
use flywheel_lake::shard::{RecentIds, RowBuffer};
use flywheel_lake::table::STATE_DIR;
use serde::{Deserialize, Serialize};

/// One owned partition: its buffer and where it stands against the table.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub(crate) buffer: RowBuffer,
    /// The table's last committed offset (updated at each commit).
    pub(crate) previous: Option<i64>,
    /// Next offset expected; `None` until the first record after a start
    /// at the beginning of the partition.
    pub(crate) next_offset: Option<i64>,
    /// Reward ids recently written from this partition (replay filter).
    pub(crate) recent: RecentIds,
}

/// Thresholds that make a buffer due (from the service's flags).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RollLimits {
    pub(crate) max_rows: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_age: Duration,
    pub(crate) idle: Duration,
    pub(crate) max_buffered_bytes: usize,
}

/// What a record read at some offset means for its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Below the next expected offset: the table has it already (a replay
    /// after a seek or a rebalance); dropped.
    AlreadyCommitted,
    /// Beyond the next expected offset: records were skipped (a consumer
    /// that jumped ahead); the reader must seek back to `expected`.
    Gap {
        /// The offset to read from.
        expected: i64,
    },
    /// Buffered; `roll` names the threshold it crossed, if any ("rows",
    /// "bytes"): commit the partition now.
    Buffered {
        /// The reason to commit now.
        roll: Option<&'static str>,
    },
}

impl PartitionState {
    /// A partition taken over where the table left it (`previous`: the last
    /// committed offset, `None` when nothing was ever committed).
    pub(crate) fn resuming_after(previous: Option<i64>, recent: RecentIds) -> PartitionState {
        PartitionState { buffer: RowBuffer::default(), previous, next_offset: previous.map(|o| o + 1), recent }
    }

    /// Takes the record read at `offset` into the buffer when it is the next
    /// one, and says what to do.
    pub(crate) fn arrive(
        &mut self,
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp: i64,
        limits: &RollLimits,
    ) -> Arrival {
        match self.next_offset {
            Some(next) if offset < next => return Arrival::AlreadyCommitted,
            Some(next) if offset > next => return Arrival::Gap { expected: next },
            _ => {}
        }
        self.next_offset = Some(offset + 1);
        self.buffer.push(key, value, offset, timestamp);
        let roll = if self.buffer.len() >= limits.max_rows {
            Some("rows")
        } else if self.buffer.bytes() >= limits.max_bytes {
            Some("bytes")
        } else {
            None
        };
        Arrival::Buffered { roll }
    }
}

/// Partitions whose buffer is due at `now` and why: its oldest record
/// waited `max_age` ("age"), or nothing arrived for `idle` ("idle").
pub(crate) fn due(parts: &HashMap<i32, PartitionState>, limits: &RollLimits, now: Instant) -> Vec<(i32, &'static str)> {
    let mut due: Vec<(i32, &'static str)> = parts
        .iter()
        .filter_map(|(p, s)| {
            let first = s.buffer.first_at?;
            if now.saturating_duration_since(first) >= limits.max_age {
                Some((*p, "age"))
            } else if s.buffer.last_at.is_some_and(|t| now.saturating_duration_since(t) >= limits.idle) {
                Some((*p, "idle"))
            } else {
                None
            }
        })
        .collect();
    due.sort_unstable();
    due
}

/// The partition to commit while all buffers together exceed the memory
/// cap: the largest one (`None` under the cap).
pub(crate) fn over_memory_cap(parts: &HashMap<i32, PartitionState>, limits: &RollLimits) -> Option<i32> {
    let total: usize = parts.values().map(|s| s.buffer.bytes()).sum();
    if total <= limits.max_buffered_bytes {
        return None;
    }
    parts.iter().filter(|(_, s)| !s.buffer.is_empty()).max_by_key(|(p, s)| (s.buffer.bytes(), -**p)).map(|(p, _)| *p)
}

/// The live files whose reward ids refill a taken-over partition's replay
/// filter, in the order to read them: the partition's own files (named
/// `<prefix>…`, by offsets) newest first, then compacted files (which may
/// hold its older rows).
pub(crate) fn replay_filter_sources<'a>(paths: impl IntoIterator<Item = &'a str>, prefix: &str) -> Vec<String> {
    let name_of = |path: &str| path.rsplit('/').next().unwrap_or(path).to_string();
    let paths: Vec<&str> = paths.into_iter().collect();
    let mut own: Vec<String> = paths.iter().filter(|p| name_of(p).starts_with(prefix)).map(|p| p.to_string()).collect();
    own.sort_by_key(|p| std::cmp::Reverse(name_of(p)));
    own.extend(paths.iter().filter(|p| name_of(p).starts_with("compacted-")).map(|p| p.to_string()));
    own
}

/// Per partition: how far manifests and dead letters are published (stored
/// in the lake's state directory, see [`marker_path`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct PublishedMarker {
    /// Last commit (table version) of the partition whose outputs are all
    /// acknowledged.
    pub(crate) through_seq: Option<u64>,
    /// The last source offset that commit covered: when the table's `txn`
    /// for the partition still says this, nothing is left to publish.
    #[serde(default)]
    pub(crate) through_offset: Option<i64>,
    /// Output end offsets after that: later outputs lie beyond them.
    pub(crate) ends: TopicOffsets,
}

/// Where the publication progress of the partition with file prefix
/// `prefix` is kept.
pub(crate) fn marker_path(prefix: &str) -> String {
    format!("{STATE_DIR}/published/{prefix}.json")
}

/// What a new owner of a partition must publish, from its progress marker
/// and the table's last committed offset for it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Publication {
    /// Every commit is announced.
    UpToDate,
    /// Nothing was ever announced (no marker: it is always written before
    /// the first announcement): write a marker, then announce every commit.
    Everything,
    /// Commits after `after_seq` may be unannounced: announce those whose
    /// outputs are not found on the output topics from `ends` on.
    Since {
        /// Last commit known to be announced.
        after_seq: Option<u64>,
        /// Output ends when it was; read back from there.
        ends: TopicOffsets,
    },
}

/// Decides [`Publication`] for a take-over.
pub(crate) fn publication(marker: Option<PublishedMarker>, committed: Option<i64>) -> Publication {
    match marker {
        None => Publication::Everything,
        Some(m) if m.through_offset == committed => Publication::UpToDate,
        Some(m) => Publication::Since { after_seq: m.through_seq, ends: m.ends },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RollLimits {
        RollLimits {
            max_rows: 3,
            max_bytes: 1_000,
            max_age: Duration::from_secs(55),
            idle: Duration::from_secs(10),
            max_buffered_bytes: 2_000,
        }
    }

    fn state(previous: Option<i64>) -> PartitionState {
        PartitionState::resuming_after(previous, RecentIds::new(10))
    }

    #[test]
    fn a_taken_over_partition_takes_the_next_offset_drops_committed_ones_and_seeks_back_over_gaps() {
        let l = limits();
        let mut s = state(Some(41));
        assert_eq!(s.arrive(40, None, Some(b"x"), 0, &l), Arrival::AlreadyCommitted);
        assert_eq!(s.arrive(41, None, Some(b"x"), 0, &l), Arrival::AlreadyCommitted);
        assert_eq!(s.arrive(44, None, Some(b"x"), 0, &l), Arrival::Gap { expected: 42 });
        assert!(s.buffer.is_empty(), "neither a committed record nor one past a gap is buffered");
        assert_eq!(s.arrive(42, Some(b"k"), Some(b"x"), 7, &l), Arrival::Buffered { roll: None });
        assert_eq!(s.arrive(43, None, Some(b"y"), 8, &l), Arrival::Buffered { roll: None });
        assert_eq!(s.arrive(44, None, Some(b"z"), 9, &l), Arrival::Buffered { roll: Some("rows") });
        assert_eq!(s.buffer.range(), Some((42, 44)));
        assert_eq!(s.buffer.timestamps(), &[7, 8, 9]);
    }

    #[test]
    fn a_partition_never_committed_starts_at_whatever_offset_comes_first() {
        let mut s = state(None);
        assert_eq!(s.arrive(17, None, Some(b"x"), 0, &limits()), Arrival::Buffered { roll: None });
        assert_eq!(s.next_offset, Some(18));
        assert_eq!(s.arrive(19, None, Some(b"x"), 0, &limits()), Arrival::Gap { expected: 18 });
    }

    #[test]
    fn a_buffer_rolls_on_bytes() {
        let mut s = state(None);
        let big = vec![0u8; 999];
        assert_eq!(s.arrive(0, None, Some(&big), 0, &limits()), Arrival::Buffered { roll: None });
        assert_eq!(s.arrive(1, None, Some(b"x"), 0, &limits()), Arrival::Buffered { roll: Some("bytes") });
    }

    #[test]
    fn buffers_fall_due_on_age_or_idleness_and_the_largest_goes_first_over_the_memory_cap() {
        let l = limits();
        let mut parts = HashMap::new();
        for p in 0..3 {
            let mut s = state(None);
            s.arrive(0, None, Some(&vec![0u8; 300 * (p as usize + 1)]), 0, &l);
            parts.insert(p, s);
        }
        parts.insert(3, state(Some(5))); // empty: never due
        let t0 = parts[&0].buffer.first_at.unwrap();
        assert!(due(&parts, &l, t0).is_empty());
        // Partition 2 saw its last record recently, the others did not.
        let later = t0 + Duration::from_secs(11);
        parts.get_mut(&2).unwrap().buffer.last_at = Some(later);
        assert_eq!(due(&parts, &l, later), vec![(0, "idle"), (1, "idle")]);
        assert_eq!(due(&parts, &l, t0 + Duration::from_secs(56)), vec![(0, "age"), (1, "age"), (2, "age")]);
        // 300 + 600 + 900 = 1800 bytes: under the 2000 cap.
        assert_eq!(over_memory_cap(&parts, &l), None);
        parts.get_mut(&0).unwrap().arrive(1, None, Some(&[0u8; 300]), 0, &l);
        assert_eq!(over_memory_cap(&parts, &l), Some(2), "over the cap: the largest buffer");
    }

    #[test]
    fn the_replay_filter_reads_the_partitions_own_files_newest_first_then_compacted_ones() {
        use flywheel_lake::table::{file_name, file_prefix};
        let name = |p: i32, first: i64, last: i64| file_name("rewards", p, first, last).unwrap();
        let live = [
            format!("rewards/tenant=a/date=2026-11-30/hour=1/{}", name(0, 0, 9)),
            format!("rewards/tenant=a/date=2026-11-30/hour=1/{}", name(1, 0, 4)),
            format!("rewards/tenant=a/date=2026-11-30/hour=2/{}", name(0, 10, 19)),
            "rewards/tenant=a/date=2026-11-29/hour=5/compacted-dd.parquet".to_string(),
        ];
        let order = replay_filter_sources(live.iter().map(String::as_str), &file_prefix("rewards", 0).unwrap());
        assert_eq!(order, vec![live[2].clone(), live[0].clone(), live[3].clone()]);
    }

    #[test]
    fn a_new_owner_publishes_everything_nothing_or_what_followed_its_markers_commit() {
        assert_eq!(publication(None, Some(9)), Publication::Everything);
        assert_eq!(publication(None, None), Publication::Everything);
        let ends: TopicOffsets = [("shards".to_string(), [(0, 12)].into())].into();
        let marker = PublishedMarker { through_seq: Some(4), through_offset: Some(9), ends: ends.clone() };
        assert_eq!(publication(Some(marker.clone()), Some(9)), Publication::UpToDate);
        assert_eq!(publication(Some(marker), Some(15)), Publication::Since { after_seq: Some(4), ends });
        // A marker written before the first announcement, nothing committed since.
        let first = PublishedMarker { through_seq: None, through_offset: None, ends: TopicOffsets::new() };
        assert_eq!(publication(Some(first), None), Publication::UpToDate);
        // Markers of earlier releases have no through_offset: they read back.
        let old: PublishedMarker = serde_json::from_str(r#"{"through_seq":3,"ends":{}}"#).unwrap();
        assert!(matches!(publication(Some(old), Some(9)), Publication::Since { after_seq: Some(3), .. }));
    }
}
