//! Which layers an adapter goes on: PEFT's `target_modules`,
//! `exclude_modules` and `layers_to_transform` as one composable value.
//!
//! ```
//! use peft_core::{all_linear, modules, Role};
//! let t = all_linear().exclude(["k_proj"]).layers([0]);
//! assert!(t.matches("layers.0.self_attn.q_proj", Role::Hidden));
//! assert!(!t.matches("layers.0.self_attn.k_proj", Role::Hidden)); // excluded
//! assert!(!t.matches("layers.1.self_attn.q_proj", Role::Hidden)); // other layer
//! assert!(!t.matches("lm_head", Role::OutputHead));               // the head
//! assert!(modules(["lm_head"]).matches("lm_head", Role::OutputHead)); // unless named
//! ```

use std::fmt;

use regex::Regex;

use crate::adaptable::Role;
use crate::error::{capped_list, PeftError, Result};
use crate::layer::LayerKind;

/// A set of target layers. Build it with [`all_linear`], [`modules`] or
/// [`regex()`], then narrow it with [`exclude`](Self::exclude),
/// [`exclude_regex`](Self::exclude_regex) and [`layers`](Self::layers).
#[derive(Debug, Clone)]
pub struct Targets {
    include: Vec<Selector>,
    exclude: Vec<Selector>,
    layers: Option<Vec<usize>>,
    /// PEFT's `layers_pattern`: the segment names after which the layer index
    /// stands; `None` takes the first numeric segment.
    layers_pattern: Option<LayersPattern>,
    /// PEFT's `modules_to_save`: modules the adapter holds a whole trainable
    /// copy of; adapters never go on them or inside them.
    modules_to_save: Vec<String>,
}

/// `layers_pattern` as given, and as the regexes that find the index.
#[derive(Debug, Clone)]
struct LayersPattern {
    given: Vec<String>,
    compiled: Vec<Pattern>,
}

#[derive(Debug, Clone)]
enum Selector {
    /// Every linear layer that is not the output head.
    AllLinear,
    /// PEFT's list rule: the path equals a name or ends with `.name`.
    Names(Vec<String>),
    /// PEFT's string rule: the regex matches the whole path.
    Regex(Pattern),
}

/// A regex kept with its source; a pattern that does not compile is reported
/// when the targets are used, so that building targets never fails.
#[derive(Debug, Clone)]
struct Pattern {
    source: String,
    compiled: ::core::result::Result<Regex, regex::Error>,
}

impl Pattern {
    fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            compiled: Regex::new(&format!("^(?:{source})$")),
        }
    }
}

/// Every linear layer except the one marked `#[output_head]`: PEFT's
/// `target_modules="all-linear"`. Embeddings are not linear layers here.
pub fn all_linear() -> Targets {
    Targets::including(Selector::AllLinear)
}

/// Layers named by PEFT's list rule: a path matches a name when it equals it
/// or ends with `.` + name (`q_proj` matches `layers.0.self_attn.q_proj`).
/// A name selects any layer, the output head included.
pub fn modules<I, S>(names: I) -> Targets
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    Targets::including(Selector::Names(names.into_iter().map(Into::into).collect()))
}

/// Layers whose whole path matches `pattern` (PEFT's string rule, `re.fullmatch`).
/// A pattern that does not compile is reported when the targets are used.
pub fn regex(pattern: &str) -> Targets {
    Targets::including(Selector::Regex(Pattern::new(pattern)))
}

impl Targets {
    fn including(selector: Selector) -> Self {
        Self {
            include: vec![selector],
            exclude: Vec::new(),
            layers: None,
            layers_pattern: None,
            modules_to_save: Vec::new(),
        }
    }

    /// Also targets what `other` targets; the exclusions and layer filters of
    /// both apply.
    pub fn or(mut self, other: Targets) -> Self {
        self.include.extend(other.include);
        self.exclude.extend(other.exclude);
        self.layers_pattern = self.layers_pattern.or(other.layers_pattern);
        self.modules_to_save.extend(other.modules_to_save);
        self.layers = match (self.layers, other.layers) {
            (Some(mut a), Some(b)) => {
                a.retain(|i| b.contains(i));
                Some(a)
            }
            (a, b) => a.or(b),
        };
        self
    }

