//! Authentication: the backend's JWTs, verified with `jsonwebtoken` (never by hand).
//!
//! Invariants:
//! * the keys ([`keys`]) fix the accepted algorithms, never the token: an HS256 secret
//!   (at least 32 bytes), an RSA key (RS256 only) or an EC P-256 key (ES256 only), one
//!   or several of one kind at once for key rotation. `alg: none` and algorithm
//!   confusion (an HS256 token "signed" with a public key) are rejected by construction;
//! * `exp` is required, `nbf` is checked when present, `iss`/`aud` are required when
//!   configured; a token with an `aud` is rejected when no audience is configured (RFC
//!   7519 §4.1.3); clock skew is tolerated up to the configured leeway;
//! * the claims of `NOTIFYD_JWT_REQUIRE` must hold (so refresh tokens are refused), and
//!   the user is the `NOTIFYD_JWT_USER_CLAIM` claim (`sub` by default), a string or an
//!   integer that must look like a notifyd user id (1–128 characters, no whitespace or
//!   control characters) ([`claims`]);
//! * that claim is the only way a request names a user: [`admit`] (behind
//!   [`CurrentUser`]) is the only source of a [`UserId`] in the handlers. The token comes
//!   from the `Authorization` header, else from the configured cookie
//!   (`NOTIFYD_JWT_COOKIE`, off by default); the stream endpoint alone also takes it from
//!   the `access_token` query parameter (browsers' `EventSource` cannot set headers);
//! * every failure is a 401 with a JSON body; the token itself is never logged or echoed.

mod claims;
mod keys;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use clap::Args;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use super::AppState;
use super::error::{ApiError, AuthFailure};
pub use claims::{Requirement, UserClaim};
pub use keys::{KeySet, MAX_KEYS};

/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest bearer token accepted; real ones are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// JWT verification settings, shared by `notifyd serve` and `notifyd token`.
#[derive(Clone, Args)]
pub struct JwtArgs {
    /// HS256 shared secret (the raw bytes of the string, at least 32 of them): the current
    /// one, which `notifyd token` and demo mode sign with. Prefer the environment
    /// variable: a flag is visible in the process list. Set exactly one of this,
    /// NOTIFYD_JWT_PUBLIC_KEY and NOTIFYD_JWT_JWKS_FILE.
    #[arg(long, env = "NOTIFYD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Older HS256 secrets still accepted during a key rotation, comma-separated (spaces
    /// around each are ignored; each at least 32 bytes). Needs NOTIFYD_JWT_SECRET. A
    /// secret that contains a comma can only be NOTIFYD_JWT_SECRET.
    #[arg(long, env = "NOTIFYD_JWT_PREVIOUS_SECRETS", hide_env_values = true)]
    pub jwt_previous_secrets: Option<String>,

    /// Path of a PEM public key for RS256 (an RSA key) or ES256 (an EC P-256 key). Set
    /// exactly one of this, NOTIFYD_JWT_SECRET and NOTIFYD_JWT_JWKS_FILE.
    #[arg(long, env = "NOTIFYD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Paths of older PEM public keys still accepted during a key rotation,
    /// comma-separated. Needs NOTIFYD_JWT_PUBLIC_KEY.
    #[arg(long, env = "NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS")]
    pub jwt_previous_public_keys: Option<String>,

    /// Path of a JWKS file (RFC 7517 JSON: `{"keys": [...]}`) of RSA or EC P-256 public
    /// keys, chosen by the token's `kid`. Read at startup and again on SIGHUP (a file
    /// that fails the checks then is ignored). Set exactly one of this,
    /// NOTIFYD_JWT_SECRET and NOTIFYD_JWT_PUBLIC_KEY.
    #[arg(long, env = "NOTIFYD_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// The claim that holds the user id: `sub` (the default), or e.g. `user_id`
    /// (djangorestframework-simplejwt). A JSON integer is taken as its decimal text.
    #[arg(long, env = "NOTIFYD_JWT_USER_CLAIM", default_value = "sub")]
    pub jwt_user_claim: String,

