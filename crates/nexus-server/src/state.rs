//! Shared state of the HTTP layer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nexus_core::Services;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;

#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub config: Arc<ServerConfig>,
    pub lifecycle: Lifecycle,
}

/// Shutdown coordination: `draining` turns readiness off; `streams_closing` ends SSE streams.
#[derive(Clone, Default)]
pub struct Lifecycle {
    draining: Arc<AtomicBool>,
    pub streams_closing: CancellationToken,
}

impl Lifecycle {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
