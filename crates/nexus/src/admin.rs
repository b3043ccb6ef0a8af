//! `nexus admin …` and `nexus audit …`: administration on the configured store, for automation
//! and for the first steps before anyone can sign in.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use nexus_core::RequestMeta;
use nexus_core::accounts::{AccountService, generate_password};
use nexus_core::audit::AuditService;
use nexus_core::auth::{AuthConfig, AuthService};
use nexus_domain::audit::Actor;
use nexus_domain::time::now_millis;
use nexus_domain::{Email, OrgId, ProjectId, Role};
use nexus_store::Store;
use nexus_store_postgres::{PostgresConfig, PostgresStore};
use nexus_store_sqlite::{SqliteConfig, SqliteStore};

use crate::{is_postgres, lock_data_dir};

/// Where the store is: the same flags and variables as `nexus server`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// PostgreSQL URL (the application role); unset: the SQLite store in --data-dir.
    #[arg(
        long,
        env = "NEXUS_DATABASE_URL",
        hide_env_values = true,
        global = true
    )]
    database_url: Option<String>,
    /// Data directory of the embedded store.
    #[arg(
        long,
        env = "NEXUS_DATA_DIR",
        default_value = "./nexus-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Password rules for passwords set here: default or nist.
    #[arg(
        long,
        env = "NEXUS_PASSWORD_POLICY",
        default_value = "default",
        global = true
    )]
    password_policy: String,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// User accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Organizations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// Projects (a tenant is org:project).
    #[command(subcommand)]
    Project(ProjectCommand),
    /// Access-token signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an account and make it a member of an organization.
    Create {
        #[arg(long)]
        email: String,
        /// Organization to join.
        #[arg(long, default_value = "default")]
        org: String,
        /// admin, operator or viewer.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Read the password from the first line of standard input (otherwise one is generated
        /// and printed once).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List accounts with their organizations and roles.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Set a user's role in an organization (adds the membership if needed).
    SetRole {
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "default")]
        org: String,
        #[arg(long)]
        role: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Set a new password and end the user's sessions.
    ResetPassword {
        #[arg(long)]
        email: String,
        /// Read the password from standard input (otherwise one is generated and printed once).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organization.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create a project in an organization.
    Create {
        org: String,
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Add a new signing key: new tokens use it, tokens of older keys stay valid while their
    /// files remain. Running servers pick it up within a minute.
    Rotate {
        /// Key directory (default <data-dir>/keys).
        #[arg(long, env = "NEXUS_JWT_KEYS_DIR")]
        keys_dir: Option<PathBuf>,
        #[arg(long, env = "NEXUS_DATA_DIR", default_value = "./nexus-data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Re-compute every audit hash chain and report the first broken link of each. Exits with
    /// status 1 if any chain is broken.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
    },
}

struct Opened {
    store: Arc<dyn Store>,
    accounts: AccountService,
    _lock: Option<std::fs::File>,
}

async fn open(args: &StoreArgs) -> anyhow::Result<Opened> {
    let mut lock = None;
    let store: Arc<dyn Store> = match args.database_url.as_deref() {
        Some(url) if is_postgres(url) => {
            Arc::new(PostgresStore::connect(url, PostgresConfig::default()).await?)
        }
        Some(_) => anyhow::bail!("--database-url must be a postgres:// URL"),
        None => {
            std::fs::create_dir_all(&args.data_dir)?;
            lock = Some(lock_data_dir(&args.data_dir).context(
                "the server is running on this data directory: stop it first, or use the API",
            )?);
            Arc::new(
                SqliteStore::open(&args.data_dir.join("nexus.db"), SqliteConfig::default()).await?,
            )
        }
    };
    let policy = nexus_auth::password::PasswordPolicy::from_name(&args.password_policy)
        .ok_or_else(|| anyhow::anyhow!("--password-policy must be default or nist"))?;
    // The CLI never signs tokens or reads TOTP seeds; no keys keeps it from touching key files.
    let auth = AuthService::new(
        store.clone(),
        Arc::new(std::sync::RwLock::new(nexus_auth::jwt::KeyRing::empty())),
        nexus_auth::sealed::SecretBox::none(),
        Arc::new(nexus_core::attempts::LocalAttempts),
        AuthConfig {
            password_policy: policy,
            ..AuthConfig::default()
        },
    );
    Ok(Opened {
        accounts: AccountService::new(store.clone(), auth),
        store,
        _lock: lock,
    })
}

fn role(raw: &str) -> anyhow::Result<Role> {
    Role::parse(raw).ok_or_else(|| anyhow::anyhow!("--role must be admin, operator or viewer"))
}

fn password(from_stdin: bool) -> anyhow::Result<(String, bool)> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        anyhow::ensure!(!line.is_empty(), "no password on standard input");
        Ok((line, false))
    } else {
        Ok((generate_password(), true))
    }
}

