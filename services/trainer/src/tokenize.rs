//! Text to token ids with the model's own `tokenizer.json` (HF `tokenizers`),
//! and the byte-level tokenizer written beside the tiny model.

use std::collections::BTreeMap;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{Tokenizer, TokenizerBuilder};

use crate::TrainerError;

/// A model's tokenizer, loaded from `<model>/tokenizer.json`, and its chat
/// template from `<model>/tokenizer_config.json` when there is one.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    vocab_size: usize,
    chat_template: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab_size", &self.vocab_size).finish()
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and checks that every id it can produce
    /// has a row in a model of `model_vocab` tokens.
    pub fn load(dir: &Path, model_vocab: usize) -> Result<TextTokenizer, TrainerError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TrainerError::Format(format!("{} is missing (HF tokenizer file)", path.display())));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| TrainerError::malformed(&path, e))?;
        let vocab_size = inner.get_vocab_size(true);
        if vocab_size > model_vocab {
            return Err(TrainerError::Format(format!(
                "{} has {vocab_size} tokens but the model's embedding has {model_vocab} rows",
                path.display()
            )));
        }
        let config = dir.join("tokenizer_config.json");
        let chat_template = match std::fs::read(&config) {
            Ok(bytes) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| TrainerError::malformed(&config, e))?;
                v.get("chat_template").and_then(|t| t.as_str()).map(str::to_string)
            }
            Err(_) => None,
        };
        Ok(TextTokenizer { inner, vocab_size, chat_template })
    }

    /// The id of a token given by its text (special tokens such as
    /// `<|im_end|>` included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// The prompt for a conversation of `(role, content)` messages, rendered
    /// with the model's chat template and the assistant's turn opened.
    pub fn chat_prompt(&self, messages: &[(&str, &str)]) -> Result<String, TrainerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| TrainerError::Format("the model has no chat template (tokenizer_config.json)".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(|e| TrainerError::Format(format!("chat template: {e}")))?;
        let messages: Vec<BTreeMap<&str, &str>> =
            messages.iter().map(|(role, content)| BTreeMap::from([("role", *role), ("content", *content)])).collect();
        let ctx = minijinja::context! { messages => messages, add_generation_prompt => true };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| TrainerError::Format(format!("rendering the chat template: {e}")))
    }

    /// Token ids of `text`, without special tokens: prompts and completions
    /// are spliced as they were shown, so no BOS/EOS is invented.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TrainerError::Format(format!("tokenizing: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids` (for sampling and debugging).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainerError> {
        self.inner.decode(ids, false).map_err(|e| TrainerError::Format(format!("detokenizing: {e}")))
    }

    /// Number of tokens the tokenizer knows (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// The GPT-2 byte-level alphabet: byte `b` is written as a printable
/// character so BPE vocabularies stay valid JSON strings.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + shifted).expect("valid code point")
    }
}

/// Writes `dir/tokenizer.json`: byte-level BPE with no merges, so every
/// byte of UTF-8 text is one token and token id = byte value (the tiny
/// model's 256-row vocabulary). Both HF `tokenizers` and transformers load it.
pub(crate) fn write_byte_tokenizer(dir: &Path) -> Result<(), TrainerError> {
    let vocab: tokenizers::models::bpe::Vocab = (0..=255u8).map(|b| (byte_char(b).to_string(), u32::from(b))).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, Vec::new()).build().map_err(|e| TrainerError::Format(e.to_string()))?;
    // No regex split: the text is one pre-token, and without merges BPE
    // leaves each byte character alone.
    let byte_level = ByteLevel::new(false, false, false);
    let tokenizer = TokenizerBuilder::new()
        .with_model(bpe)
        .with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level))
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_post_processor(None::<tokenizers::PostProcessorWrapper>)
        .build()
        .map_err(|e| TrainerError::Format(e.to_string()))?;
    let path = dir.join("tokenizer.json");
    Tokenizer::from(tokenizer).save(&path, true).map_err(|e| TrainerError::malformed(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection_onto_256_characters() {
        let chars: std::collections::HashSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), '\u{120}'); // GPT-2's 'Ġ'
        assert_eq!(byte_char(b'\n'), '\u{10A}'); // GPT-2's 'Ċ'
    }

    #[test]
    fn byte_tokenizer_maps_each_byte_to_its_value_and_back() {
        let dir = tempfile::tempdir().unwrap();
        write_byte_tokenizer(dir.path()).unwrap();
        let tok = TextTokenizer::load(dir.path(), 256).unwrap();
        assert_eq!(tok.vocab_size(), 256);
        for text in ["def add(a, b):\n    return a + b", "  spaces\tand tabs ", "naïve café — ünïcödé 🚀", ""]
        {
            let ids = tok.encode(text).unwrap();
            let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
            assert_eq!(ids, bytes, "{text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn missing_or_oversized_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = TextTokenizer::load(dir.path(), 256).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json is missing"), "{e}");
        write_byte_tokenizer(dir.path()).unwrap();
        let e = TextTokenizer::load(dir.path(), 100).unwrap_err().to_string();
        assert!(e.contains("256 tokens but the model's embedding has 100 rows"), "{e}");
    }
}
