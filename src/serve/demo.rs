//! Demo mode (`--demo`): a small inbox page served by the service itself, and a token
//! for one demo user, so that the whole flow can be tried from a browser without a
//! backend.
//!
//! Invariants:
//! * without demo mode none of these routes exists (404 like any unknown path); in
//!   particular nothing hands out tokens;
//! * the page, script and style are compiled in (`include_str!`), served with their
//!   content types and a CSP that allows only same-origin scripts, styles, images and
//!   connections ([`PAGE_CSP`]); every other response keeps the API's stricter policy
//!   (the marker [`DemoPage`] tells [`super::middleware::security_headers`] which);
//! * `/demo/token` signs an HS256 token for the configured demo user only, valid for
//!   `NOTIFYD_DEMO_TOKEN_TTL_SECS` ([`TOKEN_TTL`] by default), with the service's own
//!   secret: demo mode needs `NOTIFYD_JWT_SECRET`, and refuses to start with only a
//!   public key;
//! * the page runs on the browser client of `clients/js`: `demo/notifyd-client.js` is its
//!   bundle, generated and committed so that `cargo build` needs no node
//!   (`tests/js_client.rs` fails when it is stale).

use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use serde::Serialize;

use super::AppState;
use super::auth::{self, JwtArgs};
use super::error::ApiError;

/// Default lifetime of a demo token.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The Content-Security-Policy of the demo page and its assets.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

const INDEX_HTML: &str = include_str!("demo/index.html");
const INBOX_JS: &str = include_str!("demo/inbox.js");
const INBOX_CSS: &str = include_str!("demo/inbox.css");
const CLIENT_JS: &str = include_str!("demo/notifyd-client.js");

/// Response extension: this is a demo page or asset (it gets [`PAGE_CSP`]).
#[derive(Debug, Clone, Copy)]
pub struct DemoPage;

/// Checked demo settings.
#[derive(Clone)]
pub struct Demo {
    user: String,
    jwt: JwtArgs,
    ttl: Duration,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Demo {
    /// Check that demo tokens can be signed for `user` with these settings.
    pub fn new(jwt: &JwtArgs, user: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            jwt.jwt_secret.as_deref().is_some_and(|s| !s.is_empty()),
            "NOTIFYD_DEMO needs NOTIFYD_JWT_SECRET: demo mode signs HS256 tokens for the demo \
             user, which a service configured with only NOTIFYD_JWT_PUBLIC_KEY cannot do"
        );
        let demo = Demo {
            user: user.to_owned(),
            jwt: jwt.clone(),
            ttl: TOKEN_TTL,
        };
        demo.token()
            .context("NOTIFYD_DEMO_USER: cannot sign a demo token")?;
        Ok(demo)
    }

    /// Hand out tokens valid for `secs` seconds instead of [`TOKEN_TTL`].
    pub fn with_token_ttl(mut self, secs: u64) -> Self {
        self.ttl = Duration::from_secs(secs);
        self
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    fn token(&self) -> anyhow::Result<String> {
        auth::mint(&self.jwt, &self.user, self.ttl)
    }
}

/// What `/demo/token` answers.
#[derive(Debug, Serialize)]
pub struct DemoToken {
    pub token: String,
    pub user_id: String,
    pub expires_in: u64,
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    response.extensions_mut().insert(DemoPage);
    response
}

pub async fn root() -> Redirect {
    Redirect::to("/demo/")
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", INBOX_JS)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", INBOX_CSS)
}

pub async fn client() -> Response {
    asset("text/javascript; charset=utf-8", CLIENT_JS)
}

pub async fn token(State(state): State<AppState>) -> Result<Json<DemoToken>, ApiError> {
    let demo = state.demo().ok_or(ApiError::NotFound)?;
    let token = demo.token()?;
    Ok(Json(DemoToken {
        token,
        user_id: demo.user.clone(),
        expires_in: demo.ttl.as_secs(),
    }))
}
