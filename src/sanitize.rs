//! Sanitize: turn an event's body and link into values that are safe to show.
//!
//! Invariants:
//! * A [`PlainText`] holds no markup. It is ammonia's output with every tag removed
//!   (the content of `script`, `style` and the like is dropped, the text of other tags is
//!   kept), decoded back to plain characters, and cleaned again until nothing changes, so
//!   entity-encoded markup (`&lt;script&gt;`) cannot come back to life after decoding.
//!   Control characters other than newline and tab, and bidirectional overrides, are
//!   removed; runs of blank space are folded.
//! * A [`SafeLink`] is either a relative path starting with a single `/`, or an absolute
//!   `http`/`https` URL with a host, re-serialised by the `url` crate (so it is
//!   percent-encoded and normalised). `javascript:`, `data:`, protocol-relative `//host`
//!   and everything else are refused, and so is any link with whitespace, control
//!   characters, a backslash, quotes, a backtick or angle brackets, so that even a link
//!   pasted into a quoted HTML attribute cannot break out of it.
//!
//! The frontend renders both as text (`textContent`, and `href` for the link); this module
//! makes sure that even a careless renderer gets nothing executable.

use std::sync::LazyLock;

/// Most characters a body may have, counted as Unicode scalar values (the same limit as
/// the `events_body_length` constraint).
pub const MAX_BODY_CHARS: usize = 1000;
/// Most characters a link may have (the same limit as the `events_link_safe` constraint).
pub const MAX_LINK_CHARS: usize = 2048;
/// Clean-and-decode rounds before a body is declared hostile. Each round peels one layer
/// of entity encoding; real text needs one or two.
const MAX_ROUNDS: usize = 6;

/// Text with no markup in it. Only [`sanitize_body`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainText(String);

