//! Logs as JSON lines with the request span's fields (tenant_id, user_id, device_id,
//! correlation_id) flattened next to timestamp, level and message.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_flat_json::FlatJsonLayer::new(std::io::stdout))
        .try_init();
}
