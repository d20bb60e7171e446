//! The container image (deploy/image/build; deploy/README.md, "The image"): built for real with
//! buildah from Debian's packages and the release binary, twice, to the same digest; copied and
//! unpacked with standard OCI tools (skopeo, umoci); its files and SBOM checked (the SBOM by the
//! CycloneDX project's own library); then its sidecar run from the unpacked root filesystem the
//! way a pod runs it: the image's entrypoint, user and environment, the example Deployment's
//! args, environment and volumes, the example ConfigMap's configuration (AWS KMS, here moto), and
//! the root filesystem read-only, so that a write anywhere but the volumes would fail.
//!
//! Containers cannot be started in this sandbox (crun's setrlimit is refused), hence `chroot
//! --userspec`, inside a private mount namespace (`unshare --mount`) whose mounts vanish with the
//! process: tests running in parallel never see them and nothing is left to unmount.
//!
//! Needs root, buildah, skopeo and umoci (scripts/test-setup installs them with apt). Where setup
//! could not, it wrote why into target/test-env/image-tools.unavailable and the test skips with
//! that reason; tools missing without that note fail the test.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::moto::Moto;

/// The size budget for the image's files (issue 19: at most 32 MB).
const MAX_IMAGE_BYTES: u64 = 32_000_000;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs a command to completion and returns its stdout; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn yaml_docs(rel: &str) -> Vec<Value> {
    keybroker::inject::file::parse_documents(&std::fs::read_to_string(repo(rel)).unwrap()).unwrap()
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// Every keybroker image reference in a manifest: container images and the injector annotation.
fn keybroker_images(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if let Some(s) = v.as_str()
                    && ((k == "image" && s.contains("keybroker:")) || k == "keybroker.io/image")
                {
                    out.push(s.to_owned());
                }
                keybroker_images(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keybroker_images(v, out)),
        _ => {}
    }
}

