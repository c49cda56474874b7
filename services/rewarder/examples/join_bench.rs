//! Rewarder core throughput on one core: decode → event-time join and
//! rolling metrics (default 1 min and 1 h windows) → encode,
//! over a realistic mix (every suggestion shown; 80 % get an outcome; 10 % a
//! follow-up; 5 % a rating). Run with `make bench`; prints medians.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use flywheel_core::codec::{decode, encode};
use flywheel_core::records::*;
use flywheel_rewarder::join::{Emitted, JoinConfig, PartitionJoiner};
use flywheel_rewarder::reward_fn::RewardFunction;

#[path = "common/bench_stream.rs"]
mod bench_stream;
use bench_stream::bench_stream;

const SUGGESTIONS: usize = 1_000_000;
const RUNS: usize = 5;

fn main() {
    let events = bench_stream(SUGGESTIONS);
    let encoded: Vec<Vec<u8>> = events.iter().map(|e| encode(e).expect("encode")).collect();
    drop(events);

    // Side by side in one process, interleaved run by run so drift in the
    // shared machine's load hits both alike: the join alone, then with
    // rolling metrics.
    let configs = [
        ("join only", JoinConfig { metrics_windows_ms: Vec::new(), ..JoinConfig::default() }),
        ("join + metrics (1 min, 1 h)", JoinConfig::default()),
    ];
    let mut rates = vec![Vec::new(); configs.len()];
    let mut rewards_out = 0;
    for _ in 0..RUNS {
        for (i, (_, config)) in configs.iter().enumerate() {
            let (rate, rewards) = measure(&encoded, config);
            rates[i].push(rate);
            rewards_out = rewards;
        }
    }
    println!("join_bench: {} events ({SUGGESTIONS} suggestions), {RUNS} runs each, one thread", encoded.len());
    for ((label, _), rates) in configs.iter().zip(&mut rates) {
        rates.sort_by(f64::total_cmp);
        println!(
            "  decode → {label:<28} → encode {:>10.0} events/s (median; min {:.0}, max {:.0})",
            rates[RUNS / 2],
            rates[0],
            rates[RUNS - 1]
        );
    }
    println!("  rewards emitted per run {rewards_out:>10} (the rest still open at the end of the stream)");
}

/// Events per second of one run, and the rewards it emitted.
fn measure(encoded: &[Vec<u8>], config: &JoinConfig) -> (f64, u64) {
    let mut joiner = PartitionJoiner::new("interactions", 0, config.clone(), RewardFunction::default());
    let mut out = Vec::new();
    let mut bytes_out = 0usize;
    let started = Instant::now();
    for (offset, bytes) in encoded.iter().enumerate() {
        let event: Interaction = decode(bytes).expect("decode");
        joiner.process(offset as i64, event, &mut out);
        for e in out.drain(..) {
            bytes_out += match e {
                Emitted::Reward(r) => encode(r.as_ref()).expect("encode reward").len(),
                Emitted::Metrics(m) => encode(m.as_ref()).expect("encode metrics").len(),
                Emitted::Late { event, .. } | Emitted::Orphan { event, .. } => {
                    encode(event.as_ref()).expect("encode event").len()
                }
            };
        }
    }
    let rate = encoded.len() as f64 / started.elapsed().as_secs_f64();
    std::hint::black_box(bytes_out);
    (rate, joiner.counters().rewards)
}
