//! The module map at the top of `src/lib.rs`, enforced: every path into the crate
//! (`use crate::…`, `pub use` re-exports, `crate::x::…` and `super::…` paths in code, test
//! modules included) must point at a module of a lower level than its own, and the map's
//! "never" rules hold. The map is read from `src/lib.rs` itself, so the documentation and this
//! check cannot drift apart. Comments and string literals are blanked out before scanning, so a
//! path in a doc comment or a message is not an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One module's place in the map: (layer, step within the layer).
type Level = (u32, u32);

struct Map {
    levels: BTreeMap<String, Level>,
    /// (modules, what they must never use: crate modules or external crates).
    nevers: Vec<(Vec<String>, Vec<String>)>,
}

/// Reads the map from `src/lib.rs`: lines `//! - 4.2 name: `a`, `b`` and
/// `//! - never: `a`, `b` → `x`, `y``.
fn read_map(lib: &str) -> Map {
    let mut levels = BTreeMap::new();
    let mut nevers = Vec::new();
    for line in lib.lines() {
        let Some(item) = line.trim().strip_prefix("//! - ") else {
            continue;
        };
        let names = |s: &str| -> Vec<String> {
            s.split('`').skip(1).step_by(2).map(str::to_owned).collect()
        };
        if let Some(rule) = item.strip_prefix("never: ") {
            let (who, what) = rule
                .split_once('→')
                .unwrap_or_else(|| panic!("a never rule needs →: {line}"));
            nevers.push((names(who), names(what)));
            continue;
        }
        let Some((head, mods)) = item.split_once(':') else {
            continue;
        };
        let Some(number) = head.split_whitespace().next() else {
            continue;
        };
        let mut parts = number.split('.');
        let (Some(Ok(layer)), step) = (
            parts.next().map(str::parse::<u32>),
            parts.next().map(str::parse::<u32>),
        ) else {
            continue;
        };
        let step = match step {
            None => 0,
            Some(Ok(s)) => s,
            Some(Err(_)) => panic!("bad level {number:?} in {line}"),
        };
        for m in names(mods) {
            if levels.insert(m.clone(), (layer, step)).is_some() {
                panic!("module {m} is in the map twice");
            }
        }
    }
    Map { levels, nevers }
}

/// The source with comments, string and char literals replaced by spaces (newlines kept, so
/// line numbers still hold).
fn code_only(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            continue;
        }
        // Raw strings: r"..", r#".."#, br#".."#.
        let ident_before = i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_');
        if c == 'r' && !ident_before || (c == 'b' && next == Some('r') && !ident_before) {
            let mut j = if c == 'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) == Some(&'"') {
                for &c in &b[i..=j] {
                    blank(&mut out, c);
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == '"' && (0..hashes).all(|h| b.get(j + 1 + h) == Some(&'#')) {
                        for _ in 0..=hashes {
                            out.push(' ');
                        }
                        j += 1 + hashes;
                        break;
                    }
                    blank(&mut out, b[j]);
                    j += 1;
                }
                i = j;
                continue;
            }
        }
        if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
            continue;
        }
        if c == '\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let end = if next == Some('\\') {
                (i + 3..b.len().min(i + 12)).find(|&k| b[k] == '\'')
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                for &c in &b[i..=end] {
                    blank(&mut out, c);
                }
                i = end + 1;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Expands a use tree (`crate::{a, b::{c, d}}`, `super::x as y`, `self::*`) into paths.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    // Split at the first top-level `{`.
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let close = tree.rfind('}').unwrap_or(tree.len());
        let inner = &tree[open + 1..close];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (k, ch) in inner.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[start..k], &base, out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand(&inner[start..], &base, out);
        return;
    }
    let path = tree.split(" as ").next().unwrap_or(tree).trim();
    out.push(join(prefix, path));
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty() || path == "self") {
        (_, true) => prefix.to_owned(),
        (true, false) => path.to_owned(),
        (false, false) => format!("{prefix}::{path}"),
    }
}