impl PlainText {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A link that is a relative path or an http(s) URL. Only [`sanitize_link`] makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeLink(String);

impl SafeLink {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Why a body or link was refused. The message is stored as the event's outcome reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("body is empty")]
    EmptyBody,
    #[error("body is longer than {MAX_BODY_CHARS} characters")]
    BodyTooLong,
    #[error("body has no text left after removing markup")]
    NothingLeft,
    #[error("body is nested entity-encoded markup")]
    NestedMarkup,
    #[error("link is longer than {MAX_LINK_CHARS} characters")]
    LinkTooLong,
    #[error("link must be a relative path starting with '/' or an http(s) URL")]
    LinkNotAllowed,
}

static STRIP_ALL: LazyLock<ammonia::Builder<'static>> = LazyLock::new(ammonia::Builder::empty);

/// Sanitize a body to plain text.
pub fn sanitize_body(raw: &str) -> Result<PlainText, Rejected> {
    if raw.trim().is_empty() {
        return Err(Rejected::EmptyBody);
    }
    if raw.chars().count() > MAX_BODY_CHARS {
        return Err(Rejected::BodyTooLong);
    }
    let mut text = strip_controls(raw);
    // Without `<` or `&` there is no tag and no entity: ammonia would return the text as
    // it is (its serialiser escapes only `&`, `<`, `>` and U+00A0, which the decode undoes),
    // so the common plain body skips the HTML parser (most of the worker's CPU per event).
    let mut settled = !text.contains(['<', '&']);
    for _ in 0..if settled { 0 } else { MAX_ROUNDS } {
        let next = decode_ammonia_entities(&STRIP_ALL.clean(&text).to_string());
        if next == text {
            settled = true;
            break;
        }
        text = next;
    }
    if !settled {
        return Err(Rejected::NestedMarkup);
    }
    let text = fold_blank_space(&strip_controls(&text));
    if text.is_empty() {
        return Err(Rejected::NothingLeft);
    }
    Ok(PlainText(text))
}

/// Check and normalise a link.
pub fn sanitize_link(raw: &str) -> Result<SafeLink, Rejected> {
    if raw.chars().count() > MAX_LINK_CHARS {
        return Err(Rejected::LinkTooLong);
    }
    let forbidden = |c: char| {
        c.is_control() || c.is_whitespace() || matches!(c, '\\' | '\'' | '"' | '`' | '<' | '>')
    };
    if raw.is_empty() || raw.chars().any(forbidden) {
        return Err(Rejected::LinkNotAllowed);
    }
    if raw.starts_with('/') {
        if raw.starts_with("//") {
            return Err(Rejected::LinkNotAllowed);
        }
        // Resolve against a throwaway origin so the url crate normalises and percent-encodes
        // the path, query and fragment, then keep only the part after the origin.
        let base = url::Url::parse("http://relative.invalid").expect("static base URL parses");
        let joined = base.join(raw).map_err(|_| Rejected::LinkNotAllowed)?;
        if joined.host_str() != Some("relative.invalid") {
            return Err(Rejected::LinkNotAllowed);
        }
        let mut out = joined.path().to_owned();
        if let Some(q) = joined.query() {
            out.push('?');
            out.push_str(q);
        }
        if let Some(f) = joined.fragment() {
            out.push('#');
            out.push_str(f);
        }
        return Ok(SafeLink(out));
    }
    let url = url::Url::parse(raw).map_err(|_| Rejected::LinkNotAllowed)?;
    let allowed = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none();
    if !allowed {
        return Err(Rejected::LinkNotAllowed);
    }
    Ok(SafeLink(url.into()))
}

/// ammonia serialises text with only these entities; undo them to get plain characters.
/// `&amp;` goes last so that `&amp;lt;` becomes `&lt;` (one layer), not `<`.
fn decode_ammonia_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

fn is_unwanted(c: char) -> bool {
    let bidi =
        matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
    bidi || (c.is_control() && c != '\n' && c != '\t')
}

fn strip_controls(s: &str) -> String {
    s.chars().filter(|&c| !is_unwanted(c)).collect()
}

/// Trim, fold runs of spaces and tabs to one space, and keep at most one blank line.
fn fold_blank_space(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    let mut newlines = 0;
    for c in s.trim().chars() {
        if c == '\n' || c == '\r' {
            newlines += usize::from(c == '\n');
            pending_space = false;
            continue;
        }
        if c.is_whitespace() {
            pending_space = true;
            continue;
        }
        if newlines > 0 {
            out.push_str(if newlines > 1 { "\n\n" } else { "\n" });
            newlines = 0;
        } else if pending_space && !out.is_empty() {
            out.push(' ');
        }
        pending_space = false;
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_text_shortcut_gives_what_ammonia_gives() {
        for body in [
            "Hello, world",
            "a > b and \"quoted\" 'single'",
            "non\u{a0}breaking and   spaces\tand tabs",
            "line one\n\n\n\nline two\r\nthree\rfour",
            "emoji 🎉 and ünïcödé, 中文, עברית",
            "  leading and trailing  ",
            "=> -> >> ; \\ / * ` ~ ^ % $ # @ ! ? ( ) [ ] { } | +",
            "zero\u{0}width\u{200b}and bidi\u{202e}override",
        ] {
            let text = strip_controls(body);
            let full = decode_ammonia_entities(&STRIP_ALL.clean(&text).to_string());
            assert_eq!(full, text, "ammonia changed {body:?}");
            assert_eq!(
                sanitize_body(body).unwrap().as_str(),
                fold_blank_space(&strip_controls(&full)),
                "{body:?}"
            );
        }
    }

    #[test]
    fn keeps_readable_text() {
        let t = sanitize_body("You have a new message from <b>Alice</b> & Bob").unwrap();
        assert_eq!(t.as_str(), "You have a new message from Alice & Bob");
        let t = sanitize_body("2 < 3 and 5 > 4").unwrap();
        assert_eq!(t.as_str(), "2 < 3 and 5 > 4");
        let t = sanitize_body("caf&eacute; d&#233;j&agrave;").unwrap();
        assert_eq!(t.as_str(), "café déjà");
    }

    #[test]
    fn encoded_markup_does_not_come_back() {
        for raw in [
            "&lt;script&gt;alert(1)&lt;/script&gt;hi",
            "&amp;lt;img src=x onerror=alert(1)&amp;gt;hi",
            "&amp;amp;lt;b&amp;amp;gt;hi",
        ] {
            let t = sanitize_body(raw).unwrap();
            assert!(!t.as_str().contains('<'), "{raw:?} -> {t:?}");
            assert!(t.as_str().ends_with("hi"), "{raw:?} -> {t:?}");
        }
    }

    #[test]
    fn refuses_bodies_with_nothing_left() {
        assert_eq!(
            sanitize_body("<script>alert(1)</script>"),
            Err(Rejected::NothingLeft)
        );
        assert_eq!(sanitize_body("   "), Err(Rejected::EmptyBody));
        assert_eq!(sanitize_body(&"x".repeat(1001)), Err(Rejected::BodyTooLong));
        assert!(sanitize_body(&"é".repeat(1000)).is_ok());
    }

    #[test]
    fn removes_controls_and_bidi_overrides() {
        let t = sanitize_body("a\u{202e}b\u{7}c\r\n\r\n\r\nd\t\te").unwrap();
        assert_eq!(t.as_str(), "abc\n\nd e");
    }

    #[test]
    fn links() {
        assert_eq!(
            sanitize_link("/inbox/7?x=1#m").unwrap().as_str(),
            "/inbox/7?x=1#m"
        );
        assert_eq!(sanitize_link("/a b").unwrap_err(), Rejected::LinkNotAllowed);
        assert_eq!(sanitize_link("/caf\u{e9}").unwrap().as_str(), "/caf%C3%A9");
        assert_eq!(
            sanitize_link("HTTPS://Example.com/x").unwrap().as_str(),
            "https://example.com/x"
        );
        for bad in [
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            "data:text/html,<script>",
            "//evil.example/x",
            "/\\evil.example",
            "ftp://example.com",
            "https://user:pw@example.com/",
            "relative/path",
            "http://",
            "/inbox'onmouseover='alert(1)",
            "/a\"b",
            "https://example.com/`x`",
            "https://example.com:99999/",
            "",
        ] {
            assert!(sanitize_link(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
