//! What the service decides per input partition without touching Kafka:
//! which resume of a partition still counts, when partitions are due for a
//! checkpoint, which skips a checkpoint carries, how outputs are named and
//! tagged, and which outputs read back after a checkpoint a partition's replay
//! must not produce again.

use std::collections::HashMap;
use std::time::Instant;

use flywheel_core::codec::decode;
use flywheel_core::records::{DeadLetter, Interaction, Reward, RewardMetrics};

use crate::join::PartitionJoiner;
use crate::window_metrics::metrics_record_id;

/// Kafka header on every output: `<input topic>/<partition>/<offset>` of the
/// input record it derives from (a late event's or orphan's own record, the
/// record that closed a reward or a metrics window). Late events carry no
/// lineage in their body, so this is how a read-back tells which partition
/// wrote them, and which of several copies of one event it is.
pub(crate) const SOURCE_HEADER: &str = "flywheel-source";

/// Kafka header on every output: the input offset whose processing emitted
/// it. A replay regenerates the output while processing that offset.
pub(crate) const EMITTED_AT_HEADER: &str = "flywheel-emitted-at";

/// The topic names the service reads and writes.
pub(crate) struct Topics {
    pub(crate) input: String,
    pub(crate) rewards: String,
    pub(crate) late: String,
    pub(crate) dead: String,
    pub(crate) metrics: String,
}

/// An assigned, resumed partition.
pub(crate) struct PartitionWork {
    pub(crate) joiner: PartitionJoiner,
    /// The first input offset not processed yet.
    pub(crate) next_offset: i64,
    /// Records processed (or idle advances that emitted) since the last checkpoint.
    pub(crate) since_checkpoint: u64,
    pub(crate) last_record_at: Instant,
    /// Outputs already written by a previous run after the checkpoint, with
    /// the input offset whose processing emits each.
    pub(crate) already_written: HashMap<String, i64>,
}

/// Where an output came from: its input partition, the input record it
/// derives from, and the offset whose processing emitted it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source {
    pub(crate) partition: i32,
    pub(crate) record: i64,
    pub(crate) emitted_at: i64,
}

impl Source {
    /// The [`SOURCE_HEADER`] value for an output of `input`.
    pub(crate) fn tag(&self, input: &str) -> String {
        format!("{input}/{}/{}", self.partition, self.record)
    }
}

/// Reads a [`SOURCE_HEADER`] value back: (input topic, partition, record).
/// The topic may itself contain `/`, so the numbers are taken from the right.
pub(crate) fn parse_source_tag(tag: &str) -> Option<(String, i32, i64)> {
    let (rest, record) = tag.rsplit_once('/')?;
    let (input, partition) = rest.rsplit_once('/')?;
    Some((input.to_string(), partition.parse().ok()?, record.parse().ok()?))
}

/// The ids under which outputs are remembered as already written. Producing
/// and reading back must name an output alike, or a replay repeats it.
pub(crate) mod output_id {
    /// A reward, by its deterministic reward id.
    pub(crate) fn reward(reward_id: &str) -> String {
        format!("r:{reward_id}")
    }

    /// A late event, by its own input offset (copies of one event differ there).
    pub(crate) fn late(offset: i64) -> String {
        format!("l:@{offset}")
    }

    /// A late event written before the source header existed: by event id.
    pub(crate) fn late_by_event(event_id: &str) -> String {
        format!("l:{event_id}")
    }

    /// A dead letter, by the input offset it rejects.
    pub(crate) fn dead_letter(offset: i64) -> String {
        format!("d:{offset}")
    }
}

/// Partitions being resumed on a thread of their own. Each resume is
/// numbered, so one that a rebalance overtook (the partition revoked, and
/// perhaps assigned again meanwhile) is recognised and its result dropped.
#[derive(Debug, Default)]
pub(crate) struct Resumes {
    attempts: u64,
    /// Partition → (attempt, first offset to fetch again once resumed).
    pending: HashMap<i32, (u64, i64)>,
}

impl Resumes {
    /// Starts a resume of `partition`, to be fetched again from `offset`
    /// once done; `None` when one is already under way.
    pub(crate) fn start(&mut self, partition: i32, offset: i64) -> Option<u64> {
        if self.pending.contains_key(&partition) {
            return None;
        }
        self.attempts += 1;
        self.pending.insert(partition, (self.attempts, offset));
        Some(self.attempts)
    }

    /// Ends resume `attempt` of `partition`: the offset to fetch again from,
    /// or `None` when the partition was revoked since (a newer attempt may run).
    pub(crate) fn finish(&mut self, partition: i32, attempt: u64) -> Option<i64> {
        let (current, offset) = *self.pending.get(&partition)?;
        if current != attempt {
            return None;
        }
        self.pending.remove(&partition);
        Some(offset)
    }

