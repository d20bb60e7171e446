//! Checks a shipped Prometheus alert-rules file in deploy/prometheus with promtool (Debian
//! `prometheus`, installed by scripts/test-setup): `promtool check rules` passes, `promtool test
//! rules` passes on its test files, and every alert has a case in which it fires.

use std::path::Path;
use std::process::Command;

/// `rules` and `test_files` are names in deploy/prometheus; `alerts` is how many alerts the file
/// must define (so that a rule deleted by mistake fails here too).
pub fn check_alert_rules(rules: &str, test_files: &[&str], alerts: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let text = std::fs::read_to_string(dir.join(rules)).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(names.len(), alerts, "{rules}: {names:?}");
    let tests: String = test_files
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect();
    for a in &names {
        // Each alert has a case expecting it to fire (exp_alerts right after its alertname, with
        // at least one alert listed under it).
        let fires = tests.split("alertname: ").skip(1).any(|case| {
            let mut lines = case.lines();
            lines.next().is_some_and(|l| l.trim() == *a)
                && lines.next().is_some_and(|l| l.trim() == "exp_alerts:")
        });
        assert!(fires, "no promtool case where {a} fires");
    }
    let mut test_args = vec!["test", "rules"];
    test_args.extend_from_slice(test_files);
    for args in [vec!["check", "rules", rules], test_args] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool is missing: run scripts/test-setup");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