    /// Leaves out layers matching these names (PEFT's `exclude_modules` as a list).
    pub fn exclude<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.exclude
            .push(Selector::Names(names.into_iter().map(Into::into).collect()));
        self
    }

    /// Leaves out layers whose whole path matches `pattern` (PEFT's
    /// `exclude_modules` as a string).
    pub fn exclude_regex(mut self, pattern: &str) -> Self {
        self.exclude.push(Selector::Regex(Pattern::new(pattern)));
        self
    }

    /// Keeps only layers whose layer index is in `indices` (PEFT's
    /// `layers_to_transform`). The layer index is the first numeric segment
    /// of the path (`3` in `layers.3.mlp.up_proj`); a path without one is
    /// left out.
    pub fn layers<I: IntoIterator<Item = usize>>(mut self, indices: I) -> Self {
        self.layers = Some(indices.into_iter().collect());
        self
    }

    /// Takes the layer index for [`layers`](Self::layers) from the numeric
    /// segment that follows the first segment matching one of `patterns` (PEFT's
    /// `layers_pattern`, e.g. `"layers"` or `"h"`); each pattern is a regex
    /// that must match the whole segment. No patterns at all is PEFT's
    /// empty `layers_pattern` (`[]`): the default rule.
    pub fn layers_pattern<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let given: Vec<String> = patterns.into_iter().map(|p| p.as_ref().to_owned()).collect();
        let compiled = given
            .iter()
            // Lazy prefix: the first segment matching the pattern gives
            // the index, as in PEFT.
            .map(|p| Pattern::new(&format!(r"(?:.*?\.)?(?:{p})\.(\d+)(?:\..*)?")))
            .collect();
        self.layers_pattern = (!given.is_empty()).then_some(LayersPattern { given, compiled });
        self
    }

    /// Also keeps a whole trainable copy of the modules named here, per
    /// adapter (PEFT's `modules_to_save`): a classification head, an
    /// embedding for new tokens, a submodule. A name matches every module
    /// whose path ends with it, as PEFT's `key.endswith(name)` does; the
    /// copied modules and everything inside them get no other adapter.
    ///
    /// ```
    /// use peft_core::{modules, Role};
    /// let t = modules(["q_proj", "score"]).modules_to_save(["score"]);
    /// assert!(!t.matches("score", Role::Hidden)); // copied, not adapted
    /// assert_eq!(t.saved_modules(), ["score"]);
    /// ```
    pub fn modules_to_save<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.modules_to_save.extend(names.into_iter().map(Into::into));
        self
    }

    /// The names given to [`modules_to_save`](Self::modules_to_save), as given.
    pub fn saved_modules(&self) -> &[String] {
        &self.modules_to_save
    }

    /// Whether the module at `path` is copied whole by
    /// [`modules_to_save`](Self::modules_to_save): its path ends with one of
    /// the names (PEFT's plain string rule, not a dotted one).
    pub fn is_saved_module(&self, path: &str) -> bool {
        self.modules_to_save.iter().any(|name| path.ends_with(name.as_str()))
    }

    /// The module copied whole that `path` is or lies inside: the shortest
    /// dotted prefix of `path` (`path` itself included) that
    /// [`is_saved_module`](Self::is_saved_module). A slot or tensor inside a
    /// copied module belongs to that copy.
    ///
    /// ```
    /// use peft_core::all_linear;
    /// let targets = all_linear().modules_to_save(["score"]);
    /// assert_eq!(targets.saved_module_containing("score.dense.weight"), Some("score"));
    /// assert_eq!(targets.saved_module_containing("model.norm.weight"), None);
    /// ```
    pub fn saved_module_containing<'p>(&self, path: &'p str) -> Option<&'p str> {
        let ends = path
            .match_indices('.')
            .map(|(at, _)| at)
            .chain(std::iter::once(path.len()));
        ends.map(|end| &path[..end]).find(|prefix| self.is_saved_module(prefix))
    }

    /// Whether `path` is, or lies inside, a module named by
    /// [`modules_to_save`](Self::modules_to_save) in PEFT's dotted sense
    /// (`(^|.*\.)name($|\..*)`): such a layer gets no adapter.
    fn in_saved_module(&self, path: &str) -> bool {
        self.modules_to_save.iter().any(|name| {
            path.match_indices(name.as_str()).any(|(at, _)| {
                let before = &path[..at];
                let after = &path[at + name.len()..];
                (before.is_empty() || before.ends_with('.')) && (after.is_empty() || after.starts_with('.'))
            })
        })
    }

    /// Whether the layer at `path` with `role` is targeted.
    ///
    /// A regex that does not compile matches nothing here; [`validate`](Self::validate)
    /// reports it.
    pub fn matches(&self, path: &str, role: Role) -> bool {
        self.matches_layer(path, role, LayerKind::Linear)
    }

    /// Whether the layer at `path`, with `role` and of `kind`, is targeted.
    pub fn matches_layer(&self, path: &str, role: Role, kind: LayerKind) -> bool {
        self.include.iter().any(|s| s.matches(path, role, kind))
            && !self.exclude.iter().any(|s| s.matches(path, role, kind))
            && !self.in_saved_module(path)
            && self.in_layers(path)
    }

    /// Reports the first regex that does not compile.
    pub fn validate(&self) -> Result<()> {
        let selectors = self.include.iter().chain(&self.exclude).filter_map(|s| match s {
            Selector::Regex(pattern) => Some(pattern),
            _ => None,
        });
        for pattern in selectors.chain(self.layers_pattern.iter().flat_map(|p| &p.compiled)) {
            if let Err(error) = &pattern.compiled {
                return Err(PeftError::InvalidRegex {
                    pattern: pattern.source.clone(),
                    cause: error.clone(),
                });
            }
        }
        Ok(())
    }

    /// The exclusions as PEFT's `exclude_modules`: a list of names, a regex
    /// string, or null. A mix of both kinds is written as one regex.
    pub(crate) fn exclude_modules_json(&self) -> serde_json::Value {
        use serde_json::Value;
        let names = |s: &Selector| match s {
            Selector::Names(names) => Some(names.clone()),
            _ => None,
        };
        match self.exclude.as_slice() {
            [] => Value::Null,
            // One regex is written as it is, so that saving what was loaded
            // writes the same string.
            [Selector::Regex(pattern)] => Value::from(pattern.source.clone()),
            all if all.iter().all(|s| names(s).is_some()) => {
                Value::from(all.iter().filter_map(names).flatten().collect::<Vec<_>>())
            }
            all => Value::from(
                all.iter()
                    .map(|s| match s {
                        Selector::Regex(p) => format!("(?:{})", p.source),
                        Selector::Names(names) => {
                            let alternatives: Vec<String> = names.iter().map(|n| regex::escape(n)).collect();
                            format!("(?:.*\\.)?(?:{})", alternatives.join("|"))
                        }
                        Selector::AllLinear => ".*".to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
        }
    }

    /// Indices into `candidates` (each a layer's path, role and kind) of the
    /// targeted layers, in the order given.
    ///
    /// Errors when nothing matches the includes, or when the exclusions or
    /// the layer filter remove every match.
    pub fn resolve<'p>(&self, candidates: impl IntoIterator<Item = (&'p str, Role, LayerKind)>) -> Result<Vec<usize>> {
        self.validate()?;
        let candidates: Vec<(&str, Role, LayerKind)> = candidates.into_iter().collect();
        let matched: Vec<usize> = (0..candidates.len())
            .filter(|&i| {
                let (path, role, kind) = candidates[i];
                self.include.iter().any(|s| s.matches(path, role, kind))
            })
            .collect();
        if matched.is_empty() {
            return Err(PeftError::NoTargetMatched {
                requested: self.describe_include(),
                candidates: candidates.len(),
            });
        }
        let kept: Vec<usize> = matched
            .iter()
            .copied()
            .filter(|&i| {
                let (path, role, kind) = candidates[i];
                !self.exclude.iter().any(|s| s.matches(path, role, kind)) && !self.in_saved_module(path)
            })
            .collect();
        if kept.is_empty() {
            let mut removed_by = format!("exclude {}", List(&self.exclude));
            if !self.modules_to_save.is_empty() {
                removed_by.push_str(&format!(" and modules_to_save {:?}", self.modules_to_save));
            }
            return Err(PeftError::AllTargetsExcluded {
                requested: self.describe_include(),
                matched: matched.len(),
                removed_by,
            });
        }
        let in_layers: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|&i| self.in_layers(candidates[i].0))
            .collect();
        if in_layers.is_empty() {
            return Err(PeftError::AllTargetsExcluded {
                requested: self.describe_include(),
                matched: kept.len(),
                removed_by: format!(
                    "layers_to_transform [{}]",
                    capped_list(self.layers.as_deref().unwrap_or_default())
                ),
            });
        }
        Ok(in_layers)
    }

    fn in_layers(&self, path: &str) -> bool {
        let Some(indices) = &self.layers else {
            return true;
        };
        let index = match &self.layers_pattern {
            None => layer_index(path),
            Some(patterns) => patterns.compiled.iter().find_map(|p| {
                let captures = p.compiled.as_ref().ok()?.captures(path)?;
                captures.get(1)?.as_str().parse().ok()
            }),
        };
        index.is_some_and(|i| indices.contains(&i))
    }

    /// `layers_to_transform` and `layers_pattern` as PEFT saves them: the
    /// layer indices (null without a layer filter) and the patterns as
    /// given (null without a layer filter or without patterns).
    pub(crate) fn layer_filters_json(&self) -> (serde_json::Value, serde_json::Value) {
        use serde_json::Value;
        match &self.layers {
            None => (Value::Null, Value::Null),
            Some(layers) => (
                Value::from(layers.clone()),
                self.layers_pattern
                    .as_ref()
                    .map_or(Value::Null, |p| Value::from(p.given.clone())),
            ),
        }
    }

    fn describe_include(&self) -> String {
        List(&self.include).to_string()
    }
}