/// A path as written, resolved against the module it is written in (`super` and `self`), to
/// the crate's top-level module it names: `None` for paths outside the crate.
fn target(path: &str, module: &[String]) -> Option<String> {
    let segs: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut at: Vec<String> = module.to_vec();
    let mut rest = &segs[..];
    match rest.first() {
        Some(&"crate") => {
            at.clear();
            rest = &rest[1..];
        }
        Some(&"super") | Some(&"self") => {
            while let Some(&s) = rest.first() {
                match s {
                    "super" => {
                        at.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    match at.first() {
        Some(top) => Some(top.clone()),
        None => rest
            .first()
            .filter(|s| !s.is_empty() && **s != "*")
            .map(|s| s.to_string()),
    }
}

/// Every crate path in one file: (line, path as written, module it is written in).
fn references(file_module: &[String], code: &str) -> Vec<(usize, String, Vec<String>)> {
    let text = code;
    let line_of = |byte: usize| text[..byte].matches('\n').count() + 1;
    let mut out = Vec::new();
    // Inline modules (`mod tests { .. }`) change what `super` means inside them.
    let mut stack: Vec<(String, i32)> = Vec::new();
    let mut depth = 0i32;
    let bytes = text.as_bytes();
    let word_at = |k: usize, w: &str| {
        text[k..].starts_with(w)
            && (k == 0 || !(bytes[k - 1].is_ascii_alphanumeric() || bytes[k - 1] == b'_'))
            && text[k + w.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    };
    let mut k = 0;
    while k < text.len() {
        if !text.is_char_boundary(k) {
            k += 1;
            continue;
        }
        let module = |stack: &[(String, i32)]| -> Vec<String> {
            file_module
                .iter()
                .cloned()
                .chain(stack.iter().map(|(m, _)| m.clone()))
                .collect()
        };
        match bytes[k] {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
            }
            _ => {}
        }
        if word_at(k, "mod") {
            let rest = text[k + 3..].trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && rest[name.len()..].trim_start().starts_with('{') {
                stack.push((name, depth));
            }
        }
        if word_at(k, "use") {
            let end = text[k..].find(';').map_or(text.len(), |e| k + e);
            let mut paths = Vec::new();
            expand(&text[k + 3..end], "", &mut paths);
            let at = module(&stack);
            for p in paths {
                out.push((line_of(k), p, at.clone()));
            }
            k = end;
            continue;
        }
        let path_start = ["crate", "super"]
            .into_iter()
            .any(|w| word_at(k, w) && text[k + w.len()..].starts_with("::"));
        if path_start {
            let end = text[k..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(text.len(), |e| k + e);
            out.push((line_of(k), text[k..end].to_owned(), module(&stack)));
            k = end;
            continue;
        }
        k += 1;
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src/` (`src/backend/aws/mod.rs` → `backend::aws`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod") {
        segs.pop();
    }
    segs
}

/// Every violation of the map in `src/`, as readable lines (empty: the map holds).
pub fn violations(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let map = read_map(&lib);
    let mut problems = Vec::new();
    // The map names every module the crate declares, and nothing else.
    let declared: BTreeSet<String> = code_only(&lib)
        .lines()
        .filter_map(|l| {
            // Only the crate's own top-level modules: nested ones (`proto::tests`) are not
            // crate modules of the map.
            if l.starts_with(char::is_whitespace) {
                return None;
            }
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?;
            Some(
                name.trim_end_matches(';')
                    .trim_end_matches('{')
                    .trim()
                    .to_owned(),
            )
        })
        .collect();
    let mapped: BTreeSet<String> = map.levels.keys().cloned().collect();
    for m in declared.difference(&mapped) {
        problems.push(format!("src/lib.rs: module `{m}` is not in the module map"));
    }
    for m in mapped.difference(&declared) {
        problems.push(format!(
            "src/lib.rs: the module map names `{m}`, which the crate does not declare"
        ));
    }
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    for file in files {
        let module = module_of(src, &file);
        let Some(top) = module.first().cloned() else {
            continue;
        };
        if top == "lib" || top == "main" {
            continue;
        }
        let shown = file.strip_prefix(src.parent().unwrap()).unwrap().display();
        let Some(&level) = map.levels.get(&top) else {
            problems.push(format!("{shown}: module `{top}` is not in the module map"));
            continue;
        };
        let raw = std::fs::read_to_string(&file).unwrap();
        let code = code_only(&raw);
        for (line, path, at) in references(&module, &code) {
            let Some(to) = target(&path, &at) else {
                continue;
            };
            if to == top {
                continue;
            }
            match map.levels.get(&to) {
                None => problems.push(format!(
                    "{shown}:{line}: `{path}` names `{to}`, which is not in the module map"
                )),
                Some(&l) if l >= level => problems.push(format!(
                    "{shown}:{line}: `{top}` (level {}.{}) uses `{path}`: `{to}` is level {}.{}, not below",
                    level.0, level.1, l.0, l.1
                )),
                Some(_) => {}
            }
            for (who, what) in &map.nevers {
                if who.contains(&top) && what.contains(&to) {
                    problems.push(format!(
                        "{shown}:{line}: `{top}` must never use `{to}` (`{path}`)"
                    ));
                }
            }
        }
        // Never rules about external crates: any mention of `name::` or `use name`.
        for (who, what) in &map.nevers {
            if !who.contains(&top) {
                continue;
            }
            for ext in what.iter().filter(|w| !map.levels.contains_key(*w)) {
                for (n, l) in code.lines().enumerate() {
                    let hit = l
                        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .any(|tok| tok == *ext || tok.starts_with(&format!("{ext}::")));
                    if hit {
                        problems.push(format!("{shown}:{}: `{top}` must never use `{ext}`", n + 1));
                    }
                }
            }
        }
    }
    problems
}

#[test]
fn every_import_points_down_the_module_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let problems = violations(&src);
    assert!(
        problems.is_empty(),
        "the module map in src/lib.rs is violated:\n  {}",
        problems.join("\n  ")
    );
}

/// The scanner itself, on the shapes the crate uses: nested groups, re-exports, `super` in a
/// folder and in an inline test module, paths in code, and text that only looks like a path.
#[test]
fn the_scanner_sees_every_kind_of_path() {
    let code = code_only(
        r##"
use crate::{a, b::{c, d::E}};
pub use crate::f::G;
pub(crate) use super::h;
// use crate::commented;
let s = "crate::in_a_string";
let r = r#"crate::in_a_raw_string"#;
let c = '{';
fn x<'a>(v: &'a str) { crate::i::j(v) }
mod tests {
    use super::*;
    use super::super::k::L;
}
"##,
    );
    let module = vec!["backend".to_owned(), "aws".to_owned()];
    let found: Vec<(String, Option<String>)> = references(&module, &code)
        .into_iter()
        .map(|(_, p, at)| {
            let t = target(&p, &at);
            (p, t)
        })
        .collect();
    let targets: Vec<Option<&str>> = found.iter().map(|(_, t)| t.as_deref()).collect();
    assert_eq!(
        targets,
        [
            Some("a"),
            Some("b"),
            Some("b"),
            Some("f"),
            Some("backend"),
            Some("i"),
            Some("backend"),
            Some("backend"),
        ],
        "{found:?}"
    );
    let mut paths = Vec::new();
    expand(" crate::{a, b::{self, c as d}, e::*}", "", &mut paths);
    assert_eq!(
        paths,
        ["crate::a", "crate::b", "crate::b::c", "crate::e::*"]
    );
}
