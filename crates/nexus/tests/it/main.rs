//! Integration tests: every test starts the real `nexus` binary (built once by cargo for all of
//! them) on a random port with its own temporary data directory, and speaks HTTP to it.

mod support;

mod access;
mod admin_cli;
mod agent;
mod audit;
mod auth;
mod commands;
mod devices_tokens;
mod lifecycle;
mod pairing;
mod replicas;
mod reports;
mod stream;
mod wire;
