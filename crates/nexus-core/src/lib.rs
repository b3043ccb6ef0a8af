//! NEXUS services: the rules of pairing, device sync, report ingest and live streaming.
//! Handlers call these; these call the storage interface. Nothing here knows HTTP or SQL, so the
//! same services serve every transport and every backend.

pub mod accounts;
pub mod attempts;
pub mod audit;
pub mod auth;
pub mod bus;
pub mod commands;
pub mod config;
pub mod context;
pub mod devices;
pub mod error;
pub mod housekeeping;
pub mod hub;
pub mod locks;
pub mod pairing;
pub mod reports;
pub mod stream;

use std::sync::{Arc, RwLock};

use nexus_store::Store;

pub use config::CoreConfig;
pub use context::RequestMeta;
pub use error::{CoreError, CoreResult};

/// Everything a transport needs, wired once at start-up.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<dyn Store>,
    pub config: Arc<CoreConfig>,
    pub hub: hub::Hub,
    pub pairing: pairing::PairingService,
    pub devices: devices::DeviceService,
    pub commands: commands::CommandService,
    pub reports: reports::ReportService,
    pub streams: stream::StreamService,
    pub auth: auth::AuthService,
    pub access: auth::AccessService,
    pub accounts: accounts::AccountService,
    pub audit: audit::AuditService,
    pub housekeeping: housekeeping::Housekeeping,
}

impl Services {
    /// Wires the services. `bus` connects this replica's hub to the others (use
    /// [`bus::LocalOnly`] for a single replica).
    pub fn new(
        store: Arc<dyn Store>,
        config: CoreConfig,
        bus: Arc<dyn bus::EventBus>,
        keys: nexus_auth::jwt::KeyRing,
        secrets: nexus_auth::sealed::SecretBox,
        attempts: Arc<dyn attempts::AttemptCounters>,
    ) -> Self {
        let auth = auth::AuthService::new(
            store.clone(),
            Arc::new(RwLock::new(keys)),
            secrets,
            attempts.clone(),
            config.auth.clone(),
        );
        let config = Arc::new(config);
        let hub = hub::Hub::new(store.clone(), config.clone());
        let devices = devices::DeviceService::new(store.clone(), config.clone(), bus.clone());
        let reports = reports::ReportService::new(store.clone(), hub.clone(), bus.clone());
        let commands = commands::CommandService::new(
            store.clone(),
            reports.clone(),
            auth.clone(),
            bus.clone(),
            config.long_poll_recheck,
        );
        let (forget, wake) = (devices.clone(), commands.clone());
        bus.start(
            hub.clone(),
            bus::BusSinks {
                revoked: Arc::new(move |device| forget.forget(device)),
                commands_queued: Arc::new(move |device| wake.wake_local(device)),
            },
        );
        Self {
            pairing: pairing::PairingService::new(store.clone(), &config, attempts.as_ref()),
            devices,
            commands,
            reports,
            streams: stream::StreamService::new(store.clone(), hub.clone(), config.clone()),
            access: auth::AccessService::new(store.clone()),
            accounts: accounts::AccountService::new(store.clone(), auth.clone()),
            audit: audit::AuditService::new(store.clone()),
            housekeeping: housekeeping::Housekeeping::new(store.clone(), config.ended_retention),
            auth,
            hub,
            store,
            config,
        }
    }
}
