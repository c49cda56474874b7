//! `flywheel model import-gguf`: a Llama-family GGUF file (llama.cpp's
//! format, how most small open models are published) → the Hugging Face
//! model directory the trainer loads: `config.json`, `model.safetensors`,
//! `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
//! `generation_config.json`.
//!
//! Quantised weights are expanded to bf16 (default) or f32. The result is
//! exactly as good as the quantised file and no better: a 4-bit model keeps
//! its 4-bit rounding, only stored at full precision so the f32 trainer can
//! read it and LoRA can train on top of it.
//!
//! What the conversion has to undo: GGUF lists dimensions innermost first
//! (`ne[]`), so a shape is reversed; llama.cpp's converter interleaves the
//! rows of each q/k head (its RoPE rotates adjacent pairs, HF's rotates
//! halves), which `unpermute_rows` reverses; a file without an `output`
//! tensor ties the LM head to the embeddings.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use crate::TrainerError;
use crate::arch::LlamaConfig;
use crate::gguf::{GgufFile, Header, Value};
use crate::model::Model;

/// Precision of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightDtype {
    /// bfloat16: half the size; the trainer computes in f32 either way.
    #[default]
    Bf16,
    /// IEEE single: every dequantised value kept exactly.
    F32,
}

impl WeightDtype {
    fn torch_name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F32 => "float32",
        }
    }
}

/// What an import wrote, for the CLI to print and tests to check.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The output directory.
    pub dir: PathBuf,
    /// File names written into it.
    pub files: Vec<String>,
    /// The model's config (as the trainer reads it back).
    pub config: LlamaConfig,
    /// Precision of `model.safetensors`.
    pub dtype: WeightDtype,
    /// Number of weights.
    pub parameters: usize,
    /// How many tensors of each ggml type the file held.
    pub source_types: BTreeMap<String, usize>,
    /// Tokens in `tokenizer.json`.
    pub vocab: usize,
    /// BPE merges in `tokenizer.json`.
    pub merges: usize,
    /// `tokenizer.ggml.pre`, the pre-tokenizer the file asked for.
    pub pre_tokenizer: String,
    /// Whether `tokenizer_config.json` carries a chat template.
    pub chat_template: bool,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        let types: Vec<String> = self.source_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        writeln!(f, "wrote {}: {}", self.dir.display(), self.files.join(", "))?;
        writeln!(
            f,
            "  model: {} layers, hidden {}, FFN {}, {} heads / {} kv heads, head_dim {}, vocabulary {}, rope_theta {}, {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.kv_heads(),
            c.head_dim(),
            c.vocab_size,
            c.rope_theta,
            if c.tie_word_embeddings { "tied embeddings" } else { "separate LM head" }
        )?;
        writeln!(
            f,
            "  weights: {:.1}M parameters from {} tensors ({}), expanded to {} (quantisation error is kept, not undone)",
            self.parameters as f64 / 1e6,
            self.source_types.values().sum::<usize>(),
            types.join(", "),
            self.dtype.torch_name()
        )?;
        write!(
            f,
            "  tokenizer: byte-level BPE, {} tokens, {} merges, pre-tokenizer {}{}",
            self.vocab,
            self.merges,
            self.pre_tokenizer,
            if self.chat_template { ", chat template" } else { ", no chat template" }
        )
    }
}

fn unsupported(file: &Path, what: impl std::fmt::Display) -> TrainerError {
    TrainerError::Unsupported(format!("{}: {what}", file.display()))
}

fn invalid(file: &Path, what: impl std::fmt::Display) -> TrainerError {
    TrainerError::Format(format!("{}: {what}", file.display()))
}

