-- Runs once when the PostgreSQL volume is created: the login role NEXUS serves requests as.
-- It owns nothing and cannot bypass row-level security; `nexus migrate` grants it table access.
CREATE ROLE nexus_app LOGIN PASSWORD 'change-me-app' NOBYPASSRLS NOSUPERUSER NOCREATEDB NOCREATEROLE;
