//! Integration tests: one binary (linking is the slow part on 2 cores), one module per concern.
//! Each test starts real servers on ephemeral loopback ports and talks to them with real clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod api;
mod audit;
mod aws;
mod azure;
mod batch;
mod cache;
mod dashboard;
mod disk;
mod envelope_vectors;
mod examples;
mod faults;
mod gcp;
mod grpcurl;
mod image;
mod inject;
mod interop;
mod kms_plugin;
mod layering;
mod lifecycle;
mod local_backend;
mod metrics;
mod mtls;
mod multi;
mod overload;
mod policy;
mod process;
mod rotation;
mod stream;
mod transport;
