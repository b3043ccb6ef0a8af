//! The HTTP surface: one module per resource, assembled here with the OpenAPI document.

pub mod audit;
pub mod auth;
pub mod commands;
pub mod devices;
pub mod devtools;
pub mod health;
pub mod orgs;
pub mod pairing;
pub mod stream;
pub mod views;

use axum::Json;
use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "NEXUS API", description = "Control plane for AI agents on people's own computers. Errors are RFC 9457 problem+json with a stable `code`."),
    modifiers(&DeviceTokenScheme),
    tags((name = "auth", description = "Sign-in, sessions, two-factor"), (name = "orgs", description = "Organizations, projects, members"), (name = "audit"), (name = "commands", description = "Commands, approvals (two-phase commit) and the command policy"), (name = "pairing"), (name = "devices"), (name = "stream"), (name = "health"), (name = "devtools", description = "Only with --dev"))
)]
struct ApiDoc;

struct DeviceTokenScheme;

impl utoipa::Modify for DeviceTokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "device_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("nxd_…")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT (EdDSA)")
                    .build(),
            ),
        );
    }
}

fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::me))
        .routes(routes!(auth::sessions))
        .routes(routes!(auth::end_session))
        .routes(routes!(auth::change_password))
        .routes(routes!(auth::totp_setup))
        .routes(routes!(auth::totp_enable))
        .routes(routes!(auth::totp_disable))
        .routes(routes!(auth::stream_ticket))
        .routes(routes!(auth::jwks))
        .routes(routes!(auth::server_keys))
        .routes(routes!(orgs::create_org))
        .routes(routes!(orgs::create_project, orgs::list_projects))
        .routes(routes!(orgs::list_members, orgs::add_member))
        .routes(routes!(orgs::update_member, orgs::remove_member))
        .routes(routes!(audit::logs))
        .routes(routes!(audit::verify))
        .routes(routes!(commands::propose))
        .routes(routes!(commands::list))
        .routes(routes!(commands::get))
        .routes(routes!(commands::cancel))
        .routes(routes!(commands::repropose))
        .routes(routes!(commands::approvals))
        .routes(routes!(commands::approval))
        .routes(routes!(commands::decide))
        .routes(routes!(commands::get_policy, commands::put_policy))
        .routes(routes!(pairing::start))
        .routes(routes!(pairing::preview))
        .routes(routes!(pairing::confirm_by_code))
        .routes(routes!(pairing::complete))
        .routes(routes!(devices::list))
        .routes(routes!(devices::get, devices::rename, devices::delete))
        .routes(routes!(devices::refresh_token))
        .routes(routes!(devices::heartbeat))
        .routes(routes!(devices::commands))
        .routes(routes!(devices::ack))
        .routes(routes!(devices::push_reports))
        .routes(routes!(devices::unpair))
        .routes(routes!(stream::stream))
        .routes(routes!(health::health))
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
}

fn devtools_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(devtools::emit_report))
        .routes(routes!(devtools::devices))
}

/// The OpenAPI 3.1 document of the whole API (dev tools included, marked as such).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut api) = api_routes().split_for_parts();
    let (_, dev) = devtools_routes().split_for_parts();
    api.merge(dev);
    mark_problem_responses(&mut api);
    api
}

/// Error responses are `application/problem+json`; utoipa would label them `application/json`.
fn mark_problem_responses(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, response) in operation.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && status.starts_with(['4', '5'])
                    && let Some(content) = response.content.shift_remove("application/json")
                {
                    response
                        .content
                        .insert("application/problem+json".to_owned(), content);
                }
            }
        }
    }
}

/// The router: API routes, dev tools when enabled, `/openapi.json`, problem+json 404/405.
pub fn router(dev: bool) -> axum::Router<AppState> {
    let (mut router, _) = api_routes().split_for_parts();
    if dev {
        let (dev_router, _) = devtools_routes().split_for_parts();
        router = router.merge(dev_router);
    }
    let document = openapi();
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || async move { Json(document.clone()) }),
        )
        .fallback(|| async { ApiError::not_found().into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
}
