//! Connecting to a keybroker as a client (the CLI's encrypt/decrypt/datakey, the benchmark and
//! the tests). Accepts what the server prints and what the injector puts in `KEYBROKER_ADDR`:
//! `127.0.0.1:50051`, `http://host:port` or `unix:///path/to.sock`.

use tonic::transport::{Channel, Endpoint};

pub use crate::proto::key_broker_client::KeyBrokerClient;

pub const ENV_ADDR: &str = "KEYBROKER_ADDR";

/// The address from `KEYBROKER_ADDR`, else the default listen address.
pub fn default_addr() -> String {
    std::env::var(ENV_ADDR).unwrap_or_else(|_| crate::config::DEFAULT_LISTEN.to_owned())
}

pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = if addr.starts_with("unix:") || addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?.tcp_nodelay(true))
}

pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    endpoint(addr)?.connect().await
}

/// A KeyBroker client whose message limits match a server with `max_request_bytes`.
pub fn client(channel: Channel, max_request_bytes: usize) -> KeyBrokerClient<Channel> {
    let limit = max_request_bytes.saturating_mul(2).max(8 << 20);
    KeyBrokerClient::new(channel)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit)
}