    /// Claims that must have a given value, comma-separated claim=value pairs, e.g.
    /// `type=access` (flask-jwt-extended) or `token_type=access` (simplejwt), so that
    /// refresh tokens are refused. A value matches a JSON string exactly, and a number or
    /// bool by its JSON text.
    #[arg(long, env = "NOTIFYD_JWT_REQUIRE")]
    pub jwt_require: Option<String>,

    /// Name of a cookie that may carry the JWT when no Authorization header is sent (e.g.
    /// `access_token_cookie`, flask-jwt-extended's with JWT_TOKEN_LOCATION=cookies). Off
    /// when unset. With it, CORS allows credentials for NOTIFYD_CORS_ORIGINS.
    #[arg(long, env = "NOTIFYD_JWT_COOKIE")]
    pub jwt_cookie: Option<String>,

    /// Required `iss` claim (exact match), when set.
    #[arg(long, env = "NOTIFYD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Audiences this service answers to, comma-separated: a token's `aud` must name one.
    /// When unset, a token that carries `aud` at all is rejected (RFC 7519 §4.1.3).
    #[arg(long, env = "NOTIFYD_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Seconds of clock skew tolerated when checking `exp` and `nbf`.
    #[arg(long, env = "NOTIFYD_JWT_LEEWAY_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=300))]
    pub jwt_leeway_secs: u64,
}

impl Default for JwtArgs {
    /// The settings with no variable set (no key: not valid until one is given).
    fn default() -> Self {
        JwtArgs {
            jwt_secret: None,
            jwt_previous_secrets: None,
            jwt_public_key: None,
            jwt_previous_public_keys: None,
            jwt_jwks_file: None,
            jwt_user_claim: "sub".to_owned(),
            jwt_require: None,
            jwt_cookie: None,
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_leeway_secs: 30,
        }
    }
}

impl std::fmt::Debug for JwtArgs {
    // Hand-written so that no secret ever ends up in a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtArgs")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwt_previous_secrets",
                &self.jwt_previous_secrets.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key", &self.jwt_public_key)
            .field("jwt_previous_public_keys", &self.jwt_previous_public_keys)
            .field("jwt_jwks_file", &self.jwt_jwks_file)
            .field("jwt_user_claim", &self.jwt_user_claim)
            .field("jwt_require", &self.jwt_require)
            .field("jwt_cookie", &self.jwt_cookie)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .finish()
    }
}

impl JwtArgs {
    fn secret(&self) -> Option<&str> {
        self.jwt_secret.as_deref().filter(|s| !s.is_empty())
    }

    fn previous_secrets_set(&self) -> bool {
        self.jwt_previous_secrets
            .as_deref()
            .is_some_and(|s| !s.trim().is_empty())
    }

    /// The older public keys' paths, as given (empty entries kept, to be refused).
    fn previous_public_keys(&self) -> Vec<&str> {
        match self.jwt_previous_public_keys.as_deref() {
            Some(list) if !list.trim().is_empty() => list.split(',').map(str::trim).collect(),
            _ => Vec::new(),
        }
    }

    fn issuer(&self) -> Option<&str> {
        self.jwt_issuer
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    fn audiences(&self) -> Vec<&str> {
        self.jwt_audience
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
            .collect()
    }

    fn cookie(&self) -> anyhow::Result<Option<String>> {
        let Some(name) = self.jwt_cookie.as_deref().map(str::trim) else {
            return Ok(None);
        };
        if name.is_empty() {
            return Ok(None);
        }
        // RFC 6265 §4.1.1: a cookie name is an RFC 7230 token.
        let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        anyhow::ensure!(
            name.len() <= 256 && name.bytes().all(token_char),
            "NOTIFYD_JWT_COOKIE: `{name}` is not a cookie name (letters, digits and \
             !#$%&'*+-.^_`|~ only), e.g. access_token_cookie"
        );
        Ok(Some(name.to_owned()))
    }

    /// The HS256 secret, checked for length.
    fn checked_secret(&self) -> anyhow::Result<Option<&[u8]>> {
        let Some(secret) = self.secret() else {
            return Ok(None);
        };
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_BYTES,
            "NOTIFYD_JWT_SECRET is too short: {} bytes, at least {MIN_SECRET_BYTES} are required \
             (generate one with `openssl rand -base64 48`)",
            secret.len()
        );
        Ok(Some(secret.as_bytes()))
    }

