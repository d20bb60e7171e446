//! `keybroker inject file`: offline injection for GitOps. Reads a (multi-document) YAML manifest,
//! runs the webhook's mutation on every pod template it finds, and prints the result. Documents
//! that hold no pod template (Services, ConfigMaps, ...) are printed unchanged.
//!
//! Must never: change a document it does not inject (those are printed byte for byte, comments,
//! quoting and `0644` included; only injected documents are re-emitted from their values, which
//! loses their comments, as with `istioctl kube-inject`), or print a partial manifest when one
//! document fails (the whole command fails and prints nothing).
//!
//! YAML is read with YAML 1.1 integer rules (`0644` is octal, as kubectl reads it) so that
//! `defaultMode: 0644` keeps its meaning.

use std::io::Read;

use serde_json::Value;

use super::mutate::{self, Decision, InjectError, Skip, Trigger};
use super::{FileArgs, Settings};

/// Where a kind keeps its pod template, as a JSON Pointer.
pub fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to one workload, for the summary on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Kind/name`.
    pub workload: String,
    pub result: Result<(), Skip>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("{workload}: {source}")]
    Inject {
        workload: String,
        #[source]
        source: InjectError,
    },
    #[error("cannot write YAML: {0}")]
    Emit(String),
}

fn workload_name(doc: &Value) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{kind}/{name}")
}

/// Injects into one document (recursing into `kind: List`), appending to `reports`.
pub fn inject_document(
    doc: &mut Value,
    settings: &Settings,
    trigger: Trigger,
    reports: &mut Vec<Report>,
) -> Result<(), FileError> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
    if kind == "List" {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_document(item, settings, trigger, reports)?;
            }
        }
        return Ok(());
    }
    let Some(pointer) = template_pointer(kind) else {
        return Ok(());
    };
    let workload = workload_name(doc);
    let Some(template) = doc.pointer_mut(pointer) else {
        return Err(FileError::Inject {
            workload,
            source: InjectError::Malformed(format!("no pod template at {pointer:?}")),
        });
    };
    let err = |source| FileError::Inject {
        workload: workload.clone(),
        source,
    };
    match mutate::decide(template, settings, trigger).map_err(err)? {
        Decision::Skip(why) => reports.push(Report {
            workload,
            result: Err(why),
        }),
        Decision::Inject { patch, .. } => {
            mutate::apply(template, &patch).map_err(err)?;
            reports.push(Report {
                workload,
                result: Ok(()),
            });
        }
    }
    Ok(())
}

/// Parses YAML documents into JSON values (Kubernetes manifests are JSON-compatible).
pub fn parse_documents(text: &str) -> Result<Vec<Value>, FileError> {
    let options = serde_saphyr::options! { legacy_octal_numbers: true };
    serde_saphyr::from_multiple_with_options::<Value>(text, options)
        .map_err(|e| FileError::Yaml(e.to_string()))
}

/// The whole transformation: YAML text in, YAML text out.
pub fn inject_text(
    text: &str,
    settings: &Settings,
    trigger: Trigger,
) -> Result<(String, Vec<Report>), FileError> {
    let docs = parse_documents(text)?;
    // Each document's own text, so that documents left alone are printed as they came. If the
    // split disagrees with the parser (directives, unusual markers), every document is
    // re-emitted instead: still the same values.
    let pieces = split_documents(text);
    let mut parsed = Vec::with_capacity(pieces.len());
    for p in &pieces {
        parsed.push(parse_documents(p.body).ok().filter(|d| d.len() <= 1));
    }
    let agrees =
        parsed.iter().all(Option::is_some) && parsed.iter().flatten().flatten().eq(docs.iter());
    let mut reports = Vec::new();
    if !agrees {
        let mut docs = docs;
        for doc in &mut docs {
            inject_document(doc, settings, trigger, &mut reports)?;
        }
        let mut out =
            serde_saphyr::to_string_multiple(&docs).map_err(|e| FileError::Emit(e.to_string()))?;
        if !out.ends_with('\n') {
            out.push('\n');
        }
        return Ok((out, reports));
    }
    let mut out = String::with_capacity(text.len() + 4096);
    for (piece, doc) in pieces.iter().zip(parsed.into_iter().flatten()) {
        out.push_str(piece.marker);
        let Some(mut doc) = doc.into_iter().next() else {
            out.push_str(piece.body);
            continue;
        };
        let before = reports.len();
        inject_document(&mut doc, settings, trigger, &mut reports)?;
        if reports[before..].iter().any(|r| r.result.is_ok()) {
            let mut yaml =
                serde_saphyr::to_string(&doc).map_err(|e| FileError::Emit(e.to_string()))?;
            let yaml = yaml
                .strip_prefix("---\n")
                .map(str::to_owned)
                .unwrap_or_else(|| std::mem::take(&mut yaml));
            out.push_str(&yaml);
            if !out.ends_with('\n') {
                out.push('\n');
            }
        } else {
            out.push_str(piece.body);
        }
    }
    Ok((out, reports))
}

/// One document's text: its `---` line (empty for a first document without one) and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece<'a> {
    pub marker: &'a str,
    pub body: &'a str,
}

/// Splits YAML text where the YAML spec starts documents: at every line beginning with `---`
/// followed by a space, a tab or the end of the line. Concatenating the pieces (marker, body)
/// gives back the text exactly. Content after `---` on its line (`--- # note`) stays with the
/// marker only when it is a comment; otherwise the line is the document's first.
pub fn split_documents(text: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let (mut marker, mut body_start, mut at) = ("", 0, 0);
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\n', '\r']));
        if !is_marker {
            continue;
        }
        // Close the current piece; nothing before a first marker at offset 0 is no piece.
        if start > 0 {
            pieces.push(Piece {
                marker,
                body: &text[body_start..start],
            });
        }
        let rest = line[3..].trim();
        if rest.is_empty() || rest.starts_with('#') {
            (marker, body_start) = (&text[start..at], at);
        } else {
            (marker, body_start) = (&text[start..start + 3], start + 3);
        }
    }
    pieces.push(Piece {
        marker,
        body: &text[body_start..],
    });
    pieces
}

