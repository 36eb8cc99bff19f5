//! A checkpoint's tokenizer and chat template, as transformers reads them:
//! `tokenizer.json` through the `tokenizers` crate (its post-processor adds
//! BOS where the tokenizer does), the chat template from
//! `chat_template.jinja` or else `tokenizer_config.json`'s `chat_template`,
//! rendered with `minijinja` (`trim_blocks` and `lstrip_blocks`, as
//! transformers' Jinja environment) and encoded without special tokens, so
//! the template's own `{{ bos_token }}` is the only BOS, as in
//! `apply_chat_template(..., tokenize=True)`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The tokenizer file's name.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The tokenizer config's name.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The chat template file transformers 5 writes.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string, or an object
/// with its `content`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn text(self) -> String {
        match self {
            SpecialToken::Text(text) | SpecialToken::Added { content: text } => text,
        }
    }
}

/// A chat template: one, or named ones (the `default` is used).
#[derive(Deserialize)]
#[serde(untagged)]
enum ChatTemplate {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default)]
    bos_token: Option<SpecialToken>,
    #[serde(default)]
    eos_token: Option<SpecialToken>,
    #[serde(default)]
    chat_template: Option<ChatTemplate>,
}

impl Tokenizer {
    /// Reads the tokenizer in `dir`: `tokenizer.json` (required),
    /// `tokenizer_config.json` and `chat_template.jinja` (optional).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(TOKENIZER_FILE);
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path,
                what: "tokenizer.json",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config: TokenizerConfig = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|cause| ModelError::Json {
                path: config_path.clone(),
                cause,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenizerConfig::default(),
            Err(cause) => {
                return Err(ModelError::Io {
                    path: config_path,
                    cause,
                })
            }
        };
        // transformers 5 prefers chat_template.jinja to the config's key.
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        let chat_template = match std::fs::read_to_string(&template_path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match config.chat_template {
                Some(ChatTemplate::One(text)) => Some(text),
                Some(ChatTemplate::Named(named)) => named.into_iter().find(|t| t.name == "default").map(|t| t.template),
                None => None,
            },
            Err(cause) => {
                return Err(ModelError::Io {
                    path: template_path,
                    cause,
                })
            }
        };
        Ok(Self {
            inner,
            path,
            chat_template,
            bos_token: config.bos_token.map(SpecialToken::text),
            eos_token: config.eos_token.map(SpecialToken::text),
        })
    }

    fn error(&self, message: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// The ids of `text`; with `add_special_tokens`, the special tokens the
    /// tokenizer adds (BOS, for most), as transformers' `tokenizer(text)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, add_special_tokens).map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, without the special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.error(e))
    }

    /// The id of the end-of-sequence token, if the config names one.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token
            .as_deref()
            .and_then(|token| self.inner.token_to_id(token))
    }

    /// Whether the tokenizer has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// `messages` rendered with the chat template, ending with the
    /// assistant's turn opened when `add_generation_prompt`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Err(
                self.error("this tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)")
            );
        };
        let mut env = minijinja::Environment::new();
        // As transformers' environment: blocks eat their newline and indent.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| self.error(format!("chat template: {e}")))?;
        let context = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(context))
            .map_err(|e| self.error(format!("chat template: {e}")))
    }

    /// The ids of `messages` as `apply_chat_template(..., tokenize=True)`
    /// gives them: the rendered text encoded without special tokens (the
    /// template writes its own).
    pub fn chat_ids(&self, messages: &[Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }
}
