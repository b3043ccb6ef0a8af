//! Reading and verifying the audit trail. Writing happens in the store, in the same transaction
//! as the action each entry records.

use std::sync::Arc;

use nexus_domain::TenantId;
use nexus_domain::audit::{AuditScope, BrokenLink, GENESIS_HASH, verify_chain};
use nexus_domain::identity::OrgId;
use nexus_store::{AuditPage, AuditQuery, Store};

use crate::error::CoreResult;

/// Entries verified per store round trip.
const VERIFY_PAGE: u32 = 1000;
/// Most entries one page of `GET /audit/logs` returns.
pub const MAX_PAGE: u32 = 500;

/// The verdict for one chain.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainReport {
    pub scope: AuditScope,
    pub entries: u64,
    pub broken: Option<BrokenLink>,
}

#[derive(Clone)]
pub struct AuditService {
    store: Arc<dyn Store>,
}

impl AuditService {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The chains a tenant's admins read: the tenant's own and its organization's.
    pub fn tenant_scopes(tenant: &TenantId) -> Vec<AuditScope> {
        vec![
            AuditScope::Tenant(tenant.clone()),
            AuditScope::Org(OrgId::from_trusted(tenant.org().to_owned())),
        ]
    }

    pub async fn list(&self, mut query: AuditQuery) -> CoreResult<AuditPage> {
        query.limit = query.limit.clamp(1, MAX_PAGE);
        Ok(self.store.audit_entries(&query).await?)
    }

    /// Walks one chain from its first entry and reports the first broken link, if any.
    pub async fn verify(&self, scope: &AuditScope) -> CoreResult<ChainReport> {
        let mut position = (0u64, GENESIS_HASH.to_owned());
        loop {
            let page = self
                .store
                .audit_chain(scope, position.0, VERIFY_PAGE)
                .await?;
            let last_page = page.len() < VERIFY_PAGE as usize;
            match verify_chain(&page, position.clone()) {
                Ok(next) => position = next,
                Err(broken) => {
                    return Ok(ChainReport {
                        scope: scope.clone(),
                        entries: broken.seq.saturating_sub(1),
                        broken: Some(broken),
                    });
                }
            }
            if last_page {
                return Ok(ChainReport {
                    scope: scope.clone(),
                    entries: position.0,
                    broken: None,
                });
            }
        }
    }

    /// Every chain in the store (`nexus audit verify`).
    pub async fn verify_all(&self) -> CoreResult<Vec<ChainReport>> {
        let mut reports = Vec::new();
        for scope in self.store.audit_scopes().await? {
            reports.push(self.verify(&scope).await?);
        }
        Ok(reports)
    }
}
