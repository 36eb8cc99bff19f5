//! The layering of peft-core, checked: imports run one way.
//!
//! Every `crate::` path in the code of `peft-core/src` (comments and doc
//! comments are not code) names the room it reaches into; a room may reach
//! only into rooms to its left in [`ROOMS`], and a kind only into the
//! shared part of `kinds/`, never into a sibling kind. A failure names the
//! file, the line and the rule.
//!
//! Also checked: the slot (`layer/`) never names an adapter kind, even in
//! a string, and no file under `peft-core/src` passes 600 lines except
//! those in [`LONG_FILES`], each with its reason.

use std::path::{Path, PathBuf};

/// The rooms, from the bottom up: a file may import only from rooms before
/// its own (and from its own room). A room is a file or folder under
/// `peft-core/src`, named without `.rs`; the most specific one applies.
const ROOMS: &[&[&str]] = &[
    &["error", "path", "kernels"],
    &["layer"],
    &["adaptable"],
    &["targets"],
    &["kinds/config_file"],
    &["kinds/config"],
    &["kinds/registry"],
    // One room per kind: siblings, none may import another.
    &[
        "kinds/lora",
        "kinds/ia3",
        "kinds/lycoris",
        "kinds/modules_to_save",
        "kinds/trainable_tokens",
    ],
    // The folder's `mod.rs`, which declares and re-exports the kinds.
    &["kinds"],
    &["io"],
    &["model"],
    &["lib"],
];

/// Macros exported at the crate root (`#[macro_export]`), by the room that
/// defines them: `crate::register_adapter_kind!` reaches into that room.
const ROOT_MACROS: &[(&str, &str)] = &[("register_adapter_kind", "kinds/registry")];

/// Files allowed past 600 lines, and why.
const LONG_FILES: &[(&str, &str)] = &[(
    "kernels/ops.rs",
    "the differentiable CPU ops form one family (norms, attention, rope, \
     cross entropy) sharing private helpers; splitting them would expose those helpers",
)];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peft-core/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `kinds/lora/dora.rs` -> `kinds/lora/dora`; `layer/mod.rs` -> `layer`.
fn module_path(file: &Path) -> String {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let text = relative.to_string_lossy().replace('\\', "/");
    text.strip_suffix("/mod").unwrap_or(&text).to_owned()
}

/// The rank of the most specific room holding `module` (`kinds/lora/dora`
/// is in `kinds/lora`), and that room's name.
fn room_of(module: &str) -> Option<(usize, &'static str)> {
    let mut best: Option<(usize, &'static str)> = None;
    for (rank, rooms) in ROOMS.iter().enumerate() {
        for room in *rooms {
            let inside = module == *room || module.starts_with(&format!("{room}/"));
            if inside && best.is_none_or(|(_, b)| room.len() > b.len()) {
                best = Some((rank, room));
            }
        }
    }
    best
}

/// The code of a line: without a `//` comment (outside string literals,
/// which is all this crate needs), trimmed.
fn code_of(line: &str) -> &str {
    let mut in_string = false;
    let bytes = line.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return line[..i].trim(),
            _ => {}
        }
    }
    line.trim()
}

/// The modules a line of code reaches through `crate::`: `crate::kinds::lora::X`
/// gives `kinds/lora/X` (a trailing item name is harmless: rooms match by
/// prefix). `$crate::` (macro bodies) is not a reference from this file.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = &rest[..at];
        rest = &rest[at + "crate::".len()..];
        if before.ends_with('$') || before.ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let path = rest
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .next()
            .unwrap_or("");
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let after = &rest[path.len()..];
        if let Some((_, room)) = ROOT_MACROS
            .iter()
            .find(|(name, _)| segments == [*name] && after.starts_with('!'))
        {
            found.push((*room).to_owned());
        } else if segments.is_empty() {
            // `crate::{a, b}`: a group could cross rooms unseen.
            found.push("{".to_owned());
        } else {
            found.push(segments.join("/"));
        }
    }
    found
}