    fn user_claim(&self) -> anyhow::Result<UserClaim> {
        UserClaim::parse(&self.jwt_user_claim)
    }

    fn requirements(&self, user_claim: &UserClaim) -> anyhow::Result<Vec<Requirement>> {
        claims::parse_requirements(self.jwt_require.as_deref().unwrap_or(""), user_claim)
    }
}

/// A user id taken from a verified token's user claim. Only [`Verifier::verify`] makes
/// one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    fn parse(id: String) -> Option<Self> {
        let chars = id.chars().count();
        let ok =
            (1..=128).contains(&chars) && !id.chars().any(|c| c.is_control() || c.is_whitespace());
        ok.then_some(UserId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Verifies bearer tokens with the configured keys and claim rules.
pub struct Verifier {
    /// Swapped whole when the JWKS file is re-read ([`Verifier::reload_jwks`]).
    keys: RwLock<Arc<KeySet>>,
    jwks_file: Option<PathBuf>,
    /// Re-reads of the JWKS file so far, failed ones included.
    jwks_reloads: AtomicU64,
    /// The checks, one per algorithm notifyd accepts (each allows that algorithm only).
    validations: Vec<Validation>,
    leeway: u64,
    user_claim: UserClaim,
    requirements: Vec<Requirement>,
    cookie: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.algorithms())
            .field("user_claim", &self.user_claim.name())
            .field("requirements", &self.requirements)
            .field("cookie", &self.cookie)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Build from settings, failing with a message that names the variable at fault.
    pub fn from_args(args: &JwtArgs) -> anyhow::Result<Self> {
        let keys = KeySet::load(args)?;
        let user_claim = args.user_claim()?;
        let requirements = args.requirements(&user_claim)?;
        let cookie = args.cookie()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = args.jwt_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // The user claim is checked here (it may be an integer, or not `sub` at all).
        let mut required = vec!["exp"];
        if let Some(iss) = args.issuer() {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        let audiences = args.audiences();
        if !audiences.is_empty() {
            validation.set_audience(&audiences);
            required.push("aud");
        }
        // With no audience configured, a token that carries `aud` is rejected: RFC 7519
        // §4.1.3 says a recipient that cannot find itself in `aud` must reject the token.
        validation.set_required_spec_claims(&required);
        // One per algorithm any key can have, so that a re-read JWKS may bring new ones.
        let validations = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]
            .into_iter()
            .map(|algorithm| {
                let mut v = validation.clone();
                v.algorithms = vec![algorithm];
                v
            })
            .collect();
        Ok(Verifier {
            keys: RwLock::new(Arc::new(keys)),
            jwks_file: args.jwt_jwks_file.clone(),
            jwks_reloads: AtomicU64::new(0),
            validations,
            leeway: args.jwt_leeway_secs,
            user_claim,
            requirements,
            cookie,
        })
    }

    /// The algorithm of each configured key, in order.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.keys().keys().iter().map(|k| k.algorithm).collect()
    }

    fn keys(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a whole key set: swaps replace it in one step.
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The JWKS file, when the keys come from one.
    pub fn jwks_file(&self) -> Option<&Path> {
        self.jwks_file.as_deref()
    }

    /// Re-read the JWKS file (on SIGHUP, [`reload_on_sighup`]). A file that fails the
    /// startup checks changes nothing: the keys in use stay, and the error is returned.
    /// Returns the number of keys now in use.
    pub fn reload_jwks(&self) -> anyhow::Result<usize> {
        let Some(path) = &self.jwks_file else {
            anyhow::bail!("no NOTIFYD_JWT_JWKS_FILE to re-read");
        };
        let loaded = KeySet::load_jwks(path);
        self.jwks_reloads.fetch_add(1, Ordering::Relaxed);
        let keys = loaded?;
        let n = keys.keys().len();
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// How many times the JWKS file was re-read, failed attempts included.
    pub fn jwks_reloads(&self) -> u64 {
        self.jwks_reloads.load(Ordering::Relaxed)
    }

    /// The claim that names the user.
    pub fn user_claim(&self) -> &str {
        self.user_claim.name()
    }

    /// The cookie that may carry the token, when configured.
    pub fn cookie(&self) -> Option<&str> {
        self.cookie.as_deref()
    }

    /// Verify a bearer token and return its user.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthFailure> {
        self.verify_until(token).map(|(user, _)| user)
    }

    /// Verify a bearer token; return its user and the Unix second from which this
    /// verifier refuses it (`exp` plus the tolerated clock skew). Long-lived responses
    /// (streams) end then.
    pub fn verify_until(&self, token: &str) -> Result<(UserId, u64), AuthFailure> {
        if token.len() > MAX_TOKEN_BYTES
            || token.split('.').count() != 3
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(AuthFailure::Invalid);
        }
        let claims = self.decode(token)?;
        // `exp` is present and numeric: the validation requires it.
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or(AuthFailure::Invalid)?;
        claims::check(&self.requirements, &claims)?;
        let user = self.user_claim.user(&claims)?;
        Ok((user, exp.saturating_add(self.leeway)))
    }

    /// The verified payload: signature (by a key of the token's algorithm), times, `iss`
    /// and `aud`.
    fn decode(&self, token: &str) -> Result<Map<String, Value>, AuthFailure> {
        let keys = self.keys();
        if let Some(key) = keys.single() {
            return self.decode_with(token, key).map_err(reason);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| reason(e.into_kind()))?;
        let mut last = ErrorKind::InvalidSignature;
        for key in keys.candidates(&header) {
            match self.decode_with(token, key) {
                // Not this key: try the next one.
                Err(ErrorKind::InvalidSignature) => last = ErrorKind::InvalidSignature,
                // The signature verified (or the token is malformed for every key).
                other => return other.map_err(reason),
            }
        }
        tracing::debug!(alg = ?header.alg, kid = ?header.kid, "no configured key verifies the token");
        Err(reason(last))
    }

    fn decode_with(&self, token: &str, key: &keys::Key) -> Result<Map<String, Value>, ErrorKind> {
        let validation = self
            .validations
            .iter()
            .find(|v| v.algorithms == [key.algorithm])
            .ok_or(ErrorKind::InvalidAlgorithm)?;
        jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, validation)
            .map(|data| data.claims)
            .map_err(|e| e.into_kind())
    }

    /// The token of an `Authorization` header value (`Bearer <token>`, scheme in any case).
    pub fn bearer(value: &[u8]) -> Result<&str, AuthFailure> {
        let value = std::str::from_utf8(value).map_err(|_| AuthFailure::Invalid)?;
        let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Invalid)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthFailure::Invalid);
        }
        let token = token.trim_matches(' ');
        if token.is_empty() {
            return Err(AuthFailure::Invalid);
        }
        Ok(token)
    }
}

