//! The injector webhook's AdmissionReview input: `keybroker::inject::webhook::review`, the whole
//! body of `POST /mutate`. An answered review carries the request's own uid.

#![no_main]

use std::sync::OnceLock;

use keybroker::inject::Settings;
use keybroker::inject::webhook;
use keybroker_fuzz::bounded;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn settings() -> &'static Settings {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    SETTINGS.get_or_init(Settings::default)
}

fuzz_target!(
    init: {
        settings();
    },
    |data: &[u8]| {
        let settings = settings();
        bounded(data.len(), || {
            if let Ok((answer, _outcome)) = webhook::review(data, settings) {
                let request: Value = serde_json::from_slice(data).expect("review() parsed it");
                if let Some(uid) = request.pointer("/request/uid").and_then(Value::as_str) {
                    assert_eq!(
                        answer.pointer("/response/uid").and_then(Value::as_str),
                        Some(uid),
                        "answered with another uid"
                    );
                }
            }
        });
    }
);