/// Typed access to the metadata, with errors that name the file and key.
struct Meta<'a> {
    file: &'a Path,
    header: &'a Header,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.header.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value, TrainerError> {
        self.get(key).ok_or_else(|| invalid(self.file, format!("GGUF metadata {key} is missing")))
    }

    fn count(&self, key: &str) -> Result<Option<usize>, TrainerError> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    unsupported(self.file, format!("{key} is a {}, expected one integer", v.type_name()))
                })
            })
            .transpose()
    }

    fn required_count(&self, key: &str) -> Result<usize, TrainerError> {
        self.required(key)?;
        Ok(self.count(key)?.unwrap_or_default())
    }

    /// A float, with an f32 written as its shortest decimal (1e-5, not
    /// 9.999999747378752e-6), as the HF config it came from had it.
    fn float(&self, key: &str) -> Result<Option<f64>, TrainerError> {
        self.get(key)
            .map(|v| match v {
                Value::F32(x) => x.to_string().parse::<f64>().map_err(|e| invalid(self.file, format!("{key}: {e}"))),
                other => other
                    .as_f64()
                    .ok_or_else(|| invalid(self.file, format!("{key} is a {}, expected a number", other.type_name()))),
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<&str>, TrainerError> {
        self.get(key)
            .map(|v| {
                v.as_str().ok_or_else(|| invalid(self.file, format!("{key} is a {}, expected a string", v.type_name())))
            })
            .transpose()
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>, TrainerError> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .and_then(|items| items.iter().map(Value::as_str).collect::<Option<Vec<&str>>>())
                    .ok_or_else(|| {
                        invalid(self.file, format!("{key} is a {}, expected an array of strings", v.type_name()))
                    })
            })
            .transpose()
    }
}

/// The hyper-parameters of a `llama` GGUF, read into the trainer's config.
fn read_config(meta: &Meta<'_>, tied: bool, vocab: usize) -> Result<LlamaConfig, TrainerError> {
    let arch = meta.string("general.architecture")?.unwrap_or("(missing)");
    if arch != "llama" {
        return Err(unsupported(
            meta.file,
            format!("architecture '{arch}' (supported: llama, which includes SmolLM, Llama 2/3 and Mistral)"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    if let Some(n) = meta.count(&key("expert_count"))?
        && n > 0
    {
        return Err(unsupported(meta.file, format!("mixture of experts ({n} experts)")));
    }
    if let Some(kind) = meta.string(&key("rope.scaling.type"))?
        && kind != "none"
    {
        return Err(unsupported(meta.file, format!("RoPE scaling '{kind}'")));
    }
    let hidden = meta.required_count(&key("embedding_length"))?;
    let heads = meta.required_count(&key("attention.head_count"))?;
    let kv_heads = meta.count(&key("attention.head_count_kv"))?.unwrap_or(heads);
    if heads == 0 || kv_heads == 0 {
        return Err(invalid(meta.file, format!("{heads} attention heads / {kv_heads} kv heads")));
    }
    let head_dim = meta.count(&key("attention.key_length"))?.unwrap_or(hidden / heads);
    if let Some(v) = meta.count(&key("attention.value_length"))?
        && v != head_dim
    {
        return Err(unsupported(meta.file, format!("value heads of {v} differ from key heads of {head_dim}")));
    }
    if let Some(rot) = meta.count(&key("rope.dimension_count"))?
        && rot != head_dim
    {
        return Err(unsupported(meta.file, format!("RoPE on {rot} of {head_dim} head dimensions (partial rotary)")));
    }
    if let Some(declared) = meta.count(&key("vocab_size"))?
        && declared != vocab
    {
        return Err(invalid(
            meta.file,
            format!("{} says {declared} but token_embd has {vocab} rows", key("vocab_size")),
        ));
    }
    let config = LlamaConfig {
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: meta.required_count(&key("feed_forward_length"))?,
        num_hidden_layers: meta.required_count(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: Some(head_dim),
        vocab_size: vocab,
        rms_norm_eps: meta.float(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: meta.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: None,
        tie_word_embeddings: tied,
        max_position_embeddings: meta.count(&key("context_length"))?.unwrap_or(2048),
    };
    config.check()?;
    Ok(config)
}

/// Where a GGUF tensor goes: its HF name and, for q/k projections, the
/// number of heads whose rows llama.cpp interleaved.
fn hf_tensor(name: &str, config: &LlamaConfig) -> Option<(String, Option<usize>)> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(hf) = fixed {
        return Some((hf.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, heads) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(config.num_attention_heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(config.kv_heads())),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), heads))
}

/// Reverses llama.cpp's q/k row order: within each head of `head_dim` rows
/// it stores row `2i + j` where HF has row `j·head_dim/2 + i` (j ∈ {0, 1}).
/// In numpy terms: `w.reshape(heads, head_dim/2, 2, cols).swapaxes(1, 2)`.
pub(crate) fn unpermute_rows(w: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>, TrainerError> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) || w.len() != rows * cols {
        return Err(TrainerError::Format(format!(
            "cannot split {rows} rows of {cols} into {heads} heads of even width"
        )));
    }
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = h * head_dim + 2 * i + j;
                let to = h * head_dim + j * half + i;
                out[to * cols..(to + 1) * cols].copy_from_slice(&w[from * cols..(from + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays a quiet NaN).
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

fn encode(values: &[f32], dtype: WeightDtype) -> Vec<u8> {
    match dtype {
        WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        WeightDtype::Bf16 => values.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(),
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Llama 3's split: contractions (any case), words with one leading
/// non-letter, numbers in groups of up to three, other symbols, newlines,
/// then other whitespace.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer (`tokenizer.json` form) and whether whole words in the
/// vocabulary skip BPE, for a `tokenizer.ggml.pre` name.
fn pre_tokenizer(file: &Path, pre: &str) -> Result<(Json, bool), TrainerError> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        // Each digit its own piece, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
            false,
        ),
        "gpt2" | "gpt-2" => (byte_level(true), false),
        // Llama 3: numbers in groups of up to three; a whole word found in
        // the vocabulary is taken as is (llama.cpp and HF both do so).
        "llama-bpe" | "llama3" | "llama-v3" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ]}),
            true,
        ),
        other => {
            return Err(unsupported(
                file,
                format!(
                    "tokenizer.ggml.pre '{other}' (supported: smollm, starcoder, refact, gpt2/gpt-2, llama-bpe/llama3)"
                ),
            ));
        }
    })
}