/// Every broken rule, as `file:line: message`.
fn violations() -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in &files {
        let module = module_path(file);
        let relative = file.strip_prefix(src()).unwrap().to_string_lossy().replace('\\', "/");
        if module == "lib" {
            // The crate root re-exports everything; nothing imports it.
            continue;
        }
        let Some((rank, room)) = room_of(&module) else {
            problems.push(format!(
                "{module}: in no room of tests/architecture.rs ROOMS; add it there"
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        let mut in_tests = false;
        for (number, line) in text.lines().enumerate() {
            let code = code_of(line);
            // Unit tests at the end of a file may use anything.
            if code == "#[cfg(test)]" {
                in_tests = true;
            }
            // Doc attributes hold text (links), not imports.
            if in_tests || code.is_empty() || code.starts_with("#[doc") {
                continue;
            }
            let at = format!("peft-core/src/{relative}:{}", number + 1);
            if room == "layer" {
                for kind in [
                    "LORA", "Lora", "lora", "Dora", "DORA", "IA3", "Ia3", "LOHA", "Loha", "LOKR", "Lokr",
                ] {
                    if code.contains(kind) {
                        problems.push(format!("{at}: the slot names the adapter kind `{kind}`: `{code}`"));
                    }
                }
            }
            for target in crate_paths(code) {
                if target == "{" {
                    problems.push(format!(
                        "{at}: `crate::{{...}}` groups can cross rooms unseen; write one `use crate::room::...` per room: `{code}`"
                    ));
                    continue;
                }
                let Some((target_rank, target_room)) = room_of(&target) else {
                    problems.push(format!(
                        "{at}: `crate::{}` goes through the crate root's re-exports; import from the module that defines it: `{code}`",
                        target.replace('/', "::")
                    ));
                    continue;
                };
                if target_rank > rank {
                    problems.push(format!(
                        "{at}: `{room}` imports `{target_room}`, which stands to its right (imports run {}): `{code}`",
                        ROOMS.iter().map(|r| r.join("|")).collect::<Vec<_>>().join(" -> ")
                    ));
                } else if target_rank == rank && target_room != room {
                    problems.push(format!(
                        "{at}: `{room}` imports its sibling `{target_room}`; move what they share to a room to their left: `{code}`"
                    ));
                }
            }
        }
        let lines = text.lines().count();
        if lines > 600 && !LONG_FILES.iter().any(|(name, _)| *name == relative) {
            problems.push(format!(
                "peft-core/src/{relative}: {lines} lines (over 600): split it, or list it in LONG_FILES with the reason"
            ));
        }
    }
    problems
}

#[test]
fn imports_run_one_way() {
    let problems = violations();
    assert!(
        problems.is_empty(),
        "peft-core's layering is broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_what_it_checks() {
    // The rule table covers the tree, and the parser finds paths.
    assert_eq!(room_of("kinds/lora/dora"), Some((7, "kinds/lora")));
    assert_eq!(room_of("kinds/config_file"), Some((4, "kinds/config_file")));
    assert_eq!(room_of("kinds"), Some((8, "kinds")));
    assert_eq!(room_of("layer/slot"), Some((1, "layer")));
    assert_eq!(
        crate_paths("use crate::kinds::lora::{LoraAdapter, PEFT_TYPE};"),
        ["kinds/lora"]
    );
    assert_eq!(crate_paths("$crate::AdapterKind::of::<C>()"), Vec::<String>::new());
    assert_eq!(crate_paths("use crate::{a::X, b::Y};"), ["{"]);
    assert_eq!(
        crate_paths("crate::register_adapter_kind!(LoraConfig);"),
        ["kinds/registry"]
    );
    assert_eq!(code_of(r#"let s = "a // b"; // comment"#), r#"let s = "a // b";"#);
    // A layer file importing a kind is reported, naming the file and line.
    let layer = room_of("layer/slot").unwrap().0;
    let lora = room_of(&crate_paths("use crate::kinds::lora::LoraAdapter;")[0])
        .unwrap()
        .0;
    assert!(lora > layer);
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    assert!(files.len() > 20, "{} files", files.len());
}
