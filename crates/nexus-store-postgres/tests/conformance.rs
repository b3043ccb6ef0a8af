//! Runs the shared conformance suite against PostgreSQL: a fresh database per case, migrated by a
//! plain owner role, used through the application role (see `common`).

mod common;

nexus_store_tests::conformance_tests!(optional common::fresh_store);
