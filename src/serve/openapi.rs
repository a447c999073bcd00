//! The OpenAPI description, generated from the handlers' annotations and the response
//! types (utoipa), so that it cannot drift from the code. It is served at
//! `/api/openapi.json` and committed as `openapi.json`; `tests/serve_openapi.rs` fails
//! when the committed file differs from [`json`], and rewrites it with
//! `NOTIFYD_UPDATE_OPENAPI=1 cargo test --test serve_openapi`.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail};
use super::{api, stream};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "notifyd read API",
        description = "Read-only notifications of the authenticated user, for a frontend that \
polls, long-polls or streams them.\n\n\
Every `/api/notifications*` request carries `Authorization: Bearer <jwt>` (or, when the \
service is configured for it, the JWT in a cookie); the token's user claim (`sub` unless \
configured otherwise) is the user, and no parameter can name another user. Refresh tokens \
are refused when the service is configured to require a claim such as `type=access`.\n\n\
Polling: start without `after` (the newest page, oldest first), then always send the \
previous response's `next_after` as `after`. An empty poll is cheap. A 410 \
`cursor_expired` means notifications were deleted before you saw them: restart without \
`after`. A 429 carries `Retry-After`. Every error body is \
`{\"error\": {\"code\": \"...\", \"message\": \"...\"}}`.\n\n\
Long-poll: add `wait=<seconds>` (up to 30, with `after`) and an empty answer is held until \
a newer notification exists or the wait runs out.\n\n\
Streaming: `GET /api/notifications/stream` is a Server-Sent Events stream of new \
notifications (`id`, `event: notification`, `data`: the same JSON object as in a page). \
Reconnect with `Last-Event-ID` (browsers do) to get exactly what was missed. Browsers' \
`EventSource` cannot send headers, so this endpoint alone also accepts the token as \
`?access_token=`.",
        license(name = "MIT OR Apache-2.0")
    ),
    paths(
        api::list,
        api::unread,
        stream::stream,
        api::healthz,
        api::readyz,
        api::openapi
    ),
    components(schemas(
        api::Notification,
        api::Digest,
        api::NotificationPage,
        api::Health,
        api::Readiness,
        stream::StreamEvent,
        ErrorBody,
        ErrorDetail
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "notifications", description = "The user's notifications"),
        (name = "health", description = "Probes for orchestrators and load balancers"),
        (name = "meta", description = "This description")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The backend's JWT: HS256, RS256 or ES256 as configured (several keys \
                         during a rotation); the user claim (`sub` by default, a string or an \
                         integer) is the user id, `exp` is required, and configured claims \
                         (e.g. `type=access`) must hold.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The same JWT in the query string: only on the stream endpoint, for \
                 browsers' EventSource, which cannot set headers. URLs are kept in browser \
                 history and may be logged by proxies: prefer the header.",
            ))),
        );
    }
}

/// The description as pretty JSON, with a trailing newline (the committed file's form).
pub fn json() -> String {
    let mut s = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI description serializes");
    s.push('\n');
    s
}
