//! Every example configuration the docs and deploy/ show passes `keybroker config check`, the
//! command users are told to run on their copy: TOML blocks in README.md, docs/*.md and
//! deploy/README.md that configure at least one key (fragments showing a single section are
//! skipped), the `keybroker.toml` of every ConfigMap under deploy/, and every file under
//! docs/examples/ (tests/multi.rs also serves two-keyrings.toml).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::keybroker_bin;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// (where, TOML text) of each fenced ```toml block in a Markdown file.
fn markdown_blocks(file: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => {
                current = Some((i + 1, String::new()))
            }
            None => {}
            Some(_) if line.trim_start().starts_with("```") => {
                let (at, body) = current.take().unwrap();
                out.push((format!("{}:{at}", file.display()), body));
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    out
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// (where, TOML text) of each ConfigMap's `keybroker.toml` under deploy/.
fn configmap_configs() -> Vec<(String, String)> {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        for doc in docs {
            if doc["kind"] == "ConfigMap"
                && let Some(toml) = doc["data"]["keybroker.toml"].as_str()
            {
                out.push((file.display().to_string(), toml.to_owned()));
            }
        }
    }
    out
}

#[test]
fn every_example_config_passes_config_check() {
    let mut examples = Vec::new();
    let mut markdown = vec![root().join("README.md"), root().join("deploy/README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    markdown.extend(docs);
    let mut fragments = 0;
    for file in &markdown {
        for (at, toml) in markdown_blocks(file) {
            // A complete example configures a key; others show one section in isolation.
            if toml
                .lines()
                .any(|l| l.trim_start().starts_with("backend ="))
            {
                examples.push((at, toml));
            } else {
                fragments += 1;
            }
        }
    }
    let from_markdown = examples.len();
    examples.extend(configmap_configs());
    // The standalone example files (docs/examples/*.toml), each one runnable as it is.
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("two-keyrings.toml")),
        "{files:?}"
    );
    let example_files = files.len();
    for f in files {
        examples.push((
            f.display().to_string(),
            std::fs::read_to_string(&f).unwrap(),
        ));
    }
    assert!(
        from_markdown >= 5 && examples.len() - from_markdown - example_files >= 3,
        "found {from_markdown} Markdown examples and {} ConfigMaps: the walk is broken",
        examples.len() - from_markdown - example_files
    );
    let dir = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    for (i, (at, toml)) in examples.iter().enumerate() {
        let file = dir.path().join(format!("example-{i}.toml"));
        std::fs::write(&file, toml).unwrap();
        let out = Command::new(keybroker_bin())
            .args(["config", "check"])
            .arg(&file)
            .output()
            .unwrap();
        if !out.status.success() {
            failed.push(format!("{at}:\n{}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} example(s) fail `config check` ({fragments} fragment(s) skipped):\n{}",
        failed.len(),
        examples.len(),
        failed.join("\n")
    );
}
