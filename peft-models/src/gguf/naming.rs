//! gguf-py's naming heuristics (`Metadata.get_model_id_components`,
//! `id_to_title`): the name, organization, base name, fine-tune, version and
//! size label a Hub id or folder name spells (`org/Name-7B-Chat-v1`), with
//! plain code for the regular expressions gguf-py matches the parts with.

/// What `Metadata.get_model_id_components` makes of a model id.
#[derive(Debug, Default)]
pub(super) struct IdParts {
    pub(super) full_name: String,
    pub(super) organization: Option<String>,
    pub(super) basename: Option<String>,
    pub(super) finetune: Option<String>,
    pub(super) version: Option<String>,
    pub(super) size_label: Option<String>,
}

/// gguf-py's `get_model_id_components`: the name, organization, base name,
/// fine-tune, version and size label in a Hub id (`org/Name-7B-Chat-v1`) or
/// folder name. `total_params` is negative for a LoRA adapter.
pub(super) fn model_id_components(model_id: &str, total_params: i64) -> IdParts {
    if model_id.contains(' ') {
        return IdParts {
            full_name: model_id.to_owned(),
            ..IdParts::default()
        };
    }
    let (mut organization, full_name) = match model_id.split_once('/') {
        Some((org, name)) => (Some(org.to_owned()), name.to_owned()),
        None => (None, model_id.to_owned()),
    };
    if organization.as_deref().is_some_and(|org| org.starts_with('.')) {
        organization = None;
    }
    #[derive(Default, Clone, Copy)]
    struct Tags {
        basename: bool,
        size_label: bool,
        finetune: bool,
        version: bool,
        kind: bool,
    }
    impl Tags {
        fn is_empty(self) -> bool {
            !(self.basename || self.size_label || self.finetune || self.version || self.kind)
        }
        fn count(self) -> usize {
            [self.basename, self.size_label, self.finetune, self.version, self.kind]
                .iter()
                .filter(|&&t| t)
                .count()
        }
    }
    let mut parts: Vec<String> = full_name
        .split('-')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let mut tags = vec![Tags::default(); parts.len()];
    for i in 0..parts.len() {
        let part = parts[i].clone();
        if is_version(&part) {
            tags[i].version = true;
        } else if is_quant_type(&part) {
            tags[i].kind = true;
            parts[i] = part.to_uppercase();
        } else if i > 0 && is_size(&part) {
            let mut part = part.replace('_', ".");
            let chars: Vec<char> = part.chars().collect();
            let n = chars.len();
            // bloom-7b1 -> 7.1b
            if chars[n - 1].is_ascii_digit() && n >= 2 {
                let head: String = chars[..n - 2].iter().collect();
                part = format!("{head}.{}{}", chars[n - 1], chars[n - 2]);
            }
            let chars: Vec<char> = part.chars().collect();
            let n = chars.len();
            if n > 1 && chars[n - 2].is_ascii_digit() && "kmbt".contains(chars[n - 1]) {
                let head: String = chars[..n - 1].iter().collect();
                part = format!("{head}{}", chars[n - 1].to_ascii_uppercase());
            }
            if total_params != 0 {
                let chars: Vec<char> = part.chars().collect();
                let n = chars.len();
                let number: String = chars[..n - 1].iter().collect();
                if let Ok(value) = number.parse::<f64>() {
                    let power = " KMBT".find(chars[n - 1]).map_or(-1, |p| p as i32);
                    let label_params = value * 1000f64.powi(power);
                    // A size far below the adapter's (or, for a model, far
                    // from its size) is a context length: part of the fine-tune.
                    if (total_params < 0 && label_params < (total_params.unsigned_abs() / 8) as f64)
                        || (total_params > 0
                            && (label_params - total_params as f64).abs() > ((7 * total_params) / 8) as f64)
                    {
                        tags[i].finetune = true;
                        let head: String = chars[..n - 1].iter().collect();
                        part = format!("{head}{}", chars[n - 1].to_lowercase());
                    }
                }
            }
            if tags[i].is_empty() {
                tags[i].size_label = true;
            }
            parts[i] = part;
        } else if i > 0 && ["chat", "instruct", "vision", "lora"].contains(&part.to_lowercase().as_str()) {
            if total_params < 0 && part.to_lowercase() == "lora" {
                tags[i].kind = true;
            } else {
                tags[i].finetune = true;
            }
        }
    }
    // Word sizes (small, xl) are dropped when a number size is there.
    let numeric_size = parts
        .iter()
        .zip(&tags)
        .any(|(p, t)| t.size_label && p.chars().any(|c| c.is_ascii_digit()));
    if numeric_size {
        for (p, t) in parts.iter().zip(tags.iter_mut()) {
            if t.size_label && p.chars().all(char::is_alphabetic) {
                t.size_label = false;
            }
        }
    }
    let mut at_start = true;
    for (p, t) in parts.iter().zip(tags.iter_mut()) {
        let starts_alpha = p.chars().next().is_some_and(char::is_alphabetic);
        if at_start && ((t.is_empty() && starts_alpha) || t.version) {
            t.basename = true;
        } else {
            at_start = false;
            if t.is_empty() {
                t.finetune = true;
            }
        }
    }
    for t in tags.iter_mut().rev() {
        if t.basename && t.count() > 1 {
            t.basename = false;
        } else {
            break;
        }
    }
    let join = |select: &dyn Fn(&Tags) -> bool, dedup: bool| -> Option<String> {
        let mut chosen: Vec<&str> = Vec::new();
        for (p, t) in parts.iter().zip(&tags) {
            if select(t) && !(dedup && chosen.contains(&p.as_str())) {
                chosen.push(p);
            }
        }
        let joined = chosen.join("-");
        (!joined.is_empty()).then_some(joined)
    };
    let mut basename = join(&|t| t.basename, false);
    let size_label = join(&|t| t.size_label, true);
    let finetune = join(&|t| t.finetune, false);
    let version = join(&|t| t.version && !t.basename, false);
    if size_label.is_none() && finetune.is_none() && version.is_none() {
        // Too ambiguous to name a base.
        basename = None;
    }
    IdParts {
        full_name,
        organization,
        basename,
        finetune,
        version,
        size_label,
    }
}

