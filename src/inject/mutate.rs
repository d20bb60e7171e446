//! The pod mutation, as an RFC 6902 JSON Patch of `add` operations against a pod (or a pod
//! template: both have `metadata` and `spec`). The webhook returns the patch; `inject file`
//! applies it with [`apply`]. Patches are small and explicit (one operation per added thing), so
//! an audit log of the API server shows exactly what the injector did.
//!
//! Must never: touch anything but what it adds, overwrite a value the pod already set (an app's
//! own `KEYBROKER_ADDR` wins), or panic on any JSON.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{
    ADMIN_PORT_NAME, CONFIG_DIR, CONFIG_FILE, CONFIG_VOLUME, CONTAINER_NAME, RUN_AS, SOCKET_ADDR,
    SOCKET_DIR, SOCKET_MODE, SOCKET_VOLUME, STATUS_INJECTED, Settings, SidecarMode, annotations,
};

/// Which pods are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Only pods annotated `keybroker.io/inject: "true"` (the webhook; `inject file` by default).
    Annotated,
    /// Every pod not annotated `"false"` (`inject file --all`).
    Always,
}

/// One JSON Patch operation (only `add` is ever produced).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatchOp {
    pub op: &'static str,
    pub path: String,
    pub value: Value,
}

impl PatchOp {
    fn add(path: String, value: Value) -> Self {
        Self {
            op: "add",
            path,
            value,
        }
    }
}

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No `keybroker.io/inject: "true"`.
    NotRequested,
    /// `keybroker.io/inject: "false"`.
    OptedOut,
    /// Already carries the status marker or a `keybroker` container.
    AlreadyInjected,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRequested => "not requested",
            Self::OptedOut => "opted out",
            Self::AlreadyInjected => "already injected",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Skip(Skip),
    Inject {
        patch: Vec<PatchOp>,
        /// Shown to the user by kubectl (admission warnings).
        warnings: Vec<String>,
    },
}

/// Why a pod that asked for the sidecar cannot get it. The message is shown to whoever created
/// the pod, so it says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("bad keybroker annotations: {}", .0.join("; "))]
    Annotations(Vec<String>),
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    Conflict(String),
}

/// JSON Pointer escaping of one path segment (RFC 6901).
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn object<'a>(
    v: Option<&'a Value>,
    at: &str,
) -> Result<Option<&'a Map<String, Value>>, InjectError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(InjectError::Malformed(format!("{at} must be an object"))),
    }
}

fn array<'a>(v: Option<&'a Value>, at: &str) -> Result<Option<&'a Vec<Value>>, InjectError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(InjectError::Malformed(format!("{at} must be a list"))),
    }
}

fn name_of(v: &Value) -> Option<&str> {
    v.get("name").and_then(Value::as_str)
}