/// The layer index PEFT 0.21 reads from `path` for `layers_to_transform`
/// (`check_target_module_exists`): with no `patterns`, the first number
/// with a segment before it and a `.` after it beyond the first segment
/// (`re.match(r".*?\.[^.]*\.(\d+)\.", path)`); else the number after the
/// first pattern that matches, each pasted ungrouped into
/// `(?:^|.*?\.){pattern}\.(\d+)\.`. `None` where PEFT finds no index (or a
/// pattern is not a regex this crate compiles). This crate's own rule is
/// [`layer_index`]; they differ on purpose in places (docs/guide/targets.md).
pub fn peft_layer_index(path: &str, patterns: &[String]) -> Option<usize> {
    let index =
        |regex: &str| -> Option<usize> { Regex::new(regex).ok()?.captures(path)?.get(1)?.as_str().parse().ok() };
    if patterns.is_empty() {
        return index(r"^.*?\.[^.]*\.(\d+)\.");
    }
    patterns
        .iter()
        .find_map(|pattern| index(&format!(r"^(?:^|.*?\.){pattern}\.(\d+)\.")))
}

/// The first numeric segment of a dotted path.
pub fn layer_index(path: &str) -> Option<usize> {
    path.split('.').find_map(|segment| segment.parse().ok())
}

