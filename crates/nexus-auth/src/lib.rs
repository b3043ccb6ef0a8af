//! The security building blocks of authentication, kept pure (no network, no database, no async
//! runtime) so each can be tested exhaustively on its own and the services in `nexus-core` only
//! compose them. Blocking CPU work (Argon2id) and file I/O (the key ring) are marked as such: run
//! them via `spawn_blocking`.

#![forbid(unsafe_code)]

pub mod ip;
pub mod jwt;
pub mod password;
pub mod sealed;
pub mod throttle;
pub mod tokens;
pub mod totp;
