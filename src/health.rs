//! `grpc.health.v1.Health`: tonic-health's service, except that `Watch` streams end when the
//! server starts draining.
//!
//! A client with client-side health checking (grpc-go, grpc-java, Envoy) keeps one `Watch`
//! stream open per connection, and tonic-health never ends it; graceful shutdown waits for every
//! open stream, so a single watcher held shutdown for the whole grace period. On drain, each
//! watcher gets the final status (NOT_SERVING, set just before) and then the end of its stream,
//! and the connection can close as soon as its unary requests finish.
//!
//! Must never: end a stream before the watcher has seen NOT_SERVING, or change `Check`.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

/// The reporter (set statuses), the service to mount, and the switch that starts draining.
pub fn service() -> (
    HealthReporter,
    HealthServer<DrainingHealth>,
    watch::Sender<bool>,
) {
    let reporter = HealthReporter::new();
    let (drain_tx, drain_rx) = watch::channel(false);
    let service = DrainingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        drain: drain_rx,
    };
    (reporter, HealthServer::new(service), drain_tx)
}

/// Another health service over the same reporter and drain switch (the KMS plugin socket).
pub fn server(
    reporter: &HealthReporter,
    drain: watch::Receiver<bool>,
) -> HealthServer<DrainingHealth> {
    HealthServer::new(DrainingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        drain,
    })
}

pub struct DrainingHealth {
    inner: HealthService,
    drain: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = DrainingWatch;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(DrainingWatch {
            inner,
            drain: WatchStream::new(self.drain.clone()),
            draining: false,
        }))
    }
}

/// tonic-health's watch stream, ended once draining starts and the latest status is out.
pub struct DrainingWatch {
    inner: tonic_health::server::WatchStream,
    drain: WatchStream<bool>,
    draining: bool,
}

impl Stream for DrainingWatch {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        while !this.draining {
            match Pin::new(&mut this.drain).poll_next(cx) {
                Poll::Ready(Some(false)) => continue,
                // Draining, or the server is gone.
                Poll::Ready(Some(true) | None) => this.draining = true,
                Poll::Pending => break,
            }
        }
        if this.draining {
            // The status set before draining started is ready now; then the stream ends.
            return match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
                _ => Poll::Ready(None),
            };
        }
        Pin::new(&mut this.inner).poll_next(cx)
    }
}