impl Selector {
    fn matches(&self, path: &str, role: Role, kind: LayerKind) -> bool {
        match self {
            Selector::AllLinear => role == Role::Hidden && kind == LayerKind::Linear,
            Selector::Names(names) => names.iter().any(|name| name_matches(path, name)),
            Selector::Regex(pattern) => pattern.compiled.as_ref().is_ok_and(|re| re.is_match(path)),
        }
    }
}

/// Which tokens' embedding rows train, and where (PEFT's
/// `trainable_token_indices` of a LoRA config).
///
/// ```
/// use peft_core::TokenIndices;
/// let tokens = TokenIndices::Modules(vec![("embed_tokens".into(), vec![3, 7])]);
/// assert_eq!(tokens.to_peft_json().to_string(), r#"{"embed_tokens":[3,7]}"#);
/// assert_eq!(TokenIndices::Embedding(vec![3, 7]).to_peft_json().to_string(), "[3,7]");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIndices {
    /// PEFT's list form: these rows of the model's input embedding, found
    /// here as its one embedding layer.
    Embedding(Vec<usize>),
    /// PEFT's dict form: `(module name, rows)`, each name matching module
    /// paths by PEFT's list rule ([`name_matches`]).
    Modules(Vec<(String, Vec<usize>)>),
}

impl TokenIndices {
    /// The value as PEFT writes it: a list, or an object of lists.
    pub fn to_peft_json(&self) -> serde_json::Value {
        match self {
            TokenIndices::Embedding(indices) => serde_json::Value::from(indices.clone()),
            TokenIndices::Modules(modules) => modules
                .iter()
                .map(|(name, indices)| (name.clone(), serde_json::Value::from(indices.clone())))
                .collect(),
        }
    }
}

/// PEFT's list rule: `path == name` or `path` ends with `.name`.
pub fn name_matches(path: &str, name: &str) -> bool {
    path.strip_suffix(name)
        .is_some_and(|head| head.is_empty() || head.ends_with('.'))
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::AllLinear => f.write_str("all_linear()"),
            // A config may list thousands of modules: name the first few.
            Selector::Names(names) => {
                let quoted: Vec<String> = names.iter().map(|name| format!("{name:?}")).collect();
                write!(f, "[{}]", capped_list(&quoted))
            }
            Selector::Regex(pattern) => write!(f, "regex({:?})", pattern.source),
        }
    }
}

/// Selectors joined with ` or `.
struct List<'a>(&'a [Selector]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, selector) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "{selector}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", List(&self.include))?;
        if !self.exclude.is_empty() {
            write!(f, " excluding {}", List(&self.exclude))?;
        }
        if let Some(layers) = &self.layers {
            write!(f, " in layers [{}]", capped_list(layers))?;
        }
        Ok(())
    }
}
