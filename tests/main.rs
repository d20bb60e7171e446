//! Integration tests: one binary (linking is the slow part on 2 cores), one module per concern.
//! Each test starts real servers on ephemeral loopback ports and talks to them with real clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod azure;
mod local_backend;