pub(super) fn run(args: FileArgs) -> crate::command::CliResult {
    let settings = super::settings_or_error(&args.sidecar)?;
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| format!("cannot read {}: {e}", args.file.display()))?
    };
    let trigger = if args.all {
        Trigger::Always
    } else {
        Trigger::Annotated
    };
    let (out, reports) = inject_text(&text, &settings, trigger)?;
    print!("{out}");
    for r in &reports {
        match r.result {
            Ok(()) => eprintln!("injected {}", r.workload),
            Err(Skip::NotRequested) => eprintln!(
                "skipped {} (no {}: \"true\"; --all injects it anyway)",
                r.workload,
                super::annotations::INJECT
            ),
            Err(why) => eprintln!("skipped {} ({})", r.workload, why.as_str()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - port: 80
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template:
    metadata:
      annotations:
        keybroker.io/inject: "true"
        note: "0666"
    spec:
      containers:
      - name: web
        image: nginx
      volumes:
      - name: cfg
        configMap:
          name: cfg
          defaultMode: 0644
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers:
          - name: job
"#;

    #[test]
    fn injects_annotated_templates_only() {
        let (out, reports) =
            inject_text(MANIFEST, &Settings::default(), Trigger::Annotated).unwrap();
        assert_eq!(
            reports,
            vec![
                Report {
                    workload: "Deployment/web".into(),
                    result: Ok(())
                },
                Report {
                    workload: "CronJob/nightly".into(),
                    result: Err(Skip::NotRequested)
                },
            ]
        );
        let docs = parse_documents(&out).unwrap();
        assert_eq!(docs.len(), 3);
        let original = parse_documents(MANIFEST).unwrap();
        assert_eq!(docs[0], original[0]);
        assert_eq!(docs[2], original[2]);
        let t = &docs[1]["spec"]["template"];
        assert_eq!(t["spec"]["initContainers"][0]["name"], "keybroker");
        // Strings stay strings, octal stays its value.
        assert_eq!(t["metadata"]["annotations"]["keybroker.io/inject"], "true");
        assert_eq!(t["metadata"]["annotations"]["note"], "0666");
        assert_eq!(t["spec"]["volumes"][0]["configMap"]["defaultMode"], 0o644);

        let (_, reports) = inject_text(MANIFEST, &Settings::default(), Trigger::Always).unwrap();
        assert!(reports.iter().all(|r| r.result.is_ok()));
    }

    /// Documents that are not injected come out byte for byte: comments, quoting, octal.
    #[test]
    fn documents_left_alone_are_printed_as_they_came() {
        let (out, reports) =
            inject_text(MANIFEST, &Settings::default(), Trigger::Annotated).unwrap();
        assert_eq!(reports.len(), 2);
        let pieces = split_documents(MANIFEST);
        assert_eq!(pieces.len(), 3);
        assert!(out.starts_with(pieces[0].body), "{out}");
        assert!(
            out.ends_with(&format!("{}{}", pieces[2].marker, pieces[2].body)),
            "{out}"
        );

        let commented = "# a comment kept\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}  # trailing\ndata:\n  mode: 0644\n  q: 'single'\n--- # next\nkind: Pod\nmetadata:\n  name: p # the pod\nspec:\n  containers:\n  - name: a\n...\n";
        let (out, reports) =
            inject_text(commented, &Settings::default(), Trigger::Annotated).unwrap();
        assert_eq!(out, commented, "nothing injected: identical output");
        assert_eq!(reports.len(), 1);
        // One injected document among them: the others keep their bytes.
        let (out, _) = inject_text(commented, &Settings::default(), Trigger::Always).unwrap();
        assert!(out.starts_with("# a comment kept\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}  # trailing\ndata:\n  mode: 0644\n  q: 'single'\n--- # next\n"), "{out}");
        assert!(out.contains("keybroker"), "{out}");
        assert_eq!(parse_documents(&out).unwrap().len(), 2);
        // Concatenating the pieces is the text.
        for text in [
            MANIFEST,
            commented,
            "",
            "---\n",
            "a: 1\n---\n---\nb: 2",
            "--- {a: 1}\n",
        ] {
            let joined: String = split_documents(text)
                .iter()
                .map(|p| format!("{}{}", p.marker, p.body))
                .collect();
            assert_eq!(joined, text);
        }
    }

    #[test]
    fn a_bad_document_fails_the_whole_run() {
        let bad = "kind: Deployment\nmetadata: {name: x, annotations: {}}\nspec: {}\n";
        let e = inject_text(bad, &Settings::default(), Trigger::Always).unwrap_err();
        assert!(
            e.to_string().starts_with("Deployment/x: no pod template"),
            "{e}"
        );
        let e = inject_text("a: [", &Settings::default(), Trigger::Always).unwrap_err();
        assert!(matches!(e, FileError::Yaml(_)));
    }
}
