//! The keys tokens are verified with, loaded once at startup: HS256 secrets, PEM public
//! keys or a JWKS file, several at once so that a backend can rotate its key without
//! every user's session failing at the same second.
//!
//! Invariants:
//! * one kind of key per service: secrets (`NOTIFYD_JWT_SECRET` and
//!   `NOTIFYD_JWT_PREVIOUS_SECRETS`), PEM files (`NOTIFYD_JWT_PUBLIC_KEY` and
//!   `NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS`) or a JWKS file (`NOTIFYD_JWT_JWKS_FILE`);
//! * each key carries its one algorithm (a secret HS256, an RSA key RS256, an EC P-256
//!   key ES256); a token is only ever checked against keys of the algorithm its header
//!   names, with that algorithm alone allowed, so `alg: none` and algorithm confusion
//!   stay impossible whatever the mix of keys;
//! * a token whose header has a `kid` is checked only against keys with that `kid` and
//!   keys that have none (secrets, PEM files); a JWKS whose keys all have a `kid` thus
//!   refuses an unknown `kid` outright. Without a `kid`, each key of the algorithm is
//!   tried, at most [`MAX_KEYS`];
//! * no private key material is accepted (a PEM private key, a JWK with `d`, a symmetric
//!   JWK), and every mistake fails startup with a message naming its variable;
//! * the JWKS file is read at startup and again on SIGHUP
//!   ([`super::reload_on_sighup`]); a re-read that fails those checks keeps the keys in
//!   use. Publish a new key there, SIGHUP (or restart) the replicas, then let the backend
//!   sign with it.

use std::path::Path;

use anyhow::Context;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Header};
use serde_json::Value;

use super::{JwtArgs, MIN_SECRET_BYTES};

/// Most keys configured at once: a token without `kid` may be tried against each.
pub const MAX_KEYS: usize = 8;
/// Largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// One verification key.
pub struct Key {
    pub algorithm: Algorithm,
    pub kid: Option<String>,
    pub decoding: DecodingKey,
    /// Where it came from, for logs (never the key itself).
    pub origin: String,
}

/// Every configured key, in the order given (the primary first).
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Load the configured keys; the error names the variable at fault.
    pub fn load(args: &JwtArgs) -> anyhow::Result<Self> {
        let secrets = args.secret().is_some() || args.previous_secrets_set();
        let pems = args.jwt_public_key.is_some() || !args.previous_public_keys().is_empty();
        let jwks = args.jwt_jwks_file.is_some();
        let keys = match (secrets, pems, &args.jwt_jwks_file) {
            (true, false, None) => load_secrets(args)?,
            (false, true, None) => load_pems(args)?,
            (false, false, Some(path)) => load_jwks(path)?,
            (false, false, None) => anyhow::bail!(
                "no JWT key is configured: set exactly one of NOTIFYD_JWT_SECRET (HS256), \
                 NOTIFYD_JWT_PUBLIC_KEY (a PEM public key, RS256 or ES256) and \
                 NOTIFYD_JWT_JWKS_FILE (a JWKS file)"
            ),
            _ => anyhow::bail!(
                "more than one kind of JWT key is configured ({}): set exactly one of \
                 NOTIFYD_JWT_SECRET (HS256), NOTIFYD_JWT_PUBLIC_KEY (RS256/ES256) and \
                 NOTIFYD_JWT_JWKS_FILE",
                [
                    (secrets, "NOTIFYD_JWT_SECRET"),
                    (pems, "NOTIFYD_JWT_PUBLIC_KEY"),
                    (jwks, "NOTIFYD_JWT_JWKS_FILE"),
                ]
                .iter()
                .filter(|(set, _)| *set)
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(" and ")
            ),
        };
        Ok(KeySet { keys })
    }

    /// Load a JWKS file alone (a re-read; the startup checks apply).
    pub fn load_jwks(path: &Path) -> anyhow::Result<Self> {
        Ok(KeySet {
            keys: load_jwks(path)?,
        })
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The only key, when there is one and it has no `kid`: no need to read the header
    /// first (`decode` checks the algorithm itself).
    pub fn single(&self) -> Option<&Key> {
        match self.keys.as_slice() {
            [key] if key.kid.is_none() => Some(key),
            _ => None,
        }
    }

    /// The keys a token with this header may have been signed with.
    pub fn candidates<'a>(&'a self, header: &'a Header) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |key| {
            key.algorithm == header.alg
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        })
    }
}