/// Decides what to do with `pod` (an object with `metadata` and `spec`: a Pod or a pod
/// template) and, when injecting, returns the patch.
pub fn decide(pod: &Value, settings: &Settings, trigger: Trigger) -> Result<Decision, InjectError> {
    let Value::Object(pod) = pod else {
        return Err(InjectError::Malformed(
            "the pod is not a JSON object".into(),
        ));
    };
    let metadata = object(pod.get("metadata"), "metadata")?;
    let empty = Map::new();
    let ann = match metadata {
        Some(m) => object(m.get("annotations"), "metadata.annotations")?,
        None => None,
    };
    let ann_map = ann.unwrap_or(&empty);
    match ann_map.get(annotations::INJECT) {
        Some(Value::String(v)) if v == "true" => {}
        Some(Value::String(v)) if v == "false" => return Ok(Decision::Skip(Skip::OptedOut)),
        None if trigger == Trigger::Always => {}
        None => return Ok(Decision::Skip(Skip::NotRequested)),
        Some(other) => {
            return Err(InjectError::Annotations(vec![format!(
                "{}: must be \"true\" or \"false\", not {other}",
                annotations::INJECT
            )]));
        }
    }

    let spec = object(pod.get("spec"), "spec")?
        .ok_or_else(|| InjectError::Malformed("the pod has no spec".into()))?;
    let containers = array(spec.get("containers"), "spec.containers")?
        .filter(|c| !c.is_empty())
        .ok_or_else(|| InjectError::Malformed("spec.containers must be a non-empty list".into()))?;
    let init_containers = array(spec.get("initContainers"), "spec.initContainers")?;
    let all_containers = || {
        containers
            .iter()
            .chain(init_containers.into_iter().flatten())
    };

    if ann_map.get(annotations::STATUS).and_then(Value::as_str) == Some(STATUS_INJECTED)
        || all_containers().any(|c| name_of(c) == Some(CONTAINER_NAME))
    {
        return Ok(Decision::Skip(Skip::AlreadyInjected));
    }

    let s = settings
        .for_pod(ann_map)
        .map_err(InjectError::Annotations)?;

    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Err(InjectError::Conflict(
            "hostNetwork pods cannot get the keybroker sidecar: its admin port (metrics) would \
             listen on the node's network"
                .into(),
        ));
    }
    let volumes = array(spec.get("volumes"), "spec.volumes")?;
    for v in volumes.into_iter().flatten() {
        if let Some(n) = name_of(v).filter(|n| *n == SOCKET_VOLUME || *n == CONFIG_VOLUME) {
            return Err(InjectError::Conflict(format!(
                "the pod already has a volume named {n:?}, which the keybroker sidecar needs"
            )));
        }
    }
    // Containers of a pod share one network namespace, and port names are unique in a pod.
    for c in all_containers() {
        let cname = name_of(c).unwrap_or("");
        let ports = array(c.get("ports"), &format!("ports of container {cname:?}"))?;
        for p in ports.into_iter().flatten() {
            if p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(s.admin_port)) {
                return Err(InjectError::Conflict(format!(
                    "container {cname:?} uses port {}, the keybroker sidecar's admin port; set \
                     the {} annotation to a free port",
                    s.admin_port,
                    annotations::ADMIN_PORT
                )));
            }
            if name_of(p) == Some(ADMIN_PORT_NAME) {
                return Err(InjectError::Conflict(format!(
                    "container {cname:?} has a port named {ADMIN_PORT_NAME:?}, the name of the \
                     keybroker sidecar's admin port (port names are unique in a pod)"
                )));
            }
        }
    }

    let mut patch = Vec::new();
    let mut warnings = Vec::new();
    let sidecar = sidecar(&s);
    match s.mode {
        SidecarMode::Native => match init_containers {
            // First, so that init containers after it can use it too.
            Some(_) => patch.push(PatchOp::add("/spec/initContainers/0".into(), sidecar)),
            None => patch.push(PatchOp::add(
                "/spec/initContainers".into(),
                json!([sidecar]),
            )),
        },
        SidecarMode::Container => {
            // Last, so that tools picking "the first container" still pick the app.
            patch.push(PatchOp::add("/spec/containers/-".into(), sidecar));
            warnings.push(
                "keybroker runs as a plain container (keybroker.io/sidecar-mode: container): \
                 apps may start before it is ready and must retry"
                    .into(),
            );
            if matches!(
                spec.get("restartPolicy").and_then(Value::as_str),
                Some("Never" | "OnFailure")
            ) {
                warnings.push(
                    "this pod runs to completion (restartPolicy Never/OnFailure) but a plain \
                     keybroker container never exits: use the native sidecar mode \
                     (Kubernetes >= 1.29) so that the pod can complete"
                        .into(),
                );
            }
        }
    }

    let new_volumes = [
        json!({"name": SOCKET_VOLUME, "emptyDir": {}}),
        json!({
            "name": CONFIG_VOLUME,
            "configMap": {"name": s.config_map, "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}
        }),
    ];
    append_all(&mut patch, "/spec/volumes", volumes.is_some(), &new_volumes);

    let mount = json!({"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR});
    let env = json!({"name": crate::client::ENV_ADDR, "value": SOCKET_ADDR});
    for (i, c) in containers.iter().enumerate() {
        let at = format!("spec.containers[{i}]");
        wire(
            &mut patch,
            c,
            &at,
            &format!("/spec/containers/{i}"),
            &mount,
            &env,
        )?;
    }
    // A native sidecar is the first init container, so every init container after it (all the
    // pod's own) can call it too: they get the socket and the address like app containers. As a
    // plain container the sidecar starts only after every init container has finished.
    if s.mode == SidecarMode::Native {
        for (i, c) in init_containers.into_iter().flatten().enumerate() {
            let at = format!("spec.initContainers[{i}]");
            // Index i + 1: the sidecar was inserted at 0 by an earlier operation.
            let path = format!("/spec/initContainers/{}", i + 1);
            wire(&mut patch, c, &at, &path, &mount, &env)?;
        }
    }

    match (metadata, ann) {
        (None, _) => patch.push(PatchOp::add(
            "/metadata".into(),
            json!({"annotations": {annotations::STATUS: STATUS_INJECTED}}),
        )),
        (Some(_), None) => patch.push(PatchOp::add(
            "/metadata/annotations".into(),
            json!({annotations::STATUS: STATUS_INJECTED}),
        )),
        (Some(_), Some(_)) => patch.push(PatchOp::add(
            format!("/metadata/annotations/{}", escape(annotations::STATUS)),
            json!(STATUS_INJECTED),
        )),
    }
    Ok(Decision::Inject { patch, warnings })
}

/// Gives one container the socket mount and (unless it sets its own) `KEYBROKER_ADDR`; refuses
/// a container that already mounts something where the socket goes. `at` names it for
/// messages, `path` is its JSON Pointer at the time the operations apply.
fn wire(
    patch: &mut Vec<PatchOp>,
    c: &Value,
    at: &str,
    path: &str,
    mount: &Value,
    env: &Value,
) -> Result<(), InjectError> {
    let cname = name_of(c).unwrap_or("");
    let mounts = array(c.get("volumeMounts"), &format!("{at}.volumeMounts"))?;
    if mounts.into_iter().flatten().any(|m| {
        m.get("mountPath")
            .and_then(Value::as_str)
            .map(|p| p.trim_end_matches('/'))
            == Some(SOCKET_DIR)
    }) {
        return Err(InjectError::Conflict(format!(
            "container {cname:?} already mounts something at {SOCKET_DIR}, where the \
             keybroker socket goes"
        )));
    }
    append_all(
        patch,
        &format!("{path}/volumeMounts"),
        mounts.is_some(),
        std::slice::from_ref(mount),
    );
    let envs = array(c.get("env"), &format!("{at}.env"))?;
    if !envs
        .into_iter()
        .flatten()
        .any(|e| name_of(e) == Some(crate::client::ENV_ADDR))
    {
        append_all(
            patch,
            &format!("{path}/env"),
            envs.is_some(),
            std::slice::from_ref(env),
        );
    }
    Ok(())
}

/// Adds `items` to the list at `path`: one `add` of the whole list if it does not exist yet
/// (JSON Patch cannot append to a missing list), else one `add .../-` per item.
fn append_all(patch: &mut Vec<PatchOp>, path: &str, exists: bool, items: &[Value]) {
    if exists {
        for item in items {
            patch.push(PatchOp::add(format!("{path}/-"), item.clone()));
        }
    } else {
        patch.push(PatchOp::add(path.to_owned(), Value::Array(items.to_vec())));
    }
}

/// The sidecar container. gRPC is served on the Unix socket only, so the key API is reachable
/// from this pod's containers and nothing else; the TCP port is the admin listener, which the
/// kubelet probes over HTTP (`/readyz`, `/healthz`) and Prometheus scrapes (`/metrics`).
pub fn sidecar(s: &Settings) -> Value {
    let env = vec![
        json!({"name": crate::config::ENV_CONFIG, "value": format!("{CONFIG_DIR}/{CONFIG_FILE}")}),
        json!({"name": crate::config::ENV_LISTEN, "value": SOCKET_ADDR}),
        json!({"name": crate::config::ENV_ADMIN_LISTEN, "value": format!("0.0.0.0:{}", s.admin_port)}),
        json!({"name": crate::config::ENV_SOCKET_MODE, "value": SOCKET_MODE}),
        json!({"name": crate::config::ENV_LOG, "value": s.log_level}),
    ];
    let r = &s.resources;
    let pair = |cpu: &Option<String>, memory: &Option<String>| {
        let mut m = Map::new();
        for (key, v) in [("cpu", cpu), ("memory", memory)] {
            if let Some(v) = v {
                m.insert(key.to_owned(), json!(v));
            }
        }
        m
    };
    let mut resources = Map::new();
    for (key, m) in [
        ("requests", pair(&r.cpu_request, &r.memory_request)),
        ("limits", pair(&r.cpu_limit, &r.memory_limit)),
    ] {
        if !m.is_empty() {
            resources.insert(key.to_owned(), Value::Object(m));
        }
    }
    let mut c = Map::new();
    c.insert("name".into(), json!(CONTAINER_NAME));
    c.insert("image".into(), json!(s.image));
    if s.mode == SidecarMode::Native {
        c.insert("restartPolicy".into(), json!("Always"));
    }
    let rest = json!({
        "args": ["serve"],
        "env": env,
        "ports": [{"name": ADMIN_PORT_NAME, "containerPort": s.admin_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": true},
        ],
        "resources": resources,
        // Native sidecars: the app containers start once this passes (/readyz answers 200 once
        // the configuration is loaded, the backends are built and the socket listens).
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
            "periodSeconds": 1, "timeoutSeconds": 1, "failureThreshold": 30,
        },
        // 503 while draining after SIGTERM.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": ADMIN_PORT_NAME},
            "periodSeconds": 5, "timeoutSeconds": 1, "failureThreshold": 3,
        },
        // The process answers at all; never tied to a cloud KMS being reachable.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": ADMIN_PORT_NAME},
            "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Value::Object(rest) = rest {
        c.extend(rest);
    }
    Value::Object(c)
}

/// Applies `add` operations to `target` (RFC 6902 semantics for `add`: object members are set,
/// array indexes insert, `-` appends). Used by `inject file`; the tests check it against an
/// independent JSON Patch implementation.
pub fn apply(target: &mut Value, patch: &[PatchOp]) -> Result<(), InjectError> {
    for op in patch {
        if op.op != "add" {
            return Err(InjectError::Malformed(format!(
                "unsupported patch operation {:?}",
                op.op
            )));
        }
        let bad = || InjectError::Malformed(format!("bad patch path {:?}", op.path));
        let segments: Vec<String> = op
            .path
            .strip_prefix('/')
            .ok_or_else(bad)?
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        let (last, parents) = segments.split_last().ok_or_else(bad)?;
        let mut node = &mut *target;
        for seg in parents {
            node = match node {
                Value::Object(m) => m.get_mut(seg.as_str()),
                Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(bad)?;
        }
        match node {
            Value::Object(m) => {
                m.insert(last.clone(), op.value.clone());
            }
            Value::Array(a) if last == "-" => a.push(op.value.clone()),
            Value::Array(a) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(bad)?;
                a.insert(i, op.value.clone());
            }
            _ => return Err(bad()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn pod(annotations: Value, spec: Value) -> Value {
        json!({"metadata": {"name": "p", "annotations": annotations}, "spec": spec})
    }

    fn inject(p: &Value) -> Result<Decision, InjectError> {
        decide(p, &Settings::default(), Trigger::Annotated)
    }

    fn patched(p: &Value) -> Value {
        let Decision::Inject { patch, .. } = inject(p).unwrap() else {
            panic!("not injected")
        };
        let mut out = p.clone();
        apply(&mut out, &patch).unwrap();
        out
    }

    #[test]
    fn skips() {
        let spec = json!({"containers": [{"name": "app"}]});
        assert_eq!(
            inject(&json!({"metadata": {}, "spec": spec})).unwrap(),
            Decision::Skip(Skip::NotRequested)
        );
        assert_eq!(
            inject(&pod(json!({"keybroker.io/inject": "false"}), spec.clone())).unwrap(),
            Decision::Skip(Skip::OptedOut)
        );
        let once = patched(&pod(json!({"keybroker.io/inject": "true"}), spec.clone()));
        assert_eq!(
            inject(&once).unwrap(),
            Decision::Skip(Skip::AlreadyInjected)
        );
        // A hand-written sidecar counts as injected too.
        let manual = pod(
            json!({"keybroker.io/inject": "true"}),
            json!({"containers": [{"name": "app"}], "initContainers": [{"name": "keybroker"}]}),
        );
        assert_eq!(
            inject(&manual).unwrap(),
            Decision::Skip(Skip::AlreadyInjected)
        );
        // --all injects unannotated pods but still respects "false".
        let bare = json!({"spec": spec});
        assert!(matches!(
            decide(&bare, &Settings::default(), Trigger::Always).unwrap(),
            Decision::Inject { .. }
        ));
    }

    #[test]
    fn errors_are_clear_and_never_panics() {
        let yes = json!({"keybroker.io/inject": "true"});
        let cases = [
            (json!("pod"), "not a JSON object"),
            (
                json!({"metadata": {"annotations": {"keybroker.io/inject": "yes"}}}),
                "must be \"true\" or \"false\"",
            ),
            (
                json!({"metadata": {"annotations": {"keybroker.io/inject": true}}}),
                "must be \"true\" or \"false\"",
            ),
            (
                json!({"metadata": {"annotations": []}}),
                "metadata.annotations must be an object",
            ),
            (pod(yes.clone(), json!(null)), "no spec"),
            (
                pod(yes.clone(), json!({"containers": []})),
                "non-empty list",
            ),
            (
                pod(yes.clone(), json!({"containers": {}})),
                "spec.containers must be a list",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a", "env": 3}]}),
                ),
                "spec.containers[0].env must be a list",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a"}], "hostNetwork": true}),
                ),
                "hostNetwork",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a"}], "volumes": [{"name": "keybroker-socket"}]}),
                ),
                "already has a volume",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a", "ports": [{"containerPort": 9464}]}]}),
                ),
                "keybroker.io/admin-port",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a", "ports": [{"name": "kb-admin", "containerPort": 8080}]}]}),
                ),
                "port names are unique",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a", "volumeMounts": [{"name": "x", "mountPath": "/run/keybroker"}]}]}),
                ),
                "already mounts",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a"}], "initContainers": [{"name": "setup", "volumeMounts": [{"name": "x", "mountPath": "/run/keybroker/"}]}]}),
                ),
                "container \"setup\" already mounts",
            ),
            (
                pod(
                    yes.clone(),
                    json!({"containers": [{"name": "a"}], "initContainers": [{"name": "setup", "env": "x"}]}),
                ),
                "spec.initContainers[0].env must be a list",
            ),
        ];
        for (p, want) in cases {
            let e = inject(&p).unwrap_err().to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
    }

    #[test]
    fn patch_adds_to_existing_and_missing_lists() {
        let p = pod(
            json!({"keybroker.io/inject": "true", "x/y": "z"}),
            json!({
                "containers": [
                    {"name": "a", "env": [{"name": "A", "value": "1"}], "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                    {"name": "b", "env": [{"name": "KEYBROKER_ADDR", "value": "127.0.0.1:50051"}]},
                ],
                "initContainers": [{"name": "migrate"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "futureField": {"kept": true},
            }),
        );
        let out = patched(&p);
        let spec = &out["spec"];
        assert_eq!(spec["initContainers"][0]["name"], "keybroker");
        assert_eq!(spec["initContainers"][0]["restartPolicy"], "Always");
        assert_eq!(spec["initContainers"][1]["name"], "migrate");
        // Init containers after the native sidecar can use it.
        assert_eq!(
            spec["initContainers"][1]["volumeMounts"][0]["mountPath"],
            SOCKET_DIR
        );
        assert_eq!(
            spec["initContainers"][1]["env"][0]["name"],
            "KEYBROKER_ADDR"
        );
        assert_eq!(spec["initContainers"][1]["env"][0]["value"], SOCKET_ADDR);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 3);
        assert_eq!(spec["containers"][0]["env"][1]["name"], "KEYBROKER_ADDR");
        assert_eq!(
            spec["containers"][0]["volumeMounts"][1]["mountPath"],
            SOCKET_DIR
        );
        // An app's own KEYBROKER_ADDR is kept, not duplicated.
        assert_eq!(spec["containers"][1]["env"].as_array().unwrap().len(), 1);
        assert_eq!(spec["containers"][1]["env"][0]["value"], "127.0.0.1:50051");
        assert_eq!(spec["futureField"], json!({"kept": true}));
        assert_eq!(
            out["metadata"]["annotations"]["keybroker.io/status"],
            "injected"
        );
        assert_eq!(out["metadata"]["annotations"]["x/y"], "z");
    }

    #[test]
    fn container_mode_appends_a_plain_container() {
        let p = pod(
            json!({"keybroker.io/inject": "true", "keybroker.io/sidecar-mode": "container"}),
            json!({"containers": [{"name": "a"}]}),
        );
        let Decision::Inject { warnings, .. } = inject(&p).unwrap() else {
            panic!()
        };
        assert_eq!(warnings.len(), 1);
        let mut job = p.clone();
        job["spec"]["restartPolicy"] = json!("Never");
        let Decision::Inject { warnings, .. } = inject(&job).unwrap() else {
            panic!()
        };
        assert!(warnings[1].contains("never exits"), "{warnings:?}");
        let out = patched(&p);
        assert_eq!(out["spec"]["containers"][1]["name"], "keybroker");
        assert!(out["spec"]["containers"][1].get("restartPolicy").is_none());
        assert!(out["spec"].get("initContainers").is_none());
        // Init containers run before a plain sidecar starts: they are left alone, even with a
        // mount at the socket's place.
        let mut with_init = p.clone();
        with_init["spec"]["initContainers"] = json!([{"name": "setup", "volumeMounts": [{"name": "x", "mountPath": "/run/keybroker"}]}]);
        let out = patched(&with_init);
        assert_eq!(
            out["spec"]["initContainers"][0]["volumeMounts"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(out["spec"]["initContainers"][0].get("env").is_none());
        // The sidecar itself does not get KEYBROKER_ADDR.
        assert!(
            out["spec"]["containers"][1]["env"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["name"] != "KEYBROKER_ADDR")
        );
    }

    #[test]
    fn pointer_escaping_and_apply_errors() {
        assert_eq!(escape("keybroker.io/status"), "keybroker.io~1status");
        assert_eq!(escape("a~b/c"), "a~0b~1c");
        let mut v = json!({"a": {"b/c": 1}, "l": [1, 2]});
        apply(&mut v, &[PatchOp::add("/a/x~1y".into(), json!(2))]).unwrap();
        assert_eq!(v["a"]["x/y"], 2);
        apply(&mut v, &[PatchOp::add("/l/1".into(), json!(9))]).unwrap();
        assert_eq!(v["l"], json!([1, 9, 2]));
        for bad in ["", "a", "/missing/x", "/l/9", "/l/x"] {
            assert!(
                apply(&mut v, &[PatchOp::add(bad.into(), json!(0))]).is_err(),
                "{bad}"
            );
        }
    }
}