/// `tokenizer.json` and `tokenizer_config.json` built from the GGUF
/// tokenizer metadata, with counts for the report.
struct TokenizerFiles {
    tokenizer: Json,
    config: Json,
    vocab: usize,
    merges: usize,
    pre: String,
    chat_template: bool,
    /// Added tokens `(id, content)` to check after loading it back.
    added: Vec<(u32, String)>,
}

fn tokenizer_files(meta: &Meta<'_>, context: usize) -> Result<TokenizerFiles, TrainerError> {
    let model = meta.string("tokenizer.ggml.model")?.unwrap_or("(missing)");
    if model != "gpt2" {
        return Err(unsupported(
            meta.file,
            format!("tokenizer.ggml.model '{model}' (supported: gpt2, byte-level BPE; 'llama' is SentencePiece)"),
        ));
    }
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| invalid(meta.file, "GGUF metadata tokenizer.ggml.tokens is missing"))?;
    let merges = meta.strings("tokenizer.ggml.merges")?.unwrap_or_default();
    let types: Vec<i64> = match meta.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>())
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| invalid(meta.file, "tokenizer.ggml.token_type is not one integer per token"))?,
    };
    let pre = meta.string("tokenizer.ggml.pre")?.ok_or_else(|| {
        unsupported(meta.file, "no tokenizer.ggml.pre: the pre-tokenizer of this byte-level BPE is unknown")
    })?;
    let (pre_tokenizer, ignore_merges) = pre_tokenizer(meta.file, pre)?;

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        if let Some(first) = seen.insert(token, id) {
            return Err(invalid(meta.file, format!("token {token:?} appears at ids {first} and {id}")));
        }
        vocab.insert(token.to_string(), json!(id));
    }
    let merge_pairs = merges
        .iter()
        .map(|m| match m.split(' ').collect::<Vec<_>>()[..] {
            [a, b] if seen.contains_key(a) && seen.contains_key(b) => Ok(json!([a, b])),
            _ => Err(invalid(meta.file, format!("merge {m:?} is not two vocabulary tokens"))),
        })
        .collect::<Result<Vec<Json>, _>>()?;

    let mut added = Vec::new();
    let mut added_json = Vec::new();
    let mut added_decoder = serde_json::Map::new();
    for (id, (&token, &ty)) in tokens.iter().zip(&types).enumerate() {
        let special = match ty {
            TOKEN_CONTROL | TOKEN_UNKNOWN => true,
            TOKEN_USER_DEFINED => false,
            _ => continue,
        };
        let entry = json!({
            "content": token, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special,
        });
        let mut with_id = entry.clone();
        with_id["id"] = json!(id);
        added_json.push(with_id);
        added_decoder.insert(id.to_string(), entry);
        added.push((id as u32, token.to_string()));
    }

    let token_of = |key: &str| -> Result<Option<(usize, &str)>, TrainerError> {
        match meta.count(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id)
                .map(|t| Some((id, *t)))
                .ok_or_else(|| invalid(meta.file, format!("{key} {id} is outside the {} tokens", tokens.len()))),
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let unk = token_of("tokenizer.ggml.unknown_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;
    let flag = |key: &str| meta.get(key).and_then(Value::as_bool).unwrap_or(false);
    let (add_bos, add_eos) = (flag("tokenizer.ggml.add_bos_token"), flag("tokenizer.ggml.add_eos_token"));

    let post_processor = if (add_bos && bos.is_some()) || (add_eos && eos.is_some()) {
        let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
        let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
        let (mut single, mut pair, mut specials) = (Vec::new(), Vec::new(), serde_json::Map::new());
        let bos = bos.filter(|_| add_bos);
        let eos = eos.filter(|_| add_eos);
        for (id, t) in bos.iter().chain(&eos) {
            specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        for (list, parts) in [(&mut single, vec![("A", 0)]), (&mut pair, vec![("A", 0), ("B", 1)])] {
            for (s, type_id) in parts {
                list.extend(bos.map(|(_, t)| special(t)));
                list.push(seq(s, type_id));
                list.extend(eos.map(|(_, t)| special(t)));
            }
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_json,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": merge_pairs,
        },
    });

    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    config.insert("add_prefix_space".into(), json!(false));
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(context));
    for (name, token) in [("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)] {
        if let Some((_, t)) = token {
            config.insert(name.into(), json!(t));
        }
    }
    let named: HashSet<&str> = [bos, eos, unk, pad].iter().flatten().map(|(_, t)| *t).collect();
    let additional: Vec<&str> = tokens
        .iter()
        .zip(&types)
        .filter(|&(t, &ty)| ty == TOKEN_CONTROL && !named.contains(t))
        .map(|(t, _)| *t)
        .collect();
    config.insert("additional_special_tokens".into(), json!(additional));
    config.insert("added_tokens_decoder".into(), Json::Object(added_decoder));
    let template = meta.string("tokenizer.chat_template")?;
    if let Some(t) = template {
        config.insert("chat_template".into(), json!(t));
    }
    Ok(TokenizerFiles {
        tokenizer,
        config: Json::Object(config),
        vocab: tokens.len(),
        merges: merges.len(),
        pre: pre.to_string(),
        chat_template: template.is_some(),
        added,
    })
}

fn write_json(dir: &Path, name: &str, value: &Json) -> Result<(), TrainerError> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).map_err(|e| TrainerError::Format(format!("{name}: {e}")))?;
    std::fs::write(&path, text + "\n").map_err(|e| TrainerError::io(&path, e))
}