#[test]
fn manifests_and_the_injector_name_the_image_the_build_produces() {
    let built = run(Command::new(repo("deploy/image/build")).arg("--print-ref"))
        .trim()
        .to_owned();
    assert_eq!(
        built,
        format!(
            "registry.example.com/keybroker:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(keybroker::inject::DEFAULT_IMAGE, built);
    let mut manifests = Vec::new();
    files_under(&repo("deploy/kubernetes"), "yaml", &mut manifests);
    let mut seen = Vec::new();
    for m in &manifests {
        for doc in yaml_docs(m.strip_prefix(repo("")).unwrap().to_str().unwrap()) {
            keybroker_images(&doc, &mut seen);
        }
    }
    // The hand-written sidecar, the injector's own Deployment, the annotated example.
    assert!(seen.len() >= 3, "{seen:?}");
    for image in &seen {
        assert_eq!(image, &built, "a manifest names another image");
    }
}

/// The final stage of deploy/Dockerfile as an image config would record it: User, WorkingDir,
/// ExposedPorts, Volumes, Entrypoint, Cmd, and the Labels with fixed values.
fn dockerfile_config() -> Value {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let joined = text.replace("\\\n", " ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    assert_eq!(
        lines[last_from], "FROM scratch",
        "the image has no base image"
    );
    let mut c = serde_json::json!({"ExposedPorts": {}, "Volumes": {}, "Labels": {}});
    for line in &lines[last_from + 1..] {
        let (op, rest) = line.split_once(' ').unwrap();
        match op {
            "USER" => c["User"] = rest.into(),
            "WORKDIR" => c["WorkingDir"] = rest.into(),
            "EXPOSE" => rest
                .split_whitespace()
                .for_each(|p| c["ExposedPorts"][p] = serde_json::json!({})),
            "VOLUME" => serde_json::from_str::<Vec<String>>(rest)
                .unwrap()
                .iter()
                .for_each(|v| c["Volumes"][v] = serde_json::json!({})),
            "ENTRYPOINT" | "CMD" => {
                c[if op == "CMD" { "Cmd" } else { "Entrypoint" }] =
                    serde_json::from_str(rest).unwrap()
            }
            "LABEL" => {
                // key="value" pairs; values may hold spaces.
                let mut rest = rest.trim();
                while let Some((key, after)) = rest.split_once("=\"") {
                    let (value, tail) = after.split_once('"').unwrap();
                    if !value.contains("${") {
                        c["Labels"][key.trim()] = value.into();
                    }
                    rest = tail.trim();
                }
            }
            "COPY" | "ARG" => {}
            other => panic!("unexpected {other} in the Dockerfile's final stage"),
        }
    }
    c
}

#[test]
fn dockerfile_builds_with_the_same_script_version_and_toolchain() {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(text.contains("deploy/image/rootfs --binary target/release/keybroker --out /rootfs"));
    assert!(text.contains("COPY --from=build /rootfs/ /"));
    let c = dockerfile_config();
    let built = run(Command::new(repo("deploy/image/build")).arg("--print-ref"));
    assert_eq!(
        c["Labels"]["org.opencontainers.image.ref.name"],
        built.trim()
    );
    assert_eq!(
        c["Labels"]["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&format!("KEYBROKER_IMAGE_REF={}", built.trim())));
    // The toolchain: the one that builds the binary here (and so in the checked image).
    let rustc = run(Command::new("rustc").arg("--version"));
    let pinned = text
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .unwrap();
    assert!(
        rustc.starts_with(&format!("rustc {pinned} ")),
        "Dockerfile pins {pinned}, here: {rustc}"
    );
    let ignore = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore")).unwrap();
    assert!(
        ignore.lines().any(|l| l == "!deploy/image/"),
        "the build context lacks deploy/image"
    );
}

/// Why the image check cannot run on this machine, if it cannot.
fn skip_reason() -> Option<String> {
    // A local shortcut while iterating (the release build with fat LTO takes minutes); CI
    // (`.ci/run`) clears it, so the image is always checked there.
    if std::env::var_os("KEYBROKER_TEST_SKIP_IMAGE").is_some_and(|v| v == "1") {
        return Some("KEYBROKER_TEST_SKIP_IMAGE=1 is set".to_owned());
    }
    if let Ok(reason) = std::fs::read_to_string(repo("target/test-env/image-tools.unavailable")) {
        return Some(format!("scripts/test-setup: {}", reason.trim()));
    }
    let uid = run(Command::new("id").arg("-u"));
    if uid.trim() != "0" {
        return Some("chroot and mounts need root".to_owned());
    }
    for tool in ["buildah", "skopeo", "umoci", "unshare", "chroot", "readelf"] {
        assert!(
            find_in_path(tool).is_some(),
            "{tool} is not installed: run scripts/test-setup (as root it installs it with apt)"
        );
    }
    None
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .ok()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// One `deploy/image/build` into `out`; returns (archive, SBOM beside it, the build's stderr).
fn build_image(out: &Path) -> (PathBuf, PathBuf, String) {
    // --allow-newer: when Debian has replaced a pinned package version (its mirror keeps only the
    // current one), build with the current one instead of failing every CI run until the lock is
    // refreshed; the build prints a warning, and the SBOM check below compares with the lock.
    let mut cmd = Command::new(repo("deploy/image/build"));
    cmd.args(["--output", out.to_str().unwrap(), "--allow-newer"]);
    // As from a shell: without what cargo and nextest set for this test process, which build
    // scripts could read and so make the release build in target/ rebuild.
    for (k, _) in std::env::vars() {
        if k == "OUT_DIR"
            || k == "LD_LIBRARY_PATH"
            || k.starts_with("NEXTEST")
            || [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
        {
            cmd.env_remove(k);
        }
    }
    let output = cmd.stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "deploy/image/build failed:\n{stderr}"
    );
    eprintln!(
        "{}",
        stderr
            .lines()
            .filter(|l| l.starts_with("image:") || l.contains("WARNING"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let version = env!("CARGO_PKG_VERSION");
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let stem = format!("keybroker-{version}-{}", arch.trim());
    let archive = out.join(format!("{stem}.oci.tar"));
    let sbom = out.join(format!("{stem}.cdx.json"));
    assert!(archive.is_file() && sbom.is_file(), "{stderr}");
    (archive, sbom, stderr)
}

/// The image manifest's digest, from the archive's index.json.
fn manifest_digest(archive: &Path) -> String {
    let index: Value = serde_json::from_str(&run(Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")))
    .unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    manifests[0]["digest"].as_str().unwrap().to_owned()
}

/// (path inside the image, metadata) for everything in the root filesystem.
fn tree(root: &Path) -> BTreeMap<String, std::fs::Metadata> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, std::fs::Metadata>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if meta.is_dir() {
                walk(root, &p, out);
            }
            out.insert(rel, meta);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn sha256_hex(path: &Path) -> String {
    let digest =
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &std::fs::read(path).unwrap());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The files the image must hold and may not: the binary and the shared objects it loads, the CA
/// bundle, the user database; no shell, no package manager, no docs but copyright notices, no
/// locales or gconv modules, the binary stripped, everything under the size budget.
fn check_files(rootfs: &Path, files: &BTreeMap<String, std::fs::Metadata>) {
    let mut elf = BTreeSet::new();
    let mut bytes = 0;
    for (path, meta) in files {
        if !meta.is_file() {
            continue;
        }
        bytes += meta.len();
        let head = std::fs::read(rootfs.join(&path[1..])).unwrap();
        if head.starts_with(b"\x7fELF") {
            elf.insert(path.clone());
        }
        assert!(
            !path.starts_with("/usr/share/doc/") || path.ends_with("/copyright"),
            "documentation in the image: {path}"
        );
        for banned in ["/locale", "/gconv", "/man/", "/info/", "/lintian"] {
            assert!(!path.contains(banned), "{path} should not be in the image");
        }
    }
    for dir in ["/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local"] {
        assert!(
            !files.contains_key(dir),
            "{dir} exists: the image carries no tools"
        );
    }
    // ELF files: the binary plus at most the loader, libc, libm and libgcc_s.
    assert!(elf.remove("/keybroker"), "{elf:?}");
    assert!(
        elf.len() <= 4,
        "more shared objects than the binary loads: {elf:?}"
    );
    for so in &elf {
        assert!(so.starts_with("/lib/"), "{so}");
    }
    let needed = run(Command::new("readelf")
        .arg("-d")
        .arg(rootfs.join("keybroker")));
    for line in needed.lines().filter(|l| l.contains("(NEEDED)")) {
        let name = line.split('[').nth(1).unwrap().trim_end_matches(']');
        assert!(
            elf.iter().any(|so| so.ends_with(&format!("/{name}"))),
            "/keybroker needs {name}, not in {elf:?}"
        );
    }
    let sections = run(Command::new("readelf")
        .arg("-S")
        .arg(rootfs.join("keybroker")));
    // (.debug_gdb_scripts is loaded, not debug information: strip keeps it.)
    for section in [".symtab", ".strtab", ".debug_info", ".debug_line"] {
        assert!(
            !sections.contains(section),
            "/keybroker is not stripped: {section}"
        );
    }

    // The CA bundle the cloud SDKs' TLS reads: every entry a certificate.
    let pem = std::fs::read(rootfs.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    let mut certs = 0;
    for der in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(
            &pem,
        )
    {
        let der = der.unwrap();
        x509_parser::parse_x509_certificate(&der).unwrap();
        certs += 1;
    }
    assert!(certs >= 100, "only {certs} CA certificates");

    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );
    for dir in ["run/keybroker", "home/nonroot"] {
        let m = std::fs::metadata(rootfs.join(dir)).unwrap();
        assert_eq!((m.uid(), m.gid()), (65532, 65532), "/{dir}");
    }
    eprintln!(
        "image: {bytes} bytes in {} files, /keybroker {} bytes",
        files.values().filter(|m| m.is_file()).count(),
        files["/keybroker"].len()
    );
    assert!(
        bytes <= MAX_IMAGE_BYTES,
        "the image's files take {bytes} bytes, over the {MAX_IMAGE_BYTES}-byte budget"
    );
}

/// The SBOM: the same bytes inside and beside the archive; valid CycloneDX 1.5 by the CycloneDX
/// library; every file in the image accounted for (hashes where it gives them); the Debian
/// packages as pinned; the crates as Cargo.lock resolves them, build-time ones marked.
fn check_sbom(
    rootfs: &Path,
    beside: &Path,
    files: &BTreeMap<String, std::fs::Metadata>,
    allowed_newer: bool,
) {
    let inside = rootfs.join("sbom/keybroker.cdx.json");
    assert_eq!(
        std::fs::read(&inside).unwrap(),
        std::fs::read(beside).unwrap()
    );
    let python = crate::support::venv().join("bin/python");
    let script = repo("tests/fidelity/sbom_check.py");
    let summary: Value =
        serde_json::from_str(&run(Command::new(&python).arg(&script).arg(&inside))).unwrap();
    // The validator does reject a broken document.
    let broken = beside.with_extension("broken.json");
    let text = std::fs::read_to_string(beside).unwrap();
    std::fs::write(
        &broken,
        text.replacen("\"scope\":\"required\"", "\"scope\":\"sometimes\"", 1),
    )
    .unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the validator accepted a bad scope");

    let sbom: Value = serde_json::from_str(&text).unwrap();
    let components = sbom["components"].as_array().unwrap();
    // Every regular file is named by exactly one component (the SBOM itself excepted), and the
    // hashes the SBOM gives for files match.
    let mut claimed: BTreeMap<String, &Value> = BTreeMap::new();
    for c in components {
        let mut paths = Vec::new();
        if c["type"] == "file" {
            paths.push(c["name"].as_str().unwrap().to_owned());
        }
        for o in c["evidence"]["occurrences"]
            .as_array()
            .into_iter()
            .flatten()
        {
            paths.push(o["location"].as_str().unwrap().to_owned());
        }
        for p in paths {
            assert!(claimed.insert(p.clone(), c).is_none(), "{p} claimed twice");
        }
    }
    for (path, meta) in files {
        if !meta.is_file() || path == "/sbom/keybroker.cdx.json" {
            continue;
        }
        let c = claimed
            .get(path)
            .unwrap_or_else(|| panic!("{path} is in the image but not in the SBOM"));
        if c["type"] == "file" || c["type"] == "application" {
            assert_eq!(
                c["hashes"][0]["content"].as_str().unwrap(),
                sha256_hex(&rootfs.join(&path[1..])),
                "{path}"
            );
        }
    }
    for path in claimed.keys() {
        assert!(
            files.contains_key(path),
            "the SBOM names {path}, which is not in the image"
        );
    }

    // Debian packages: those pinned in packages.lock for this architecture.
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let lock = std::fs::read_to_string(repo("deploy/image/packages.lock")).unwrap();
    let pinned: BTreeSet<(String, String)> = lock
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 4 && (f[2] == arch.trim() || f[2] == "all"))
        .map(|f| (f[0].to_owned(), f[1].to_owned()))
        .collect();
    let listed = summary["components"].as_array().unwrap();
    let debs: BTreeSet<(String, String)> = listed
        .iter()
        .filter(|c| c["purl_type"] == "deb")
        .map(|c| {
            assert_eq!(c["version"], c["purl_version"]);
            (
                c["name"].as_str().unwrap().to_owned(),
                c["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    if allowed_newer {
        let names =
            |s: &BTreeSet<(String, String)>| s.iter().map(|p| p.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&debs), names(&pinned));
    } else {
        assert_eq!(debs, pinned);
    }

    // Crates: each in Cargo.lock at that version; the direct dependencies linked; dev-only
    // crates absent; build-time-only crates marked excluded.
    let lockfile: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo("Cargo.lock")).unwrap()).unwrap();
    let locked: BTreeSet<(String, String)> = lockfile["package"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut scope = BTreeMap::new();
    for c in listed.iter().filter(|c| c["purl_type"] == "cargo") {
        let key = (
            c["name"].as_str().unwrap().to_owned(),
            c["version"].as_str().unwrap().to_owned(),
        );
        assert!(locked.contains(&key), "{key:?} is not in Cargo.lock");
        scope.insert(key.0.clone(), c["scope"].as_str().unwrap_or("").to_owned());
    }
    for linked in [
        "tokio",
        "tonic",
        "aws-sdk-kms",
        "azure_security_keyvault_keys",
        "gcloud-sdk",
        "rustls",
        "aws-lc-rs",
        "aws-lc-sys",
    ] {
        assert_eq!(
            scope.get(linked).map(String::as_str),
            Some("required"),
            "{linked}"
        );
    }
    for build_only in [
        "prost-build",
        "protoc-bin-vendored",
        "tonic-prost-build",
        "syn",
    ] {
        assert_eq!(
            scope.get(build_only).map(String::as_str),
            Some("excluded"),
            "{build_only}"
        );
    }
    for dev_only in ["k8s-openapi", "json-patch", "rcgen"] {
        assert!(
            !scope.contains_key(dev_only),
            "{dev_only} is a dev-dependency"
        );
    }
}

#[tokio::test]
async fn image_builds_reproducibly_and_its_sidecar_serves_from_a_read_only_root() {
    if let Some(reason) = skip_reason() {
        eprintln!(
            "SKIPPED image_builds_reproducibly_and_its_sidecar_serves_from_a_read_only_root: {reason}"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The sidecar (65532) and the app (10001) reach their files through this directory.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // Built twice from the same inputs: the same manifest digest.
    let (archive, sbom_beside, log) = build_image(&tmp.path().join("out"));
    let (again, _, _) = build_image(&tmp.path().join("again"));
    assert_eq!(
        manifest_digest(&archive),
        manifest_digest(&again),
        "the build is not reproducible"
    );
    let allowed_newer = log.contains("WARNING");

    // skopeo reads the archive (as `skopeo copy ... docker://` would to push it) and umoci turns
    // the copy into a runtime bundle: the root filesystem and the process an OCI runtime would start.
    let version = env!("CARGO_PKG_VERSION");
    let source = format!("oci-archive:{}", archive.display());
    let config: Value = serde_json::from_str(&run(
        Command::new("skopeo").args(["inspect", "--config", &source])
    ))
    .unwrap();
    let layout = tmp.path().join("layout");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &source,
        &format!("oci:{}:{version}", layout.display()),
    ]));
    let bundle = tmp.path().join("bundle");
    run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:{version}", layout.display()),
        bundle.to_str().unwrap(),
    ]));
    let runtime: Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap())
            .unwrap();
    let rootfs = bundle.join("rootfs");

    // The image's configuration.
    let c = &config["config"];
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/keybroker"]));
    assert_eq!(c["Cmd"], serde_json::json!(["serve"]));
    let ports: BTreeSet<&str> = c["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(ports, BTreeSet::from(["9464/tcp", "8443/tcp"]));
    let volumes: BTreeSet<&str> = c["Volumes"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(volumes, BTreeSet::from([keybroker::inject::SOCKET_DIR]));
    let labels = &c["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version);
    let head = run(Command::new("git")
        .arg("-C")
        .arg(repo(""))
        .args(["rev-parse", "HEAD"]));
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap()
            .starts_with(head.trim()),
        "{labels}"
    );
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .contains("://")
            || labels["org.opencontainers.image.source"]
                .as_str()
                .unwrap()
                .starts_with("git@")
    );
    // deploy/Dockerfile declares the same.
    let docker = dockerfile_config();
    for key in [
        "User",
        "WorkingDir",
        "ExposedPorts",
        "Volumes",
        "Entrypoint",
        "Cmd",
    ] {
        assert_eq!(
            docker[key], c[key],
            "deploy/Dockerfile differs from the image in {key}"
        );
    }
    for (k, v) in docker["Labels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "label {k}");
    }
    let docker_labels: BTreeSet<&String> = docker["Labels"].as_object().unwrap().keys().collect();
    for k in labels.as_object().unwrap().keys() {
        assert!(
            docker_labels.contains(k)
                || [
                    "org.opencontainers.image.revision",
                    "org.opencontainers.image.source"
                ]
                .contains(&k.as_str()),
            "deploy/Dockerfile lacks label {k}"
        );
    }
    assert_eq!(runtime["process"]["user"]["uid"], 65532);
    assert_eq!(runtime["process"]["user"]["gid"], 65532);

    let files = tree(&rootfs);
    check_files(&rootfs, &files);
    check_sbom(&rootfs, &sbom_beside, &files, allowed_newer);

    run_sidecar(tmp.path(), &rootfs, c, &runtime).await;
}

/// Runs the image's sidecar as the example Deployment does and uses it as the example app does.
async fn run_sidecar(tmp: &Path, rootfs: &Path, image: &Value, runtime: &Value) {
    let (sidecar, pod_volumes) = example_sidecar();

    // The "cloud": moto with the ConfigMap's app-data key (an alias in eu-west-1). The audit-log
    // key is named by an ARN in another account and is not used here.
    let moto = Moto::start().await;
    let kms = aws_sdk_kms::Client::from_conf(
        aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new("eu-west-1"))
            .endpoint_url(&moto.endpoint)
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "AKIAKEYBROKERTEST000",
                "not-a-secret",
                None,
                None,
                "test",
            ))
            .build(),
    );
    let key = kms
        .create_key()
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .arn
        .unwrap();
    kms.create_alias()
        .alias_name("alias/prod-app-data")
        .target_key_id(&key)
        .send()
        .await
        .unwrap();
    moto.start_recording().await;

    // The pod's volumes (host directories by volume name): an emptyDir for the socket, the
    // ConfigMap's items as files.
    let configmap = yaml_docs("deploy/kubernetes/app/configmap.yaml").remove(0);
    let mut dirs = BTreeMap::new();
    for v in &pod_volumes {
        let name = v["name"].as_str().unwrap();
        let dir = tmp.join("volumes").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if v.get("emptyDir").is_some() {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        } else {
            assert_eq!(v["configMap"]["name"], configmap["metadata"]["name"]);
            for item in v["configMap"]["items"].as_array().unwrap() {
                let text = configmap["data"][item["key"].as_str().unwrap()]
                    .as_str()
                    .unwrap();
                std::fs::write(dir.join(item["path"].as_str().unwrap()), text).unwrap();
            }
        }
        std::fs::set_permissions(
            dir.parent().unwrap(),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        dirs.insert(name.to_owned(), dir);
    }
    let declared: BTreeSet<&str> = image["Volumes"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut mounts = Vec::new(); // (host dir, path in the image, read-only)
    for m in sidecar["volumeMounts"].as_array().unwrap() {
        let path = m["mountPath"].as_str().unwrap();
        let ro = m["readOnly"].as_bool().unwrap_or(false);
        assert!(
            ro || declared.contains(path),
            "{path} is written but not a declared volume"
        );
        assert!(
            rootfs.join(&path[1..]).is_dir(),
            "no mount point {path} in the image"
        );
        mounts.push((
            dirs[m["name"].as_str().unwrap()].clone(),
            path.to_owned(),
            ro,
        ));
    }
    let socket_dir = mounts
        .iter()
        .find(|m| m.1 == keybroker::inject::SOCKET_DIR)
        .unwrap()
        .0
        .clone();
    let host_socket = socket_dir.join("keybroker.sock");

    // The process: the image's entrypoint with the pod's args (Kubernetes: args replace the
    // image's Cmd); the runtime's environment (from the image) with the container's on top; AWS
    // credentials and endpoint as IRSA would give them, pointing at moto.
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{admin_port}");
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for e in runtime["process"]["env"].as_array().unwrap() {
        let (k, v) = e.as_str().unwrap().split_once('=').unwrap();
        env.insert(k.to_owned(), v.to_owned());
    }
    for e in sidecar["env"].as_array().unwrap() {
        env.insert(
            e["name"].as_str().unwrap().to_owned(),
            e["value"].as_str().unwrap().to_owned(),
        );
    }
    // A test listens on loopback only.
    assert_eq!(env["KEYBROKER_ADMIN_LISTEN"], "0.0.0.0:9464");
    env.insert("KEYBROKER_ADMIN_LISTEN".into(), admin.clone());
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "AKIAKEYBROKERTEST000"),
        ("AWS_SECRET_ACCESS_KEY", "not-a-secret"),
        ("AWS_ENDPOINT_URL_KMS", moto.endpoint.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        env.insert(k.into(), v.into());
    }
    let mut argv: Vec<String> = image["Entrypoint"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    argv.extend(
        sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned()),
    );
    let user = format!(
        "{}:{}",
        runtime["process"]["user"]["uid"], runtime["process"]["user"]["gid"]
    );
    assert_eq!(runtime["process"]["cwd"], "/");

    // Private mount namespace: the root filesystem bound read-only onto itself, /proc, the volumes;
    // then chroot as the image's user, with exactly that environment.
    const SCRIPT: &str = r#"set -eu
root=$1; shift
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
while [ "$1" != -- ]; do
  mount --bind "$1" "$root$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$root$2"; fi
  shift 3
done
shift
exec "$@""#;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        SCRIPT,
        "sh",
    ])
    .arg(rootfs);
    for (host, path, ro) in &mounts {
        cmd.arg(host).arg(path).arg(if *ro { "ro" } else { "rw" });
    }
    cmd.arg("--").arg(find_in_path("env").unwrap()).arg("-i");
    for (k, v) in &env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(find_in_path("chroot").unwrap())
        .arg(format!("--userspec={user}"))
        .arg(rootfs)
        .args(&argv);
    let stderr_path = tmp.join("sidecar.stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let pid = child.0.id();
    let stdout = child.0.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut s).unwrap();
        s
    });
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    // Ready when /readyz says so (the startup probe).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "the sidecar exited ({status}) before it was ready:\n{}",
                log()
            );
        }
        if tokio::net::TcpStream::connect(&admin).await.is_ok()
            && crate::support::http_get(&admin, "/readyz").await.0 == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within 60 s:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It runs as the image's user, in no group but its own, with its root read-only: the only
    // writable mounts it sees are the declared volumes (and /proc).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65532"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65532"; 4], "{status}");
    assert!(field("Groups:").iter().all(|g| *g == "65532"), "{status}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mut seen = BTreeMap::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let writable = f[5].split(',').any(|o| o == "rw");
        seen.insert(f[4].to_owned(), writable);
        if writable {
            assert!(
                f[4] == "/proc" || declared.contains(f[4]),
                "writable mount {} in the sidecar's view:\n{mountinfo}",
                f[4]
            );
        }
    }
    assert_eq!(seen.get("/"), Some(&false), "{mountinfo}");
    assert_eq!(
        seen.get(keybroker::inject::SOCKET_DIR),
        Some(&true),
        "{mountinfo}"
    );

    // Health over the socket, from grpcurl (an independent client).
    let grpcurl = crate::support::venv_bin("grpcurl");
    for service in ["", keybroker::server::SERVICE_NAME] {
        let out = run(Command::new(&grpcurl)
            .args(["-plaintext", "-unix", "-authority", "localhost", "-d"])
            .arg(format!("{{\"service\":\"{service}\"}}"))
            .arg(&host_socket)
            .arg("grpc.health.v1.Health/Check"));
        assert!(out.contains("\"SERVING\""), "{service:?}: {out}");
    }

    // The app: the uid the ConfigMap maps to the caller "orders" (the app container's runAsUser),
    // using the CLI from the image itself over the socket, from outside the sidecar's root.
    let config: toml::Value = toml::from_str(
        &std::fs::read_to_string(dirs["keybroker-config"].join("keybroker.toml")).unwrap(),
    )
    .unwrap();
    let app_uid = config["identity"]["peers"][0]["uid"].as_integer().unwrap() as u32;
    assert_eq!(
        config["identity"]["peers"][0]["caller"].as_str(),
        Some("orders")
    );
    let client = tmp.join("client");
    std::fs::create_dir_all(&client).unwrap();
    std::fs::copy(rootfs.join("keybroker"), client.join("keybroker")).unwrap();
    let addr = format!("unix://{}", host_socket.display());
    let as_uid = |uid: u32, args: &[&str], input: &[u8]| {
        let mut cmd = Command::new(client.join("keybroker"));
        cmd.args(args)
            .args(["--addr", &addr])
            .uid(uid)
            .gid(uid)
            .env_clear();
        crate::support::run_with_stdin(&mut cmd, input)
    };
    let plaintext = b"order 42: card ending 4242";
    let ct = as_uid(
        app_uid,
        &["encrypt", "--key", "prod-app-data", "--base64"],
        plaintext,
    );
    assert!(
        ct.status.success(),
        "encrypt: {}\n{}",
        String::from_utf8_lossy(&ct.stderr),
        log()
    );
    let pt = as_uid(app_uid, &["decrypt", "--base64"], &ct.stdout);
    assert!(
        pt.status.success(),
        "decrypt: {}",
        String::from_utf8_lossy(&pt.stderr)
    );
    assert_eq!(pt.stdout, plaintext);
    // The sidecar's own uid is nobody the policy names.
    let denied = as_uid(65532, &["encrypt", "--key", "prod-app-data"], b"x");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    // The data key came from "KMS" (moto), through the endpoint given in the environment.
    assert_eq!(moto.count("GenerateDataKey").await, 1);

    // SIGTERM: drained, exited cleanly, socket removed from the volume.
    run(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", log());
    assert!(
        std::fs::read_dir(&socket_dir).unwrap().next().is_none(),
        "the socket volume is not empty"
    );

    // The audit records on stdout: who did what, identified by peer credentials.
    let records: Vec<Value> = stdout
        .join()
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ops: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["caller"].as_str().unwrap_or(""),
                r["operation"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("orders", "encrypt"),
            ("orders", "decrypt"),
            ("anonymous", "encrypt")
        ],
        "{records:?}"
    );
}

/// The example Deployment's keybroker sidecar (an init container) and the pod's volumes.
fn example_sidecar() -> (Value, Vec<Value>) {
    let d = yaml_docs("deploy/kubernetes/app/deployment.yaml").remove(0);
    let spec = &d["spec"]["template"]["spec"];
    let sidecar = spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "keybroker")
        .unwrap()
        .clone();
    (sidecar, spec["volumes"].as_array().unwrap().clone())
}

/// A child process that cannot outlive a failing test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
