//! Codec throughput: encode and decode of realistic interaction records.
//! Run with `make bench`; prints medians of repeated runs, side by side.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use flywheel_core::codec::{decode, encode};
use flywheel_core::records::Interaction;

const RECORDS: usize = 50_000;
const RUNS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures");
    let fixtures: Vec<Interaction> = std::fs::read_dir(&dir)
        .expect("fixtures folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("interaction.")))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("fixture parses"))
        .collect();
    let records: Vec<Interaction> = (0..RECORDS)
        .map(|i| {
            let mut r = fixtures[i % fixtures.len()].clone();
            r.event_id = format!("00000000-0000-4000-8000-{i:012}");
            r
        })
        .collect();
    let (mut enc, mut dec, mut json) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes_total = 0usize;
    for _ in 0..RUNS {
        let t = Instant::now();
        let encoded: Vec<Vec<u8>> = records.iter().map(|r| encode(r).expect("encode")).collect();
        enc.push(RECORDS as f64 / t.elapsed().as_secs_f64());
        bytes_total = encoded.iter().map(Vec::len).sum();
        let t = Instant::now();
        for b in &encoded {
            std::hint::black_box(decode::<Interaction>(b).expect("decode"));
        }
        dec.push(RECORDS as f64 / t.elapsed().as_secs_f64());
        // Reference point in the same run: serde_json of the same records.
        let t = Instant::now();
        for r in &records {
            let s = serde_json::to_vec(r).expect("json");
            std::hint::black_box(serde_json::from_slice::<Interaction>(&s).expect("json back"));
        }
        json.push(RECORDS as f64 / t.elapsed().as_secs_f64());
    }
    println!("codec_bench: {RECORDS} interaction records x {RUNS} runs, medians");
    println!("  avro encode        {:>10.0} records/s", median(enc.clone()));
    println!("  avro decode        {:>10.0} records/s", median(dec.clone()));
    println!("  json encode+decode {:>10.0} records/s (reference)", median(json));
    println!("  mean avro size     {:>10.1} bytes/record", bytes_total as f64 / RECORDS as f64);
}
