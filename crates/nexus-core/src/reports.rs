//! Report ingest: validate everything first (all or nothing), store durably, then fan out.

use std::sync::Arc;

use nexus_domain::report::ValidatedReport;
use nexus_domain::time::Millis;
use nexus_domain::{DeviceId, FieldError, TenantId, ValidationErrors};
use nexus_store::{AppendedEvent, Store};

use crate::bus::EventBus;
use crate::error::{CoreError, CoreResult};
use crate::hub::Hub;

/// Most reports one request may carry.
pub const MAX_REPORTS_PER_REQUEST: usize = 100;

/// Report ids the server uses for its own reports (command status reports: `srv_<command>_<status>_<attempt>`).
/// Report ids are unique per session, so a client could otherwise take such an id before the
/// server publishes under it, and the server's report (an ask for approval, say) would be dropped
/// as a duplicate with the client's report shown in its place.
pub const SERVER_REPORT_ID_PREFIX: &str = "srv_";

#[derive(Clone)]
pub struct ReportService {
    store: Arc<dyn Store>,
    hub: Hub,
    bus: Arc<dyn EventBus>,
}

impl ReportService {
    pub fn new(store: Arc<dyn Store>, hub: Hub, bus: Arc<dyn EventBus>) -> Self {
        Self { store, hub, bus }
    }

    /// Validates raw reports; on any error nothing is stored and every error is returned.
    pub fn validate(raw: &[serde_json::Value]) -> CoreResult<Vec<ValidatedReport>> {
        if raw.len() > MAX_REPORTS_PER_REQUEST {
            return Err(CoreError::TooLarge {
                code: "too_many_reports",
                detail: format!("at most {MAX_REPORTS_PER_REQUEST} reports per request"),
            });
        }
        let mut errors: Vec<FieldError> = Vec::new();
        let mut valid = Vec::with_capacity(raw.len());
        for (i, value) in raw.iter().enumerate() {
            match ValidatedReport::parse(value) {
                Ok(report) if report.report_id.starts_with(SERVER_REPORT_ID_PREFIX) => {
                    errors.push(FieldError::new(
                        format!("reports[{i}].meta.report_id"),
                        format!("must not start with {SERVER_REPORT_ID_PREFIX} (reserved for the server's reports)"),
                    ));
                }
                Ok(report) => valid.push(report),
                Err(e) => errors.extend(e.prefixed(&format!("reports[{i}]")).0),
            }
        }
        if errors.is_empty() {
            Ok(valid)
        } else {
            Err(ValidationErrors(errors).into())
        }
    }

    /// Stores the reports (durable when this returns) and publishes the new events live.
    ///
    /// Runs as its own task so that a client hanging up mid-request cannot stop the publish
    /// after the commit (the hub would fill the gap from the store anyway, but only once a later
    /// event reveals it).
    pub async fn ingest(
        &self,
        tenant: &TenantId,
        device: Option<&DeviceId>,
        reports: Vec<ValidatedReport>,
        now: Millis,
    ) -> CoreResult<Vec<AppendedEvent>> {
        let (service, tenant, device) = (self.clone(), tenant.clone(), device.cloned());
        let task = tokio::spawn(async move {
            let appended = service
                .store
                .append_reports(&tenant, device.as_ref(), &reports, now)
                .await?;
            for event in appended.iter().filter(|e| !e.duplicate) {
                service.bus.announce(&tenant, &event.event);
                service.hub.publish(&tenant, event.event.clone());
            }
            Ok::<_, CoreError>(appended)
        });
        task.await
            .map_err(|e| CoreError::Unexpected(anyhow::anyhow!("ingest task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn clients_cannot_use_the_servers_report_ids() {
        let report =
            |id: &str| json!({"meta": {"report_id": id, "created_at": "2026-02-03T10:00:00Z"}});
        assert!(ReportService::validate(&[report("r_1"), report("srv")]).is_ok());
        match ReportService::validate(&[report("r_1"), report("srv_cmd_1_queued_0")]) {
            Err(CoreError::Validation(e)) => {
                assert_eq!(e.0.len(), 1);
                assert_eq!(e.0[0].field, "reports[1].meta.report_id");
            }
            other => panic!("accepted a server report id: {:?}", other.map(|r| r.len())),
        }
    }
}
