//! `keybroker inject file`: offline injection for GitOps. Reads a (multi-document) YAML manifest,
//! runs the webhook's mutation on every pod template it finds, and prints the result. Documents
//! that hold no pod template (Services, ConfigMaps, ...) are printed unchanged.
//!
//! Must never: change a document it does not inject (it is re-emitted from the same values; only
//! comments and key order are lost, as with `istioctl kube-inject`), or print a partial manifest
//! when one document fails (the whole command fails and prints nothing).
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
    let mut docs = parse_documents(text)?;
    let mut reports = Vec::new();
    for doc in &mut docs {
        inject_document(doc, settings, trigger, &mut reports)?;
    }
    let mut out =
        serde_saphyr::to_string_multiple(&docs).map_err(|e| FileError::Emit(e.to_string()))?;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok((out, reports))
}

pub(super) fn run(args: FileArgs) -> crate::cli::CliResult {
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
