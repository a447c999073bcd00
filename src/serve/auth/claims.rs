//! What a verified token's payload must say beyond its signature and times: which claim
//! names the user (`NOTIFYD_JWT_USER_CLAIM`) and which claims must carry a given value
//! (`NOTIFYD_JWT_REQUIRE`, e.g. `type=access`, so that refresh tokens are refused).
//!
//! Invariants:
//! * the user is the configured claim's value: a JSON string as it is, or a JSON integer
//!   as its decimal text (`42` → `"42"`, simplejwt's `user_id`); anything else (a
//!   fraction, a bool, null, an array, an object) is no user, never coerced;
//! * a required value matches a JSON string exactly, and a number or bool by its JSON
//!   text (`version=2` matches `2` and `"2"`); null, arrays and objects never match;
//! * both settings are checked once, at startup, and every mistake names its variable.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::UserId;
use crate::serve::error::AuthFailure;

/// Claims that cannot name a user: checked by the service itself, or never a person.
const NOT_A_USER_CLAIM: [&str; 5] = ["exp", "nbf", "iat", "iss", "aud"];
/// Claims that `NOTIFYD_JWT_REQUIRE` cannot pin: times are checked by the service, and
/// `iss`/`aud` have their own settings.
const NOT_REQUIRABLE: [&str; 5] = ["exp", "nbf", "iat", "iss", "aud"];
/// Longest claim name accepted in a setting (real ones are a few characters; Auth0-style
/// namespaced claims are URLs).
const MAX_CLAIM_NAME: usize = 200;
/// Most `claim=value` pairs in `NOTIFYD_JWT_REQUIRE`.
const MAX_REQUIREMENTS: usize = 16;

/// The claim that names the user.
#[derive(Debug, Clone)]
pub struct UserClaim(Arc<str>);

impl UserClaim {
    pub fn parse(raw: &str) -> anyhow::Result<Self> {
        let name = raw.trim();
        check_name(name).map_err(|why| {
            anyhow::anyhow!(
                "NOTIFYD_JWT_USER_CLAIM: `{raw}` {why}; give the name of the claim that holds \
                 the user id, e.g. sub (the default) or user_id (djangorestframework-simplejwt)"
            )
        })?;
        anyhow::ensure!(
            !NOT_A_USER_CLAIM.contains(&name),
            "NOTIFYD_JWT_USER_CLAIM: `{name}` cannot name a user (it is checked by the service \
             itself); give the claim that holds the user id, e.g. sub or user_id"
        );
        Ok(UserClaim(name.into()))
    }

    pub fn name(&self) -> &str {
        &self.0
    }

    /// The user named by a verified payload.
    pub fn user(&self, claims: &Map<String, Value>) -> Result<UserId, AuthFailure> {
        let bad = || AuthFailure::UserClaim(self.0.clone());
        let text = match claims.get(&*self.0) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => return Err(bad()),
        };
        UserId::parse(text).ok_or_else(bad)
    }
}

impl Default for UserClaim {
    fn default() -> Self {
        UserClaim("sub".into())
    }
}

/// One `claim=value` of `NOTIFYD_JWT_REQUIRE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    claim: Arc<str>,
    value: Arc<str>,
}

