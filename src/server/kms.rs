//! The Kubernetes KMS v2 plugin's own listener: its Unix socket, accept loop and gRPC stack
//! (health, reflection, `v2.KeyManagementService`), sharing the core (broker, audit, metrics)
//! with the main listeners. No identity layer: the plugin listener names its caller itself
//! (`kms_plugin`), and nothing but the plugin service is mounted on this socket.

use std::io;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::listen::{Conn, Listener, OwnedSocket, accept_loop, bind_unix};
use super::{Core, Serving, StartError, reflection};
use crate::config::{Config, ListenAddr};
use crate::kms_plugin::{KmsPlugin, KmsPluginSettings, SERVICE_NAME};
use crate::kms_proto::key_management_service_server::KeyManagementServiceServer;
use crate::transport::{ConnGate, Limited};

/// Messages on the plugin socket are small (a seed, a 1 kB ciphertext, 32 kB of annotations).
const DECODE_LIMIT: usize = 64 << 10;

/// The running plugin listener.
pub(super) struct KmsServing {
    pub plugin: KmsPlugin,
    pub serve: Serving,
    pub accept: JoinHandle<()>,
    pub socket: OwnedSocket,
    pub shutdown: Option<oneshot::Sender<()>>,
}

pub(super) async fn spawn(
    config: &Config,
    settings: &KmsPluginSettings,
    core: &Core,
    health: &HealthReporter,
    admin: &crate::admin::AdminState,
    drain: watch::Receiver<bool>,
) -> Result<KmsServing, StartError> {
    let addr = ListenAddr::Unix(settings.socket.clone());
    let (listener, socket) =
        bind_unix(&settings.socket, settings.socket_mode).map_err(|source| StartError::Listen {
            addr: format!("{addr} (kms_plugin)"),
            source,
        })?;
    let plugin = KmsPlugin::new(
        std::sync::Arc::clone(&core.broker),
        std::sync::Arc::clone(&core.observer),
        settings.clone(),
    );
    plugin.start();
    let (conn_tx, conn_rx) = mpsc::channel::<io::Result<Limited<Conn>>>(16);
    let gate = ConnGate::new(&addr, &config.server.limits);
    admin.watch_gate(std::sync::Arc::clone(&gate));
    let accept = tokio::spawn(accept_loop(Listener::Unix(listener), gate, conn_tx));
    let (reflection_v1, reflection_v1alpha) = reflection(crate::kms_proto::FILE_DESCRIPTOR_SET)?;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let service = KeyManagementServiceServer::new(plugin.clone())
        .max_decoding_message_size(DECODE_LIMIT)
        .max_encoding_message_size(DECODE_LIMIT);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let router = config
        .server
        .limits
        .http2(tonic::transport::Server::builder())
        .layer(super::overload::OverloadLayer)
        .layer(crate::codec::OversizeLayer::new(DECODE_LIMIT as u64))
        .add_service(crate::health::server(health, drain))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let serve = tokio::spawn(router.serve_with_incoming_shutdown(
        ReceiverStream::new(conn_rx),
        async {
            let _ = shutdown_rx.await;
        },
    ));
    tracing::info!(addr = %addr, key = %settings.key, caller = %settings.caller, "Kubernetes KMS v2 plugin listening");
    Ok(KmsServing {
        plugin,
        serve,
        accept,
        socket,
        shutdown: Some(shutdown_tx),
    })
}