fn load_secrets(args: &JwtArgs) -> anyhow::Result<Vec<Key>> {
    let primary = args.checked_secret()?.ok_or_else(|| {
        anyhow::anyhow!(
            "NOTIFYD_JWT_PREVIOUS_SECRETS is set without NOTIFYD_JWT_SECRET: set the current \
             secret in NOTIFYD_JWT_SECRET and only older ones in NOTIFYD_JWT_PREVIOUS_SECRETS"
        )
    })?;
    let mut secrets: Vec<(&[u8], String)> = vec![(primary, "NOTIFYD_JWT_SECRET".to_owned())];
    if let Some(list) = args
        .jwt_previous_secrets
        .as_deref()
        .filter(|_| args.previous_secrets_set())
    {
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let total = entries.len();
        for (i, secret) in entries.into_iter().enumerate() {
            let n = i + 1;
            anyhow::ensure!(
                !secret.is_empty(),
                "NOTIFYD_JWT_PREVIOUS_SECRETS: secret {n} of {total} is empty (two commas in a \
                 row, or a trailing comma?); list the older secrets comma-separated"
            );
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_BYTES,
                "NOTIFYD_JWT_PREVIOUS_SECRETS: secret {n} of {total} is too short: {} bytes, at \
                 least {MIN_SECRET_BYTES} are required (a secret that contains a comma cannot be \
                 listed here: keep it in NOTIFYD_JWT_SECRET during the rotation)",
                secret.len()
            );
            if secrets.iter().all(|(s, _)| *s != secret.as_bytes()) {
                secrets.push((
                    secret.as_bytes(),
                    format!("NOTIFYD_JWT_PREVIOUS_SECRETS #{n}"),
                ));
            }
        }
    }
    ensure_few(secrets.len(), "NOTIFYD_JWT_PREVIOUS_SECRETS")?;
    Ok(secrets
        .into_iter()
        .map(|(secret, origin)| Key {
            algorithm: Algorithm::HS256,
            kid: None,
            decoding: DecodingKey::from_secret(secret),
            origin,
        })
        .collect())
}

fn load_pems(args: &JwtArgs) -> anyhow::Result<Vec<Key>> {
    let primary = args.jwt_public_key.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS is set without NOTIFYD_JWT_PUBLIC_KEY: set the \
             current key's file in NOTIFYD_JWT_PUBLIC_KEY and only older ones in \
             NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS"
        )
    })?;
    let mut keys = vec![load_pem(primary, "NOTIFYD_JWT_PUBLIC_KEY")?];
    let paths = args.previous_public_keys();
    let total = paths.len();
    for (i, path) in paths.into_iter().enumerate() {
        let n = i + 1;
        anyhow::ensure!(
            !path.is_empty(),
            "NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS: path {n} of {total} is empty (two commas in a \
             row, or a trailing comma?); list the older keys' files comma-separated"
        );
        keys.push(load_pem(
            Path::new(path),
            "NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS",
        )?);
    }
    ensure_few(keys.len(), "NOTIFYD_JWT_PREVIOUS_PUBLIC_KEYS")?;
    Ok(keys)
}

fn load_pem(path: &Path, variable: &str) -> anyhow::Result<Key> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read {variable} file {}", path.display()))?;
    anyhow::ensure!(
        !String::from_utf8_lossy(&pem).contains("PRIVATE KEY"),
        "{variable} ({}) holds a private key: give the service only the public key",
        path.display()
    );
    let origin = format!("{variable} {}", path.display());
    if let Ok(decoding) = DecodingKey::from_rsa_pem(&pem) {
        return Ok(Key {
            algorithm: Algorithm::RS256,
            kid: None,
            decoding,
            origin,
        });
    }
    if let Ok(decoding) = DecodingKey::from_ec_pem(&pem) {
        return Ok(Key {
            algorithm: Algorithm::ES256,
            kid: None,
            decoding,
            origin,
        });
    }
    anyhow::bail!(
        "{variable} ({}) is not a PEM RSA or EC public key",
        path.display()
    )
}