/// The client's view of why `jsonwebtoken` refused a token.
fn reason(kind: ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        other => {
            tracing::debug!(reason = ?other, "token rejected");
            AuthFailure::Invalid
        }
    }
}

/// With a JWKS file, re-read it on every SIGHUP until shutdown (a new key can be published
/// without a restart); otherwise `None`, and SIGHUP keeps its default meaning. The signal
/// handler is installed before this returns.
pub fn reload_on_sighup(
    state: &AppState,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let path = state.verifier().jwks_file()?.to_owned();
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: the JWKS file is read at startup only");
            return None;
        }
    };
    let state = state.clone();
    Some(tokio::spawn(async move {
        let stop = crate::shutdown::wait(shutdown);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                got = hangups.recv() => {
                    if got.is_none() {
                        return;
                    }
                    match state.verifier().reload_jwks() {
                        Ok(keys) => tracing::info!(path = %path.display(), keys, "re-read NOTIFYD_JWT_JWKS_FILE"),
                        Err(e) => tracing::error!(
                            error = %format!("{e:#}"),
                            "SIGHUP: NOTIFYD_JWT_JWKS_FILE not re-read, the keys in use stay"
                        ),
                    }
                }
                _ = &mut stop => return,
            }
        }
    }))
}

/// The authenticated user of a request, within its per-user request limit. Handlers that
/// take a `CurrentUser` can only ever read that user's rows.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub UserId);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = request_token(state, &parts.headers)?
            .ok_or(ApiError::Unauthorized(AuthFailure::Missing))?;
        admit(state, &token).map(CurrentUser)
    }
}

