//! A paired device as the rest of the system sees it; its online status is derived from its
//! last heartbeat, so no background sweeper has to keep a flag up to date.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;
use crate::tenant::TenantId;
use crate::time::Millis;

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: DeviceId,
    pub tenant: TenantId,
    pub name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub paired_at: Millis,
    pub last_heartbeat_at: Option<Millis>,
    /// What the device last said about itself (`online` or `offline`).
    pub reported_status: Option<String>,
    pub agent_version: Option<String>,
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Online,
    Offline,
}

impl Device {
    /// Online while the device said so and its last heartbeat is younger than `offline_after`.
    pub fn status(&self, now: Millis, offline_after_millis: i64) -> DeviceStatus {
        match (self.last_heartbeat_at, self.reported_status.as_deref()) {
            (Some(at), Some("online")) if now - at < offline_after_millis => DeviceStatus::Online,
            _ => DeviceStatus::Offline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(last: Option<Millis>, status: Option<&str>) -> Device {
        Device {
            id: DeviceId::generate(),
            tenant: TenantId::parse("o", "p").unwrap(),
            name: "pc".into(),
            device_type: "windows_companion".into(),
            capabilities: vec![],
            paired_at: 0,
            last_heartbeat_at: last,
            reported_status: status.map(str::to_owned),
            agent_version: None,
            metrics: serde_json::Value::Null,
        }
    }

    #[test]
    fn online_only_while_heartbeats_are_fresh() {
        assert_eq!(device(None, None).status(10, 90), DeviceStatus::Offline);
        assert_eq!(
            device(Some(0), Some("online")).status(89, 90),
            DeviceStatus::Online
        );
        assert_eq!(
            device(Some(0), Some("online")).status(90, 90),
            DeviceStatus::Offline
        );
        assert_eq!(
            device(Some(0), Some("offline")).status(1, 90),
            DeviceStatus::Offline
        );
    }
}