fn load_jwks(path: &Path) -> anyhow::Result<Vec<Key>> {
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read NOTIFYD_JWT_JWKS_FILE file {shown}"))?;
    anyhow::ensure!(
        meta.len() <= MAX_JWKS_BYTES,
        "NOTIFYD_JWT_JWKS_FILE ({shown}) is {} bytes, more than a JWKS should ever be \
         ({MAX_JWKS_BYTES} at most)",
        meta.len()
    );
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read NOTIFYD_JWT_JWKS_FILE file {shown}"))?;
    let not_jwks = || {
        format!(
            "NOTIFYD_JWT_JWKS_FILE ({shown}) is not a JWKS: a JSON object with a `keys` array \
             of public JSON Web Keys"
        )
    };
    let doc: Value = serde_json::from_str(&text).with_context(not_jwks)?;
    let raw_keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow::anyhow!(not_jwks()))?;
    anyhow::ensure!(
        !raw_keys.is_empty(),
        "NOTIFYD_JWT_JWKS_FILE ({shown}) holds no key (`keys` is empty)"
    );
    let mut keys: Vec<Key> = Vec::new();
    for (i, raw) in raw_keys.iter().enumerate() {
        let kid = raw.get("kid").and_then(Value::as_str);
        let which = match kid {
            Some(kid) => format!("key {} (kid `{kid}`)", i + 1),
            None => format!("key {}", i + 1),
        };
        let bad = |why: &str| anyhow::anyhow!("NOTIFYD_JWT_JWKS_FILE ({shown}): {which} {why}");
        if !raw.is_object() {
            return Err(bad("is not a JSON object"));
        }
        if raw.get("d").is_some() || raw.get("k").is_some() {
            return Err(bad(
                "holds private or symmetric key material (`d` or `k`): publish only public \
                 keys; HS256 secrets belong in NOTIFYD_JWT_SECRET",
            ));
        }
        let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| {
            bad(&format!(
                "is not a JSON Web Key notifyd can use ({e}); RSA and EC P-256 public keys are \
                 accepted"
            ))
        })?;
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            // An encryption key is no signing key: not ours, and harmless to skip.
            continue;
        }
        let algorithm = match (&jwk.algorithm, &jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (_, Some(alg)) => {
                return Err(bad(&format!(
                    "is for {alg:?}; notifyd accepts RS256 (RSA) and ES256 (EC P-256) keys"
                )));
            }
            _ => {
                return Err(bad(
                    "is neither an RSA key nor an EC P-256 key; notifyd accepts RS256 and ES256",
                ));
            }
        };
        let decoding = DecodingKey::from_jwk(&jwk)
            .map_err(|e| bad(&format!("cannot be used as a key ({e})")))?;
        if let Some(kid) = &jwk.common.key_id {
            anyhow::ensure!(
                keys.iter().all(|k| k.kid.as_deref() != Some(kid.as_str())),
                "NOTIFYD_JWT_JWKS_FILE ({shown}): kid `{kid}` is used by two keys; each key \
                 needs its own kid"
            );
        }
        keys.push(Key {
            algorithm,
            kid: jwk.common.key_id.clone(),
            decoding,
            origin: format!("NOTIFYD_JWT_JWKS_FILE {which}"),
        });
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "NOTIFYD_JWT_JWKS_FILE ({shown}) holds no signing key (every key has `use: enc`)"
    );
    ensure_few(keys.len(), "NOTIFYD_JWT_JWKS_FILE")?;
    Ok(keys)
}

fn ensure_few(n: usize, variable: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        n <= MAX_KEYS,
        "{variable}: {n} keys configured, at most {MAX_KEYS} are accepted at once (a token \
         without `kid` may be tried against each); drop keys no backend signs with any more"
    );
    Ok(())
}