/// The request's token: the `Authorization` header's when there is one (even a bad one:
/// the header wins), else the configured cookie's.
pub fn request_token<'a>(
    state: &AppState,
    headers: &'a HeaderMap,
) -> Result<Option<Cow<'a, str>>, ApiError> {
    if let Some(token) = header_token(headers)? {
        return Ok(Some(Cow::Borrowed(token)));
    }
    cookie_token(state, headers)
}

/// The bearer token of the `Authorization` header: `None` without one, an error for a
/// malformed one or for more than one.
pub fn header_token(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::Unauthorized(AuthFailure::Invalid));
    }
    Verifier::bearer(value.as_bytes())
        .map(Some)
        .map_err(ApiError::Unauthorized)
}

/// The token in the configured cookie (`NOTIFYD_JWT_COOKIE`): `None` when the cookie is
/// not configured or not sent. The same cookie sent twice with different values (a
/// sibling subdomain can plant one) is refused rather than guessed between.
pub fn cookie_token<'a>(
    state: &AppState,
    headers: &'a HeaderMap,
) -> Result<Option<Cow<'a, str>>, ApiError> {
    let Some(name) = state.verifier().cookie() else {
        return Ok(None);
    };
    let mut found: Option<Cow<'a, str>> = None;
    for header in headers.get_all(COOKIE) {
        let Ok(header) = header.to_str() else {
            continue;
        };
        // Malformed pairs of other cookies are not our business: skip them.
        for cookie in cookie::Cookie::split_parse(header).flatten() {
            if cookie.name() != name {
                continue;
            }
            let value = cookie.value_trimmed().to_owned();
            match &found {
                Some(seen) if *seen != value => {
                    return Err(ApiError::Unauthorized(AuthFailure::Invalid));
                }
                Some(_) => {}
                None => found = Some(Cow::Owned(value)),
            }
        }
    }
    match found {
        Some(token) if token.is_empty() => Err(ApiError::Unauthorized(AuthFailure::Invalid)),
        other => Ok(other),
    }
}

/// Verify `token`, then spend one request of its user's budget: what every way of
/// authenticating a request ends with.
pub fn admit(state: &AppState, token: &str) -> Result<UserId, ApiError> {
    admit_until(state, token).map(|(user, _)| user)
}

/// [`admit`], also returning when the token stops being valid (see
/// [`Verifier::verify_until`]).
pub fn admit_until(state: &AppState, token: &str) -> Result<(UserId, u64), ApiError> {
    let (user, until) = state
        .verifier()
        .verify_until(token)
        .map_err(ApiError::Unauthorized)?;
    tracing::Span::current().record("user", user.as_str());
    state
        .limiter()
        .check(user.as_str())
        .map_err(|retry_after| ApiError::RateLimited { retry_after })?;
    Ok((user, until))
}