/// The HF `config.json`: every field written out, none null (transformers 5
/// fails on `"head_dim": null`), RoPE given both the legacy and the
/// `rope_parameters` way.
fn hf_config(c: &LlamaConfig, dtype: WeightDtype, special: &[(&str, Option<u64>)]) -> Json {
    let mut out = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": c.tie_word_embeddings,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
    });
    if let Some(o) = out.as_object_mut() {
        for (name, id) in special {
            if let Some(id) = id {
                o.insert((*name).to_string(), json!(id));
            }
        }
    }
    out
}

/// Imports the GGUF model `file` into `out` (created if needed; files of the
/// same names are replaced). See the module docs for what changes on the way.
pub fn import_gguf(file: &Path, out: &Path, dtype: WeightDtype) -> Result<ImportReport, TrainerError> {
    let gguf = GgufFile::open(file)?;
    let header = gguf.header();
    let meta = Meta { file, header };

    let embed = header.tensor("token_embd.weight").ok_or_else(|| invalid(file, "no token_embd.weight tensor"))?;
    if header.tensor("rope_freqs.weight").is_some() {
        return Err(unsupported(file, "rope_freqs.weight (Llama 3.1-style RoPE frequency scaling)"));
    }
    let tied = header.tensor("output.weight").is_none();
    let vocab_rows = embed.shape()[0];
    let config = read_config(&meta, tied, vocab_rows)?;
    let tokenizer = tokenizer_files(&meta, config.max_position_embeddings)?;
    if tokenizer.vocab > vocab_rows {
        return Err(invalid(file, format!("{} tokens but token_embd has {vocab_rows} rows", tokenizer.vocab)));
    }

    let expected: HashMap<String, Vec<usize>> = Model::expected_shapes(&config).into_iter().collect();
    let mut written: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(header.tensors.len());
    let mut source_types: BTreeMap<String, usize> = BTreeMap::new();
    let mut parameters = 0;
    for info in &header.tensors {
        let (name, heads) = hf_tensor(&info.name, &config)
            .ok_or_else(|| unsupported(file, format!("tensor {} (not part of a llama decoder)", info.name)))?;
        let shape = info.shape();
        match expected.get(&name) {
            Some(want) if *want == shape => {}
            Some(want) => {
                return Err(invalid(file, format!("{} has shape {shape:?}, the config implies {want:?}", info.name)));
            }
            None => return Err(invalid(file, format!("{} is not a tensor of this config ({name})", info.name))),
        }
        let mut values = gguf.dequantize(info)?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(file, format!("{} has a non-finite weight at index {bad}", info.name)));
        }
        if let Some(heads) = heads {
            values = unpermute_rows(&values, shape[0], shape[1], heads)?;
        }
        parameters += values.len();
        *source_types.entry(info.ggml_type.name()).or_default() += 1;
        written.push((name, shape, encode(&values, dtype)));
    }
    if let Some(missing) = expected.keys().find(|k| !written.iter().any(|(n, _, _)| n == *k)) {
        return Err(invalid(file, format!("no tensor for {missing}")));
    }

    std::fs::create_dir_all(out).map_err(|e| TrainerError::io(out, e))?;
    let index = out.join("model.safetensors.index.json");
    if index.exists() {
        return Err(TrainerError::Format(format!(
            "{} exists: {} holds a sharded model, which would shadow the import; use an empty directory",
            index.display(),
            out.display()
        )));
    }
    let st_dtype = match dtype {
        WeightDtype::Bf16 => safetensors::Dtype::BF16,
        WeightDtype::F32 => safetensors::Dtype::F32,
    };
    let views = written
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| TrainerError::Format(format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Written under a temporary name and renamed, so a half-written file is
    // never taken for a model.
    let weights = out.join("model.safetensors");
    let partial = out.join("model.safetensors.partial");
    let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize_to_file(views, metadata, &partial).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => TrainerError::io(&partial, io),
        other => TrainerError::malformed(&partial, other),
    })?;
    std::fs::rename(&partial, &weights).map_err(|e| TrainerError::io(&weights, e))?;

    let id = |key: &str| meta.count(key).map(|v| v.map(|n| n as u64));
    let special = [
        ("bos_token_id", id("tokenizer.ggml.bos_token_id")?),
        ("eos_token_id", id("tokenizer.ggml.eos_token_id")?),
        ("pad_token_id", id("tokenizer.ggml.padding_token_id")?),
    ];
    write_json(out, "config.json", &hf_config(&config, dtype, &special))?;
    write_json(out, "tokenizer.json", &tokenizer.tokenizer)?;
    write_json(out, "tokenizer_config.json", &tokenizer.config)?;
    let mut files: Vec<String> = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        .into_iter()
        .map(String::from)
        .collect();
    if special.iter().any(|(_, v)| v.is_some()) {
        let mut generation = serde_json::Map::new();
        generation.insert("_from_model_config".into(), json!(true));
        for (name, v) in special {
            if let Some(v) = v {
                generation.insert(name.into(), json!(v));
            }
        }
        write_json(out, "generation_config.json", &Json::Object(generation))?;
        files.push("generation_config.json".into());
    }

    // Read back what was written: the tokenizer through HF `tokenizers`,
    // the model through the trainer's own loader's config check.
    let path = out.join("tokenizer.json");
    let loaded = tokenizers::Tokenizer::from_file(&path).map_err(|e| TrainerError::malformed(&path, e))?;
    if loaded.get_vocab_size(true) != tokenizer.vocab {
        return Err(invalid(
            &path,
            format!("loads with {} tokens, {} were written", loaded.get_vocab_size(true), tokenizer.vocab),
        ));
    }
    if let Some((id, token)) = tokenizer.added.iter().find(|(id, t)| loaded.token_to_id(t) != Some(*id)) {
        return Err(invalid(&path, format!("added token {token:?} does not map back to id {id}")));
    }
    let reread: LlamaConfig = serde_json::from_slice(
        &std::fs::read(out.join("config.json")).map_err(|e| TrainerError::io(&out.join("config.json"), e))?,
    )
    .map_err(|e| TrainerError::malformed(&out.join("config.json"), e))?;
    reread.check()?;

    Ok(ImportReport {
        dir: out.to_path_buf(),
        files,
        config: reread,
        dtype,
        parameters,
        source_types,
        vocab: tokenizer.vocab,
        merges: tokenizer.merges,
        pre_tokenizer: tokenizer.pre,
        chat_template: tokenizer.chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_reverses_llama_cpp_row_interleaving() {
        // Two heads of width 4, one column: llama.cpp's order within a head
        // is (0, 2, 1, 3) of HF's, i.e. HF row j·2 + i sits at 2i + j.
        let gguf: Vec<f32> = [0., 2., 1., 3., 4., 6., 5., 7.].to_vec();
        assert_eq!(unpermute_rows(&gguf, 8, 1, 2).unwrap(), [0., 1., 2., 3., 4., 5., 6., 7.]);
        // Rows move whole.
        let wide: Vec<f32> = (0..4).flat_map(|r| [r as f32, -(r as f32)]).collect();
        let out = unpermute_rows(&wide, 4, 2, 1).unwrap();
        assert_eq!(out, [0., -0., 2., -2., 1., -1., 3., -3.]);
        assert!(unpermute_rows(&gguf, 8, 1, 3).is_err());
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_bits(1.0), 0x3f80);
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
        assert_eq!(bf16_bits(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
        assert_eq!(bf16_bits(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16_bits(-2.5), 0xc020);
        assert!(f32::from_bits(u32::from(bf16_bits(f32::NAN)) << 16).is_nan());
    }

    #[test]
    fn tensor_names_map_to_hf_llama() {
        let config = crate::tiny::tiny_model(1).unwrap().config;
        let map = |n: &str| hf_tensor(n, &config);
        assert_eq!(map("token_embd.weight"), Some(("model.embed_tokens.weight".into(), None)));
        assert_eq!(map("output.weight"), Some(("lm_head.weight".into(), None)));
        assert_eq!(
            map("blk.3.attn_q.weight"),
            Some(("model.layers.3.self_attn.q_proj.weight".into(), Some(config.num_attention_heads)))
        );
        assert_eq!(
            map("blk.0.attn_k.weight"),
            Some(("model.layers.0.self_attn.k_proj.weight".into(), Some(config.kv_heads())))
        );
        assert_eq!(map("blk.1.ffn_down.weight"), Some(("model.layers.1.mlp.down_proj.weight".into(), None)));
        assert_eq!(map("blk.1.ffn_norm.weight"), Some(("model.layers.1.post_attention_layernorm.weight".into(), None)));
        assert_eq!(map("blk.x.attn_q.weight"), None);
        assert_eq!(map("blk.0.attn_q.bias"), None);
    }

    #[test]
    fn config_json_has_no_nulls_and_round_trips() {
        let mut config = crate::tiny::tiny_model(1).unwrap().config;
        config.tie_word_embeddings = true;
        let json = hf_config(&config, WeightDtype::Bf16, &[("bos_token_id", Some(1)), ("pad_token_id", None)]);
        let text = json.to_string();
        assert!(!text.contains("null"), "{text}");
        assert_eq!(json["head_dim"], json!(config.head_dim()));
        assert_eq!(json["bos_token_id"], json!(1));
        assert!(json.get("pad_token_id").is_none());
        let back: LlamaConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back.head_dim(), config.head_dim());
        assert_eq!(back.kv_heads(), config.kv_heads());
        assert!(back.tie_word_embeddings);
    }

    #[test]
    fn unknown_pre_tokenizers_are_refused_by_name() {
        let e = pre_tokenizer(Path::new("m.gguf"), "deepseek-coder").unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.pre 'deepseek-coder' (supported: smollm"), "{e}");
        assert!(
            pre_tokenizer(Path::new("m.gguf"), "smollm").unwrap().0.to_string().contains("\"individual_digits\":true")
        );
        assert!(pre_tokenizer(Path::new("m.gguf"), "llama-bpe").unwrap().1);
    }
}