impl Requirement {
    pub fn claim(&self) -> &str {
        &self.claim
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    fn holds(&self, claims: &Map<String, Value>) -> bool {
        match claims.get(&*self.claim) {
            Some(Value::String(s)) => *s == *self.value,
            Some(Value::Number(n)) => n.to_string() == *self.value,
            Some(Value::Bool(b)) => (if *b { "true" } else { "false" }) == &*self.value,
            _ => false,
        }
    }
}

/// Parse `NOTIFYD_JWT_REQUIRE`: comma-separated `claim=value` pairs, spaces around
/// names and values ignored. `user_claim` may not be pinned (one user per setting would
/// be a mistake, not a policy).
pub fn parse_requirements(raw: &str, user_claim: &UserClaim) -> anyhow::Result<Vec<Requirement>> {
    let mut out: Vec<Requirement> = Vec::new();
    if raw.trim().is_empty() {
        return Ok(out);
    }
    for entry in raw.split(',') {
        let entry = entry.trim();
        let bad = |why: &str| {
            anyhow::anyhow!(
                "NOTIFYD_JWT_REQUIRE: `{entry}` {why}; the syntax is comma-separated \
                 claim=value pairs, e.g. type=access or token_type=access,env=prod"
            )
        };
        if entry.is_empty() {
            return Err(bad("is empty (two commas in a row, or a trailing comma?)"));
        }
        let (name, value) = entry.split_once('=').ok_or_else(|| bad("has no `=`"))?;
        let (name, value) = (name.trim(), value.trim());
        check_name(name).map_err(|why| bad(&format!("has a claim name that {why}")))?;
        if value.is_empty() {
            return Err(bad("has no value after `=`"));
        }
        if NOT_REQUIRABLE.contains(&name) {
            return Err(bad(
                "pins a claim the service checks by itself (exp, nbf, iat) or that has its own \
                 setting (iss: NOTIFYD_JWT_ISSUER, aud: NOTIFYD_JWT_AUDIENCE)",
            ));
        }
        if name == user_claim.name() {
            return Err(bad(
                "pins the user claim (NOTIFYD_JWT_USER_CLAIM), which would admit one user only",
            ));
        }
        if out.iter().any(|r| &*r.claim == name) {
            return Err(bad("names a claim that is already required"));
        }
        out.push(Requirement {
            claim: name.into(),
            value: value.into(),
        });
    }
    anyhow::ensure!(
        out.len() <= MAX_REQUIREMENTS,
        "NOTIFYD_JWT_REQUIRE: {} claim=value pairs, at most {MAX_REQUIREMENTS} are allowed",
        out.len()
    );
    Ok(out)
}

/// The first requirement a verified payload does not meet.
pub fn check(requirements: &[Requirement], claims: &Map<String, Value>) -> Result<(), AuthFailure> {
    match requirements.iter().find(|r| !r.holds(claims)) {
        None => Ok(()),
        Some(r) => Err(AuthFailure::ClaimMismatch {
            claim: r.claim.clone(),
            value: r.value.clone(),
        }),
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("is empty");
    }
    if name.len() > MAX_CLAIM_NAME {
        return Err("is too long");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | ',' | '"'))
    {
        return Err("holds whitespace, a control character, `=`, `,` or `\"`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn user_from_string_or_integer_only() {
        let sub = UserClaim::default();
        let user = |v: Value| {
            sub.user(&map(json!({ "sub": v })))
                .map(|u| u.as_str().to_owned())
        };
        assert_eq!(user(json!("alice")).unwrap(), "alice");
        assert_eq!(user(json!(42)).unwrap(), "42");
        assert_eq!(user(json!(-7)).unwrap(), "-7");
        assert_eq!(user(json!(u64::MAX)).unwrap(), u64::MAX.to_string());
        for bad in [
            json!(4.2),
            json!(42.0),
            json!(true),
            json!(null),
            json!(""),
            json!("a b"),
            json!([1]),
            json!({"id": 1}),
        ] {
            let e = user(bad.clone()).unwrap_err();
            assert!(
                matches!(e, AuthFailure::UserClaim(ref c) if &**c == "sub"),
                "{bad}"
            );
        }
        assert!(sub.user(&map(json!({"user_id": 1}))).is_err());

        let simplejwt = UserClaim::parse(" user_id ").unwrap();
        assert_eq!(simplejwt.name(), "user_id");
        assert_eq!(
            simplejwt
                .user(&map(json!({"user_id": 12})))
                .unwrap()
                .as_str(),
            "12"
        );
    }

    #[test]
    fn bad_user_claims_name_the_variable() {
        for bad in ["", "  ", "a b", "exp", "iss", "a,b", "x=y"] {
            let e = UserClaim::parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("NOTIFYD_JWT_USER_CLAIM"), "{bad:?}: {e}");
        }
        assert!(UserClaim::parse("https://example.com/user_id").is_ok());
    }

    #[test]
    fn requirement_syntax() {
        let sub = UserClaim::default();
        let r = parse_requirements(" type = access , version=2,admin=true", &sub).unwrap();
        assert_eq!(
            r.iter().map(|r| (r.claim(), r.value())).collect::<Vec<_>>(),
            [("type", "access"), ("version", "2"), ("admin", "true")]
        );
        assert!(parse_requirements("", &sub).unwrap().is_empty());
        assert!(parse_requirements("  ", &sub).unwrap().is_empty());
        for bad in [
            "type",
            "type=",
            "=access",
            "type=access,",
            "type=access,,env=prod",
            "type access",
            "a b=c",
            "exp=1",
            "aud=x",
            "sub=alice",
            "type=access,type=refresh",
        ] {
            let e = parse_requirements(bad, &sub).unwrap_err().to_string();
            assert!(e.starts_with("NOTIFYD_JWT_REQUIRE"), "{bad:?}: {e}");
        }
        // Another user claim frees `sub`.
        let user_id = UserClaim::parse("user_id").unwrap();
        assert!(parse_requirements("sub=x", &user_id).is_ok());
        assert!(parse_requirements("user_id=1", &user_id).is_err());
        let many = (0..17).map(|i| format!("c{i}=v")).collect::<Vec<_>>();
        assert!(parse_requirements(&many.join(","), &sub).is_err());
    }

    #[test]
    fn requirement_matching() {
        let r =
            parse_requirements("type=access,version=2,admin=true", &UserClaim::default()).unwrap();
        let ok = |v: Value| check(&r, &map(v)).is_ok();
        assert!(ok(json!({"type": "access", "version": 2, "admin": true})));
        assert!(ok(
            json!({"type": "access", "version": "2", "admin": "true"})
        ));
        assert!(!ok(json!({"type": "refresh", "version": 2, "admin": true})));
        assert!(!ok(json!({"type": "Access", "version": 2, "admin": true})));
        assert!(!ok(json!({"version": 2, "admin": true})));
        assert!(!ok(
            json!({"type": "access", "version": 2.0, "admin": true})
        ));
        assert!(!ok(json!({"type": "access", "version": 2, "admin": false})));
        assert!(!ok(
            json!({"type": ["access"], "version": 2, "admin": true})
        ));
        assert!(!ok(json!({"type": null, "version": 2, "admin": true})));
        let e = check(&r, &map(json!({"type": "refresh"}))).unwrap_err();
        assert_eq!(
            e,
            AuthFailure::ClaimMismatch {
                claim: "type".into(),
                value: "access".into()
            }
        );
    }
}