/// `(v|iter)?\d+([.]\d+)*`, ignoring case.
fn is_version(part: &str) -> bool {
    let lower = part.to_ascii_lowercase();
    ["", "v", "iter"].iter().any(|prefix| {
        lower.strip_prefix(prefix).is_some_and(|rest| {
            !rest.is_empty()
                && rest
                    .split('.')
                    .all(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
        })
    })
}

/// `i?q\d(_\w)*|b?fp?(16|32)`, ignoring case: a quantization or float type.
fn is_quant_type(part: &str) -> bool {
    let lower = part.to_lowercase();
    let q = lower.strip_prefix('i').unwrap_or(&lower);
    if let Some(rest) = q.strip_prefix('q') {
        let mut chars = rest.chars();
        if chars.next().is_some_and(|c| c.is_ascii_digit()) {
            let tail: Vec<char> = chars.collect();
            if tail.len().is_multiple_of(2)
                && tail
                    .chunks(2)
                    .all(|p| p[0] == '_' && (p[1].is_alphanumeric() || p[1] == '_'))
            {
                return true;
            }
        }
    }
    let f = lower.strip_prefix('b').unwrap_or(&lower);
    let Some(f) = f.strip_prefix('f') else { return false };
    let f = f.strip_prefix('p').unwrap_or(f);
    f == "16" || f == "32"
}

/// `(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?|small|mini|medium|large|x?xl)`,
/// ignoring case: a size label.
fn is_size(part: &str) -> bool {
    let lower = part.to_ascii_lowercase();
    if ["small", "mini", "medium", "large", "xl", "xxl"].contains(&lower.as_str()) {
        return true;
    }
    let bytes = lower.as_bytes();
    let digits = |from: usize| bytes[from..].iter().take_while(|c| c.is_ascii_digit()).count();
    // \d+([._]\d+)?[kmbt]\d? to the end, from `at`.
    let number = |at: usize| -> bool {
        let mut i = at;
        let n = digits(i);
        if n == 0 {
            return false;
        }
        i += n;
        if i < bytes.len() && (bytes[i] == b'.' || bytes[i] == b'_') {
            let n = digits(i + 1);
            if n > 0 {
                i += 1 + n;
            }
        }
        if i >= bytes.len() || !b"kmbt".contains(&bytes[i]) {
            return false;
        }
        i += 1;
        if i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        i == bytes.len()
    };
    if number(0) {
        return true;
    }
    if bytes.first() == Some(&b'a') && number(1) {
        return true;
    }
    let n = digits(0);
    n > 0 && bytes.get(n) == Some(&b'x') && number(n + 1)
}

/// gguf-py's `id_to_title`: dashes to spaces, lowercase words titled except
/// versions and words starting with a digit.
pub(super) fn id_to_title(id: &str) -> String {
    id.trim()
        .replace('-', " ")
        .split_whitespace()
        .map(|word| {
            let keep =
                !is_lower(word) || is_version_word(word) || word.chars().next().is_some_and(|c| c.is_ascii_digit());
            if keep {
                word.to_owned()
            } else {
                python_title(word)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `^v\d+(\.\d+)*$`.
fn is_version_word(word: &str) -> bool {
    word.strip_prefix('v').is_some_and(|rest| {
        rest.split('.')
            .all(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()))
    })
}

/// Python's `str.islower`: some cased character, and none uppercase.
fn is_lower(word: &str) -> bool {
    word.chars().any(char::is_lowercase) && !word.chars().any(char::is_uppercase)
}

/// Python's `str.title`: a letter after a non-letter is uppercased, the
/// others lowercased.
fn python_title(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut previous_cased = false;
    for c in word.chars() {
        let cased = c.is_lowercase() || c.is_uppercase();
        if cased && previous_cased {
            out.extend(c.to_lowercase());
        } else if cased {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        previous_cased = cased;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What gguf-py's heuristics (llama.cpp c392e509) wrote as general.name,
    /// basename, finetune, version and size_label for an adapter folder of
    /// this name (the llama fixture adapter, 18432 parameters, no model card).
    #[test]
    fn folder_names_read_as_gguf_py_reads_them() {
        // (folder, name, basename, finetune, version, size_label)
        type Case = (
            &'static str,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: [Case; 12] = [
            (
                "Mistral-7B-Instruct-v0.2-GGUF",
                "Mistral 7B Instruct v0.2 GGUF",
                Some("Mistral"),
                Some("Instruct-GGUF"),
                Some("v0.2"),
                Some("7B"),
            ),
            (
                "llama-2-7b-chat-hf",
                "Llama 2 7b Chat Hf",
                Some("llama-2"),
                Some("chat-hf"),
                None,
                Some("7B"),
            ),
            (
                "qwen2.5-0.5b-lora-r16",
                "Qwen2.5 0.5b Lora R16",
                Some("qwen2.5"),
                Some("r16"),
                None,
                Some("0.5B"),
            ),
            ("bloom-7b1", "Bloom 7b1", Some("bloom"), None, None, Some("7.1B")),
            (
                "Mixtral-8x7B-v0.1",
                "Mixtral 8x7B v0.1",
                Some("Mixtral"),
                None,
                Some("v0.1"),
                Some("8x7B"),
            ),
            ("my_adapter", "My_Adapter", None, None, None, None),
            ("adapter v2", "Adapter v2", None, None, None, None),
            (
                "gemma-2-2b-it-Q4_K_M",
                "Gemma 2 2b It Q4_K_M",
                Some("gemma-2"),
                Some("it"),
                None,
                Some("2B"),
            ),
            (
                "Qwen3-30B-A3B",
                "Qwen3 30B A3B",
                Some("Qwen3"),
                None,
                None,
                Some("30B-A3B"),
            ),
            ("model-bf16-xl", "Model Bf16 Xl", Some("model"), None, None, Some("xl")),
            ("7B-llama", "7B Llama", None, Some("7B-llama"), None, None),
            (
                "Llama-8x7b-a3b-xxl-Mini",
                "Llama 8x7b A3B Xxl Mini",
                Some("Llama"),
                Some("xxl-Mini"),
                None,
                Some("8x7B-a3B"),
            ),
        ];
        for (folder, name, basename, finetune, version, size_label) in cases {
            // As the metadata fills them for an adapter folder and no model card.
            let parts = model_id_components(folder, -18432);
            assert_eq!(id_to_title(&parts.full_name), name, "{folder}");
            assert_eq!(parts.basename.as_deref(), basename, "{folder}");
            assert_eq!(parts.finetune.as_deref(), finetune, "{folder}");
            assert_eq!(parts.version.as_deref(), version, "{folder}");
            assert_eq!(parts.size_label.as_deref(), size_label, "{folder}");
        }
    }
}