    /// Forgets a revoked partition's resume; a thread still running it is
    /// discarded when it ends.
    pub(crate) fn revoke(&mut self, partition: i32) {
        self.pending.remove(&partition);
    }
}

/// The partitions due for a checkpoint, in order: those with `every_records`
/// records since their last one, and, once the interval is up (`time_due`),
/// every partition with any. A partition without new records is never due.
pub(crate) fn due_for_checkpoint(
    since_checkpoint: impl IntoIterator<Item = (i32, u64)>,
    every_records: u64,
    time_due: bool,
) -> Vec<i32> {
    let mut due: Vec<i32> = since_checkpoint
        .into_iter()
        .filter(|(_, n)| *n >= every_records || (time_due && *n > 0))
        .map(|(p, _)| p)
        .collect();
    due.sort_unstable();
    due
}

/// The skips a checkpoint at `next_offset` carries, sorted. With
/// deterministic outputs, an id whose emitting offset the replay has passed
/// without regenerating it never will be (a reward function change renames
/// rewards): it is forgotten here.
pub(crate) fn skips_to_carry(
    already_written: &mut HashMap<String, i64>,
    next_offset: i64,
    deterministic: bool,
) -> Vec<(String, i64)> {
    if deterministic {
        already_written.retain(|_, emitted_at| *emitted_at >= next_offset);
    }
    let mut skip: Vec<(String, i64)> = already_written.iter().map(|(id, o)| (id.clone(), *o)).collect();
    skip.sort();
    skip
}

/// Outputs of releases before the source header (late events, dead letters)
/// say neither partition nor emitting offset: they are kept until the replay
/// passes the furthest offset known to have emitted an output (forever when
/// none is known).
pub(crate) fn place_unplaced(seen: &mut HashMap<String, i64>, unplaced: Vec<String>) {
    let horizon = seen.values().copied().max().unwrap_or(i64::MAX);
    for id in unplaced {
        seen.entry(id).or_insert(horizon);
    }
}

/// The id of an output read back from `topic` if input `partition` produced
/// it, with the input offset that emitted it when known. `source` and
/// `emitted_at` are its [`SOURCE_HEADER`] and [`EMITTED_AT_HEADER`]; records
/// that do not decode are someone else's and ignored.
pub(crate) fn output_id_for(
    topics: &Topics,
    partition: i32,
    topic: &str,
    payload: &[u8],
    source: Option<&str>,
    emitted_at: Option<&str>,
) -> Option<(String, Option<i64>)> {
    let source = source.and_then(parse_source_tag);
    if let Some((input, p, _)) = &source
        && (*input != topics.input || *p != partition)
    {
        return None;
    }
    let emitted_at = emitted_at.and_then(|v| v.parse::<i64>().ok());
    if topic == topics.rewards {
        let r: Reward = decode(payload).ok()?;
        (r.lineage.topic == topics.input && r.lineage.partition == partition)
            .then(|| (output_id::reward(&r.reward_id), Some(r.lineage.last_offset)))
    } else if topic == topics.late {
        let e: Interaction = decode(payload).ok()?;
        let id = source.map_or_else(|| output_id::late_by_event(&e.event_id), |(_, _, record)| output_id::late(record));
        Some((id, emitted_at))
    } else if topic == topics.metrics {
        let m: RewardMetrics = decode(payload).ok()?;
        (m.source_partition == partition).then(|| (metrics_record_id(&m), Some(m.emitted_at_offset)))
    } else {
        let d: DeadLetter = decode(payload).ok()?;
        (d.service == "rewarder" && d.source.topic == topics.input && d.source.partition == partition)
            .then(|| (output_id::dead_letter(d.source.offset), emitted_at))
    }
}

#[cfg(test)]
mod tests {
    use flywheel_core::codec::encode;
    use flywheel_core::records::{InteractionPayload, SourcePosition, SuggestionShown};

    use super::*;

    #[test]
    fn a_resume_overtaken_by_a_rebalance_is_dropped() {
        let mut r = Resumes::default();
        let first = r.start(0, 40).unwrap();
        assert_eq!(r.start(0, 41), None, "one resume per partition at a time");
        let other = r.start(1, 7).unwrap();
        // Revoked and assigned again while the first resume ran.
        r.revoke(0);
        let second = r.start(0, 45).unwrap();
        assert_eq!(r.finish(0, first), None);
        assert_eq!(r.finish(0, second), Some(45));
        assert_eq!(r.finish(0, second), None, "taken in once");
        assert_eq!(r.finish(1, other), Some(7));
        // A partition revoked for good: its resume is dropped when it ends.
        let last = r.start(2, 0).unwrap();
        r.revoke(2);
        assert_eq!(r.finish(2, last), None);
    }

