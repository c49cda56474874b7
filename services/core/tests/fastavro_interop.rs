//! Cross-library check of the wire format: records written by this codec are
//! read by fastavro with the specification's fingerprint check, and records
//! fastavro writes (its own schemaless encoding behind its own single-object
//! header) are read by this codec. The Python side is `fastavro_interop.py`;
//! it runs in the project's `.venv` (created by `make setup`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use flywheel_core::codec::{AvroRecord, Codec, RecordKind, encode};
use flywheel_core::records::*;
use serde_json::{Value, json};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Runs the fastavro script in `mode` over JSON-lines requests; panics with
/// its stderr when it fails. No `.venv` is a failure, not a skip.
fn fastavro(mode: &str, requests: &[Value]) -> Vec<Value> {
    let root = workspace();
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make setup` (or `make python`) to create the .venv with fastavro",
        python.display()
    );
    let mut child = Command::new(&python)
        .arg(root.join("services/core/tests/fastavro_interop.py"))
        .arg(root.join("schemas"))
        .arg(mode)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    let mut input = String::new();
    for r in requests {
        input.push_str(&r.to_string());
        input.push('\n');
    }
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    // A hard limit: the script takes well under a second.
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let Ok(out) = finished.recv_timeout(Duration::from_secs(120)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("fastavro {mode} did not finish within 120 s");
    };
    let out = out.unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "fastavro {mode} failed ({}): {}\n(if fastavro is missing, run `make setup`)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers.len(), requests.len(), "one answer per request");
    answers
}

/// Every fixture, as (kind, JSON form).
fn fixtures() -> Vec<(RecordKind, Value)> {
    let dir = workspace().join("schemas/fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let stem = path.file_name().unwrap().to_str().unwrap().split('.').next().unwrap().to_string();
            let kind = RecordKind::ALL.into_iter().find(|k| k.file_stem() == stem).unwrap();
            (kind, serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap())
        })
        .collect()
}

/// A shown event whose double would come back one ULP off through a lossy path.
fn tricky_shown() -> Interaction {
    let mut record: Interaction = serde_json::from_value(
        serde_json::from_str(
            &std::fs::read_to_string(workspace().join("schemas/fixtures/interaction.shown.json")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    if let InteractionPayload::Shown(s) = &mut record.payload {
        s.behavior_logprob = Some(-0.1 - 0.2);
        s.prompt = "naïve 漢字 \u{1F600} \"quoted\"\n".into();
    }
    record.attributes.insert("zeta".into(), "last".into());
    record.attributes.insert("alpha".into(), "first".into());
    record
}

#[test]
fn fastavro_reads_what_we_write_with_the_specifications_fingerprint() {
    let codec = Codec::global();
    let mut written: Vec<(RecordKind, Vec<u8>)> =
        fixtures().into_iter().map(|(kind, json)| (kind, codec.encode_json(kind, &json).unwrap())).collect();
    written.push((RecordKind::Interaction, encode(&tricky_shown()).unwrap()));
    let requests: Vec<Value> =
        written.iter().map(|(kind, bytes)| json!({"kind": kind.file_stem(), "hex": hex(bytes)})).collect();
    let answers = fastavro("read", &requests);

    for ((kind, bytes), answer) in written.iter().zip(&answers) {
        // fastavro checked the header against its own canonical form; it is ours too.
        assert_eq!(answer["fingerprint"], hex(&codec.fingerprint(*kind)), "{kind}");
        // fastavro's re-encoding of what it decoded is byte-identical: it read every value as written.
        assert_eq!(answer["hex"].as_str().unwrap(), hex(bytes), "{kind}: fastavro re-encoded differently");
        assert_eq!(codec.decode_to_json(&unhex(answer["hex"].as_str().unwrap())).unwrap().0, *kind);
    }
    assert_eq!(answers[0]["fingerprint"], "ab78fefa1784d664", "dead_letter, as fastavro computes it");

    // Spot checks of decoded values in fastavro's own terms.
    let shown = answers.last().unwrap();
    let record = tricky_shown();
    assert_eq!(shown["fingerprint"], "4f69ffe6d604f67a");
    assert_eq!(shown["json"]["event_time"], json!(record.event_time), "timestamp-millis read as the same instant");
    let payload = &shown["json"]["payload"]["flywheel.SuggestionShown"];
    assert_eq!(payload["behavior_logprob"].as_f64(), Some(-0.1 - 0.2));
    assert_eq!(payload["prompt"], "naïve 漢字 \u{1F600} \"quoted\"\n");
    assert_eq!(shown["json"]["attributes"], serde_json::to_value(&record.attributes).unwrap());
    assert_eq!(shown["json"]["attributes"]["alpha"], "first");
}

fn decode_as<R: AvroRecord + serde::Serialize>(codec: &Codec, bytes: &[u8]) -> Value {
    serde_json::to_value(codec.decode::<R>(bytes).unwrap()).unwrap()
}

#[test]
fn we_read_what_fastavro_writes() {
    let codec = Codec::global();
    let mut cases = fixtures();
    cases.push((RecordKind::Interaction, serde_json::to_value(tricky_shown()).unwrap()));
    let requests: Vec<Value> =
        cases.iter().map(|(kind, json)| json!({"kind": kind.file_stem(), "json": json})).collect();
    let answers = fastavro("write", &requests);
    for ((kind, json), answer) in cases.iter().zip(&answers) {
        let bytes = unhex(answer["hex"].as_str().unwrap());
        assert_eq!(&bytes[2..10], &codec.fingerprint(*kind), "{kind}: fastavro's fingerprint is the one we write");
        let back = match kind {
            RecordKind::Interaction => decode_as::<Interaction>(codec, &bytes),
            RecordKind::Reward => decode_as::<Reward>(codec, &bytes),
            RecordKind::RewardMetrics => decode_as::<RewardMetrics>(codec, &bytes),
            RecordKind::ShardManifest => decode_as::<ShardManifest>(codec, &bytes),
            RecordKind::TriggerDecision => decode_as::<TriggerDecision>(codec, &bytes),
            RecordKind::TrainRequest => decode_as::<TrainRequest>(codec, &bytes),
            RecordKind::ModelCandidate => decode_as::<ModelCandidate>(codec, &bytes),
            RecordKind::RegistryEntry => decode_as::<RegistryEntry>(codec, &bytes),
            RecordKind::DeadLetter => decode_as::<DeadLetter>(codec, &bytes),
        };
        assert_eq!(&back, json, "{kind}: what fastavro wrote reads back as the values it was given");
    }
}
