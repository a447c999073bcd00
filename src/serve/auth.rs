//! Authentication: the backend's JWTs, verified with `jsonwebtoken` (never by hand).
//!
//! Invariants:
//! * exactly one key is configured: an HS256 secret of at least 32 bytes, or a PEM public
//!   key (RSA → RS256 only, EC P-256 → ES256 only). The accepted algorithm is fixed by the
//!   key, never taken from the token, so `alg: none` and algorithm confusion (an HS256
//!   token "signed" with the public key) are rejected by construction;
//! * `exp` and `sub` are required, `nbf` is checked when present, `iss`/`aud` are
//!   required when configured; a token with an `aud` is rejected when no audience is
//!   configured (RFC 7519 §4.1.3); clock skew is tolerated up to the configured leeway;
//! * `sub` must look like a notifyd user id (1–128 characters, no whitespace or control
//!   characters), and it is the only way a request names a user: [`admit`] (behind
//!   [`CurrentUser`]) is the only source of a [`UserId`] in the handlers. The token comes
//!   from the `Authorization` header; the stream endpoint alone also takes it from the
//!   `access_token` query parameter (browsers' `EventSource` cannot set headers);
//! * every failure is a 401 with a JSON body; the token itself is never logged or echoed.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use clap::Args;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{ApiError, AuthFailure};

/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key at least as long as the hash).
pub const MIN_SECRET_BYTES: usize = 32;
/// Longest bearer token accepted; real ones are a few hundred bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// JWT verification settings, shared by `notifyd serve` and `notifyd token`.
#[derive(Clone, Args)]
pub struct JwtArgs {
    /// HS256 shared secret (the raw bytes of the string, at least 32 of them). Prefer the
    /// environment variable: a flag is visible in the process list. Set exactly one of
    /// this and NOTIFYD_JWT_PUBLIC_KEY.
    #[arg(long, env = "NOTIFYD_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Path of a PEM public key for RS256 (an RSA key) or ES256 (an EC P-256 key). Set
    /// exactly one of this and NOTIFYD_JWT_SECRET.
    #[arg(long, env = "NOTIFYD_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

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

impl std::fmt::Debug for JwtArgs {
    // Hand-written so that the secret never ends up in a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtArgs")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key", &self.jwt_public_key)
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
}

/// A user id taken from a verified token's `sub`. Only [`Verifier::verify`] makes one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    fn parse(sub: String) -> Option<Self> {
        let chars = sub.chars().count();
        let ok =
            (1..=128).contains(&chars) && !sub.chars().any(|c| c.is_control() || c.is_whitespace());
        ok.then_some(UserId(sub))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Verifies bearer tokens with the one configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Build from settings, failing with a message that names the variable at fault.
    pub fn from_args(args: &JwtArgs) -> anyhow::Result<Self> {
        let secret = args.checked_secret()?;
        let (key, algorithm) = match (secret, &args.jwt_public_key) {
            (Some(_), Some(_)) => anyhow::bail!(
                "both NOTIFYD_JWT_SECRET and NOTIFYD_JWT_PUBLIC_KEY are set: set exactly one \
                 (HS256 with a secret, or RS256/ES256 with a public key)"
            ),
            (None, None) => anyhow::bail!(
                "neither NOTIFYD_JWT_SECRET nor NOTIFYD_JWT_PUBLIC_KEY is set: set exactly one \
                 (HS256 with a secret, or RS256/ES256 with a public key)"
            ),
            (Some(secret), None) => (DecodingKey::from_secret(secret), Algorithm::HS256),
            (None, Some(path)) => load_public_key(path)?,
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = args.jwt_leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
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
        Ok(Verifier {
            key,
            validation,
            algorithm,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
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
        match jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => {
                let until = data.claims.exp.saturating_add(self.validation.leeway);
                let user = UserId::parse(data.claims.sub).ok_or(AuthFailure::Invalid)?;
                Ok((user, until))
            }
            Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthFailure::Expired),
            Err(e) => {
                tracing::debug!(reason = ?e.kind(), "token rejected");
                Err(AuthFailure::Invalid)
            }
        }
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

fn load_public_key(path: &std::path::Path) -> anyhow::Result<(DecodingKey, Algorithm)> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read NOTIFYD_JWT_PUBLIC_KEY file {}", path.display()))?;
    anyhow::ensure!(
        !String::from_utf8_lossy(&pem).contains("PRIVATE KEY"),
        "NOTIFYD_JWT_PUBLIC_KEY ({}) holds a private key: give the service only the public key",
        path.display()
    );
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, Algorithm::ES256));
    }
    anyhow::bail!(
        "NOTIFYD_JWT_PUBLIC_KEY ({}) is not a PEM RSA or EC public key",
        path.display()
    )
}

/// The authenticated user of a request, within its per-user request limit. Handlers that
/// take a `CurrentUser` can only ever read that user's rows.
#[derive(Debug, Clone)]
pub struct CurrentUser(pub UserId);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token =
            header_token(&parts.headers)?.ok_or(ApiError::Unauthorized(AuthFailure::Missing))?;
        admit(state, token).map(CurrentUser)
    }
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

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// An HS256 token for `sub`, valid for `ttl`, with the configured issuer and (first)
/// audience, so that a `notifyd serve` with the same settings accepts it.
pub fn mint(args: &JwtArgs, sub: &str, ttl: Duration) -> anyhow::Result<String> {
    let secret = args.checked_secret()?.ok_or_else(|| {
        anyhow::anyhow!("NOTIFYD_JWT_SECRET is not set: `notifyd token` signs HS256 tokens with it")
    })?;
    anyhow::ensure!(
        UserId::parse(sub.to_owned()).is_some(),
        "--sub must be 1 to 128 characters without whitespace or control characters"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock before 1970")?
        .as_secs();
    let claims = MintClaims {
        sub,
        iat: now,
        exp: now + ttl.as_secs(),
        iss: args.issuer(),
        aud: args.audiences().first().copied(),
    };
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
            jwt_public_key: None,
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_leeway_secs: 0,
        }
    }

    #[test]
    fn short_secret_is_refused_naming_the_variable() {
        let e = Verifier::from_args(&args(Some("short"))).unwrap_err();
        assert!(e.to_string().contains("NOTIFYD_JWT_SECRET"), "{e}");
    }

    #[test]
    fn exactly_one_key() {
        let e = Verifier::from_args(&args(None)).unwrap_err();
        assert!(e.to_string().contains("neither"), "{e}");
        let mut both = args(Some(&"x".repeat(32)));
        both.jwt_public_key = Some("/nonexistent.pem".into());
        let e = Verifier::from_args(&both).unwrap_err();
        assert!(e.to_string().contains("both"), "{e}");
    }

    #[test]
    fn minted_tokens_verify() {
        let a = args(Some(&"k".repeat(40)));
        let v = Verifier::from_args(&a).unwrap();
        let t = mint(&a, "user-1", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&t).unwrap().as_str(), "user-1");
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