    #[test]
    fn due_by_count_always_and_by_time_only_with_new_records() {
        let parts = [(3, 0), (1, 10), (2, 1), (0, 9)];
        assert_eq!(due_for_checkpoint(parts, 10, false), vec![1]);
        assert_eq!(due_for_checkpoint(parts, 10, true), vec![0, 1, 2]);
        assert!(due_for_checkpoint([(0, 0)], 1, true).is_empty());
    }

    #[test]
    fn a_deterministic_checkpoint_forgets_skips_the_replay_has_passed() {
        let written = || HashMap::from([("r:b".to_string(), 7), ("r:a".to_string(), 5), ("l:@4".to_string(), 4)]);
        let mut w = written();
        assert_eq!(skips_to_carry(&mut w, 5, true), vec![("r:a".into(), 5), ("r:b".into(), 7)]);
        assert_eq!(w.len(), 2);
        // With idle advance, outputs depend on timing: nothing is forgotten.
        let mut w = written();
        assert_eq!(skips_to_carry(&mut w, 5, false).len(), 3);
    }

    #[test]
    fn unplaced_ids_wait_for_the_furthest_known_emitting_offset() {
        let mut seen = HashMap::from([("r:a".to_string(), 12), ("r:b".to_string(), 30)]);
        place_unplaced(&mut seen, vec!["d:3".into(), "r:a".into()]);
        assert_eq!((seen["d:3"], seen["r:a"]), (30, 12));
        let mut none = HashMap::new();
        place_unplaced(&mut none, vec!["l:e1".into()]);
        assert_eq!(none["l:e1"], i64::MAX);
    }

    #[test]
    fn source_tags_round_trip_and_topics_may_contain_slashes() {
        let tag = Source { partition: 4, record: 17, emitted_at: 20 }.tag("env/interactions");
        assert_eq!(tag, "env/interactions/4/17");
        assert_eq!(parse_source_tag(&tag), Some(("env/interactions".into(), 4, 17)));
        assert_eq!(parse_source_tag("interactions/x/17"), None);
        assert_eq!(parse_source_tag("17"), None);
    }

    fn topics() -> Topics {
        Topics {
            input: "interactions".into(),
            rewards: "rewards".into(),
            late: "interactions-late".into(),
            dead: "dead-letters".into(),
            metrics: "reward-metrics".into(),
        }
    }

    fn late_event() -> Vec<u8> {
        let event = Interaction {
            event_id: "e1".into(),
            event_time: 1_795_424_400_000,
            received_time: 1_795_424_400_000,
            tenant: "acme".into(),
            user_id: "u1".into(),
            session_id: None,
            suggestion_id: "s1".into(),
            payload: InteractionPayload::Shown(SuggestionShown {
                model_id: "m".into(),
                adapter_version: None,
                experiment_arm: None,
                surface: "editor".into(),
                prompt: "fn main() {".into(),
                completion: "}".into(),
                behavior_logprob: None,
                latency_ms: 40,
            }),
            attributes: Default::default(),
        };
        encode(&event).unwrap()
    }

    #[test]
    fn read_back_names_outputs_as_the_replay_does_and_ignores_other_partitions() {
        let t = topics();
        let late = late_event();
        // Tagged: by its own input offset, with the offset that emitted it.
        let id = output_id_for(&t, 2, &t.late, &late, Some("interactions/2/9"), Some("11"));
        assert_eq!(id, Some((output_id::late(9), Some(11))));
        // Another partition's, or another input topic's: not ours.
        assert_eq!(output_id_for(&t, 2, &t.late, &late, Some("interactions/3/9"), Some("11")), None);
        assert_eq!(output_id_for(&t, 2, &t.late, &late, Some("other/2/9"), Some("11")), None);
        // Untagged (an older release): by event id, emitting offset unknown.
        assert_eq!(output_id_for(&t, 2, &t.late, &late, None, None), Some((output_id::late_by_event("e1"), None)));
        // A dead letter is ours when the rewarder wrote it for this partition.
        let dead = |service: &str, partition| DeadLetter {
            service: service.into(),
            reason_code: "orphan_event".into(),
            reason: String::new(),
            source: SourcePosition { topic: "interactions".into(), partition, offset: 5 },
            original_key: None,
            original_value: None,
            failed_at: 0,
        };
        let ours = encode(&dead("rewarder", 2)).unwrap();
        assert_eq!(output_id_for(&t, 2, &t.dead, &ours, None, Some("6")), Some((output_id::dead_letter(5), Some(6))));
        assert_eq!(output_id_for(&t, 2, &t.dead, &encode(&dead("lake-writer", 2)).unwrap(), None, None), None);
        assert_eq!(output_id_for(&t, 2, &t.dead, &encode(&dead("rewarder", 1)).unwrap(), None, None), None);
        // Not a record of the topic's kind: ignored.
        assert_eq!(output_id_for(&t, 2, &t.rewards, &late, None, None), None);
    }
}
