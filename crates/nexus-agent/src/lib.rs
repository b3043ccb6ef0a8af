//! `nexus agent`: the device companion. It pairs with a server, keeps a heartbeat, long-polls for
//! commands, runs only what its local configuration allows (confined, size-capped, RED commands
//! only with a valid server approval signature) and reports every outcome through a durable outbox.
//!
//! Layout: `config` (the local policy file), `authorize` (the signature/deadline gate in front of
//! every command), `confine` (file-system roots), `executors` (the allowlist of command types),
//! `sysinfo` (for `system.info`); the runtime is `client`, `outbox`, `journal`, `runner`, `cli`
//! and `credentials`.

pub mod authorize;
pub mod cli;
pub mod client;
pub mod config;
pub mod confine;
pub mod credentials;
pub mod executors;
pub mod journal;
pub mod outbox;
pub mod runner;
pub mod sysinfo;