/// An HS256 token for `user`, valid for `ttl`, signed with `NOTIFYD_JWT_SECRET`, so that
/// a `notifyd serve` with the same settings accepts it: the user in the configured user
/// claim, the configured issuer and (first) audience, and each `NOTIFYD_JWT_REQUIRE`
/// claim with its value (as a string, which matches).
pub fn mint(args: &JwtArgs, user: &str, ttl: Duration) -> anyhow::Result<String> {
    let secret = args.checked_secret()?.ok_or_else(|| {
        anyhow::anyhow!("NOTIFYD_JWT_SECRET is not set: `notifyd token` signs HS256 tokens with it")
    })?;
    anyhow::ensure!(
        UserId::parse(user.to_owned()).is_some(),
        "--sub must be 1 to 128 characters without whitespace or control characters"
    );
    let user_claim = args.user_claim()?;
    let requirements = args.requirements(&user_claim)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let mut claims = Map::new();
    for r in &requirements {
        claims.insert(r.claim().to_owned(), r.value().into());
    }
    claims.insert(user_claim.name().to_owned(), user.into());
    claims.insert("iat".to_owned(), now.into());
    claims.insert("exp".to_owned(), (now + ttl.as_secs()).into());
    if let Some(iss) = args.issuer() {
        claims.insert("iss".to_owned(), iss.into());
    }
    if let Some(aud) = args.audiences().first() {
        claims.insert("aud".to_owned(), (*aud).into());
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .context("cannot sign the token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(secret: Option<&str>) -> JwtArgs {
        JwtArgs {
            jwt_secret: secret.map(str::to_owned),
            jwt_leeway_secs: 0,
            ..JwtArgs::default()
        }
    }

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn error(a: &JwtArgs) -> String {
        format!("{:#}", Verifier::from_args(a).unwrap_err())
    }

    fn hs256(secret: &str, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn in_a_minute() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60
    }

    #[test]
    fn short_secret_is_refused_naming_the_variable() {
        let e = Verifier::from_args(&args(Some("short"))).unwrap_err();
        assert!(e.to_string().contains("NOTIFYD_JWT_SECRET"), "{e}");
    }

    #[test]
    fn exactly_one_kind_of_key() {
        let e = error(&args(None));
        assert!(e.contains("no JWT key"), "{e}");
        let mut both = args(Some(&"x".repeat(32)));
        both.jwt_public_key = Some("/nonexistent.pem".into());
        let e = error(&both);
        assert!(e.contains("more than one kind"), "{e}");
        let mut both = args(None);
        both.jwt_public_key = Some(fixture("serve_rsa_public.pem"));
        both.jwt_jwks_file = Some(fixture("serve_jwks.json"));
        let e = error(&both);
        assert!(
            e.contains("NOTIFYD_JWT_PUBLIC_KEY and NOTIFYD_JWT_JWKS_FILE"),
            "{e}"
        );
    }

    #[test]
    fn previous_secrets_are_accepted_and_checked() {
        let current = "c".repeat(40);
        let old = "o".repeat(40);
        let older = "p".repeat(33);
        let mut a = args(Some(&current));
        a.jwt_previous_secrets = Some(format!(" {old} , {older}"));
        let v = Verifier::from_args(&a).unwrap();
        assert_eq!(v.algorithms(), [Algorithm::HS256; 3]);
        for secret in [&current, &old, &older] {
            let t = hs256(
                secret,
                &serde_json::json!({"sub": "u1", "exp": in_a_minute()}),
            );
            assert_eq!(v.verify(&t).unwrap().as_str(), "u1");
        }
        let other = hs256(
            &"z".repeat(40),
            &serde_json::json!({"sub": "u1", "exp": in_a_minute()}),
        );
        assert_eq!(v.verify(&other), Err(AuthFailure::Invalid));
        // An expired token under an old secret is expired, not "invalid".
        let expired = hs256(&old, &serde_json::json!({"sub": "u1", "exp": 1000}));
        assert_eq!(v.verify(&expired), Err(AuthFailure::Expired));

        for (list, wanted) in [
            (format!("{old},"), "secret 2 of 2 is empty"),
            (format!("{old},,{older}"), "secret 2 of 3 is empty"),
            (format!("{old}, short"), "secret 2 of 2 is too short"),
        ] {
            a.jwt_previous_secrets = Some(list);
            let e = error(&a);
            assert!(
                e.contains("NOTIFYD_JWT_PREVIOUS_SECRETS") && e.contains(wanted),
                "{e}"
            );
            assert!(!e.contains(&old), "a secret in the message: {e}");
        }
        a.jwt_previous_secrets = Some(
            (0..MAX_KEYS)
                .map(|i| format!("{old}{i}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        assert!(error(&a).contains("at most"));
        let mut no_primary = args(None);
        no_primary.jwt_previous_secrets = Some(old.clone());
        let e = error(&no_primary);
        assert!(e.contains("without NOTIFYD_JWT_SECRET"), "{e}");
        // Set but blank is unset.
        let mut blank = args(Some(&current));
        blank.jwt_previous_secrets = Some("  ".into());
        assert_eq!(Verifier::from_args(&blank).unwrap().algorithms().len(), 1);
    }

    #[test]
    fn previous_public_keys() {
        let mut a = args(None);
        a.jwt_public_key = Some(fixture("serve_rsa2_public.pem"));
        let list = |paths: &[PathBuf]| {
            Some(
                paths
                    .iter()
                    .map(|p| p.to_str().unwrap())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        };
        a.jwt_previous_public_keys = list(&[
            fixture("serve_rsa_public.pem"),
            fixture("serve_ec_public.pem"),
        ]);
        let v = Verifier::from_args(&a).unwrap();
        assert_eq!(
            v.algorithms(),
            [Algorithm::RS256, Algorithm::RS256, Algorithm::ES256]
        );
        a.jwt_previous_public_keys = list(&[fixture("serve_rsa_public.pem"), PathBuf::new()]);
        let e = error(&a);
        assert!(
            e.contains("NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS") && e.contains("path 2 of 2 is empty"),
            "{e}"
        );
        a.jwt_previous_public_keys = list(&[fixture("serve_rsa_private.pem")]);
        let e = error(&a);
        assert!(
            e.contains("NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS") && e.contains("private key"),
            "{e}"
        );
        a.jwt_previous_public_keys = list(&[fixture("missing.pem")]);
        assert!(error(&a).contains("cannot read NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS"));
        let mut no_primary = args(None);
        no_primary.jwt_previous_public_keys = list(&[fixture("serve_rsa_public.pem")]);
        assert!(error(&no_primary).contains("without NOTIFYD_JWT_PUBLIC_KEY"));
        // Set but blank is unset.
        a.jwt_previous_public_keys = Some(" ".into());
        assert_eq!(Verifier::from_args(&a).unwrap().algorithms().len(), 1);
    }

    #[test]
    fn jwks_files_are_checked_naming_the_variable() {
        let dir = std::env::temp_dir().join(format!("notifyd-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let jwks = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let mut a = args(None);
            a.jwt_jwks_file = Some(path);
            a
        };
        let good: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("serve_jwks.json")).unwrap())
                .unwrap();
        let v = Verifier::from_args(&jwks("good.json", &good.to_string())).unwrap();
        assert_eq!(
            v.algorithms(),
            [Algorithm::RS256, Algorithm::RS256, Algorithm::ES256]
        );
        let rsa = good["keys"][0].clone();
        let with = |patch: Value| {
            let mut k = rsa.clone();
            for (name, value) in patch.as_object().unwrap() {
                k[name] = value.clone();
            }
            serde_json::json!({ "keys": [k] }).to_string()
        };
        let cases: Vec<(String, &str)> = vec![
            ("{not json".into(), "is not a JWKS"),
            ("[]".into(), "is not a JWKS"),
            (r#"{"keys": {}}"#.into(), "is not a JWKS"),
            (r#"{"keys": []}"#.into(), "holds no key"),
            (r#"{"keys": [1]}"#.into(), "key 1 is not a JSON object"),
            (with(serde_json::json!({"d": "AAAA"})), "private"),
            (
                r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#.into(),
                "symmetric",
            ),
            (with(serde_json::json!({"alg": "RS512"})), "is for RS512"),
            (with(serde_json::json!({"n": 7})), "not a JSON Web Key"),
            (
                r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#.into(),
                "neither an RSA key nor an EC P-256 key",
            ),
            (with(serde_json::json!({"use": "enc"})), "no signing key"),
            (
                serde_json::json!({"keys": [rsa.clone(), rsa.clone()]}).to_string(),
                "used by two keys",
            ),
        ];
        for (i, (text, wanted)) in cases.iter().enumerate() {
            let e = error(&jwks(&format!("bad{i}.json"), text));
            assert!(
                e.starts_with("NOTIFYD_JWT_JWKS_FILE") && e.contains(wanted),
                "{text}: {e}"
            );
        }
        // One key with a kid: a token naming another kid is refused, one naming none is
        // checked against it.
        let v = Verifier::from_args(&jwks(
            "one.json",
            &serde_json::json!({ "keys": [rsa.clone()] }).to_string(),
        ))
        .unwrap();
        let pem = std::fs::read(fixture("serve_rsa_private.pem")).unwrap();
        let signed = |kid: Option<&str>| {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(
                &header,
                &serde_json::json!({"sub": "u1", "exp": in_a_minute()}),
                &EncodingKey::from_rsa_pem(&pem).unwrap(),
            )
            .unwrap()
        };
        assert_eq!(
            v.verify(&signed(Some("rsa-2026-01"))).unwrap().as_str(),
            "u1"
        );
        assert_eq!(v.verify(&signed(None)).unwrap().as_str(), "u1");
        assert_eq!(v.verify(&signed(Some("other"))), Err(AuthFailure::Invalid));

        let mut missing = args(None);
        missing.jwt_jwks_file = Some(dir.join("missing.json"));
        let e = error(&missing);
        assert!(e.contains("cannot read NOTIFYD_JWT_JWKS_FILE"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn user_claim_and_requirements() {
        let mut a = args(Some(&"k".repeat(40)));
        a.jwt_user_claim = "user_id".into();
        a.jwt_require = Some("token_type=access".into());
        let v = Verifier::from_args(&a).unwrap();
        let t = |claims: Value| v.verify(&hs256(&"k".repeat(40), &claims));
        let exp = in_a_minute();
        let access = serde_json::json!({"token_type": "access", "user_id": 12, "exp": exp});
        assert_eq!(t(access).unwrap().as_str(), "12");
        assert_eq!(
            t(serde_json::json!({"token_type": "refresh", "user_id": 12, "exp": exp})),
            Err(AuthFailure::ClaimMismatch {
                claim: "token_type".into(),
                value: "access".into()
            })
        );
        assert_eq!(
            t(serde_json::json!({"token_type": "access", "sub": "12", "exp": exp})),
            Err(AuthFailure::UserClaim("user_id".into()))
        );
        assert_eq!(
            t(serde_json::json!({"token_type": "access", "user_id": 12})),
            Err(AuthFailure::Invalid)
        );

        a.jwt_require = Some("token_type".into());
        assert!(error(&a).starts_with("NOTIFYD_JWT_REQUIRE"));
        a.jwt_require = None;
        a.jwt_user_claim = "exp".into();
        assert!(error(&a).starts_with("NOTIFYD_JWT_USER_CLAIM"));
    }

    #[test]
    fn cookie_names() {
        let mut a = args(Some(&"k".repeat(40)));
        a.jwt_cookie = Some(" access_token_cookie ".into());
        let v = Verifier::from_args(&a).unwrap();
        assert_eq!(v.cookie(), Some("access_token_cookie"));
        a.jwt_cookie = Some(String::new());
        assert_eq!(Verifier::from_args(&a).unwrap().cookie(), None);
        for bad in ["a b", "a;b", "a=b", "tök"] {
            a.jwt_cookie = Some(bad.into());
            assert!(error(&a).starts_with("NOTIFYD_JWT_COOKIE"), "{bad}");
        }
    }

    #[test]
    fn minted_tokens_verify() {
        let a = args(Some(&"k".repeat(40)));
        let v = Verifier::from_args(&a).unwrap();
        let t = mint(&a, "user-1", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().as_str(), "user-1");

        // With another user claim and required claims, the same settings accept it.
        let mut a = a.clone();
        a.jwt_user_claim = "user_id".into();
        a.jwt_require = Some("token_type=access,version=2".into());
        a.jwt_previous_secrets = Some("o".repeat(40));
        let v = Verifier::from_args(&a).unwrap();
        let t = mint(&a, "42", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().as_str(), "42");
        let claims = jsonwebtoken::decode::<Map<String, Value>>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret("k".repeat(40).as_bytes()),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap()
        .claims;
        assert_eq!(claims["user_id"], "42");
        assert_eq!(claims["token_type"], "access");
        assert_eq!(claims["version"], "2");
        assert!(claims.get("sub").is_none());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(Verifier::bearer(b"Bearer abc").unwrap(), "abc");
        assert_eq!(Verifier::bearer(b"bearer abc").unwrap(), "abc");
        assert!(Verifier::bearer(b"Basic abc").is_err());
        assert!(Verifier::bearer(b"Bearer").is_err());
        assert!(Verifier::bearer(b"Bearer ").is_err());
    }

    #[test]
    fn user_ids() {
        assert!(UserId::parse("42".into()).is_some());
        assert!(UserId::parse(String::new()).is_none());
        assert!(UserId::parse("a b".into()).is_none());
        assert!(UserId::parse("a\u{0}".into()).is_none());
        assert!(UserId::parse("x".repeat(129)).is_none());
    }
}