fn core(e: nexus_core::CoreError) -> anyhow::Error {
    match e {
        nexus_core::CoreError::Validation(v) => anyhow::anyhow!(
            "{}",
            v.0.iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect::<Vec<_>>()
                .join("; ")
        ),
        other => anyhow::anyhow!("{other}"),
    }
}

pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    let now = now_millis();
    match command {
        AdminCommand::User(UserCommand::Create {
            email,
            org,
            role: r,
            password_stdin,
            store,
        }) => {
            let role = role(&r)?;
            let email = Email::parse(&email).map_err(|e| anyhow::anyhow!("{e}"))?;
            let org = OrgId::parse("org", &org).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opened = open(&store).await?;
            anyhow::ensure!(
                opened.store.org(&org).await?.is_some(),
                "no organization {org}; create it with `nexus admin org create {org}`"
            );
            let (password, generated) = password(password_stdin)?;
            let user = opened
                .accounts
                .create_user(&email, &password, None, now)
                .await
                .map_err(core)?;
            opened
                .accounts
                .set_role_by_email(&org, &email, role, now)
                .await
                .map_err(core)?;
            println!(
                "created {} ({}) as {role} of {org}",
                email.as_str(),
                user.id
            );
            if generated {
                println!("password: {password}");
            }
            opened.store.close().await;
        }
        AdminCommand::User(UserCommand::List { store }) => {
            let opened = open(&store).await?;
            for (user, orgs) in opened.accounts.users().await.map_err(core)? {
                let orgs: Vec<String> = orgs.iter().map(|(o, r)| format!("{o}:{r}")).collect();
                println!(
                    "{}\t{}\tmfa={}\t{}",
                    user.id,
                    user.email.as_str(),
                    user.totp.enabled,
                    orgs.join(",")
                );
            }
            opened.store.close().await;
        }
        AdminCommand::User(UserCommand::SetRole {
            email,
            org,
            role: r,
            store,
        }) => {
            let role = role(&r)?;
            let email = Email::parse(&email).map_err(|e| anyhow::anyhow!("{e}"))?;
            let org = OrgId::parse("org", &org).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opened = open(&store).await?;
            opened
                .accounts
                .set_role_by_email(&org, &email, role, now)
                .await
                .map_err(core)?;
            println!("{} is now {role} of {org}", email.as_str());
            opened.store.close().await;
        }
        AdminCommand::User(UserCommand::ResetPassword {
            email,
            password_stdin,
            store,
        }) => {
            let email = Email::parse(&email).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opened = open(&store).await?;
            let (password, generated) = password(password_stdin)?;
            opened
                .accounts
                .reset_password(&email, &password, now)
                .await
                .map_err(core)?;
            println!("password of {} reset; their sessions ended", email.as_str());
            if generated {
                println!("password: {password}");
            }
            opened.store.close().await;
        }
        AdminCommand::Org(OrgCommand::Create { id, name, store }) => {
            let id = OrgId::parse("org", &id).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opened = open(&store).await?;
            opened
                .accounts
                .create_org_as(&id, name.as_deref(), None, &RequestMeta::default(), now)
                .await
                .map_err(core)?;
            println!("created organization {id}");
            opened.store.close().await;
        }
        AdminCommand::Project(ProjectCommand::Create {
            org,
            id,
            name,
            store,
        }) => {
            let org = OrgId::parse("org", &org).map_err(|e| anyhow::anyhow!("{e}"))?;
            let id = ProjectId::parse("project", &id).map_err(|e| anyhow::anyhow!("{e}"))?;
            let opened = open(&store).await?;
            let project = opened
                .accounts
                .create_project(
                    &org,
                    &id,
                    name.as_deref(),
                    Actor::system(),
                    &RequestMeta::default(),
                    now,
                )
                .await
                .map_err(core)?;
            println!("created project {}", project.tenant());
            opened.store.close().await;
        }
        AdminCommand::Keys(KeysCommand::Rotate { keys_dir, data_dir }) => {
            let dir = keys_dir.unwrap_or_else(|| data_dir.join("keys"));
            let kid = nexus_auth::jwt::KeyRing::rotate(&dir)
                .map_err(|e| anyhow::anyhow!("rotating keys in {}: {e}", dir.display()))?;
            println!("new signing key {kid} in {}", dir.display());
        }
    }
    Ok(())
}

pub async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { store } => {
            let opened = open(&store).await?;
            let reports = AuditService::new(opened.store.clone())
                .verify_all()
                .await
                .map_err(core)?;
            opened.store.close().await;
            let mut broken = false;
            for report in &reports {
                match &report.broken {
                    None => println!("ok      {}\t{} entries", report.scope, report.entries),
                    Some(link) => {
                        broken = true;
                        println!(
                            "BROKEN  {}\tat seq {} (entry {}): {}",
                            report.scope, link.seq, link.entry_id, link.reason
                        );
                    }
                }
            }
            if broken {
                std::process::exit(1);
            }
            println!("{} chain(s) verified", reports.len());
        }
    }
    Ok(())
}
