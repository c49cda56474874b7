//! The rewarder (in progress): the deterministic core that turns a
//! partition's interaction events into one reward per shown suggestion.
//! The Kafka service loop, checkpointing and rolling metrics build on it.

pub mod join;
pub mod reward_fn;
