//! XSS through the real pipeline: a corpus of hostile bodies is enqueued by SQL and
//! processed; every stored body must be inert even for a renderer that (wrongly) uses
//! `innerHTML`, readable text must survive, and bodies with no text left must end
//! `invalid` with a reason. Hostile links never get in at all: the constraint refuses them.

mod common;

use common::{TestDb, process};
use notifyd::pipeline::Outcome;

/// What a vector must become.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Stored, and the body equals this text exactly.
    Text(&'static str),
    /// Stored, and the body contains this readable text.
    Contains(&'static str),
    /// Nothing readable left: `invalid`, with a reason.
    Invalid,
}

use Expect::{Contains, Invalid, Text};

/// (vector, expectation). Sources: the OWASP XSS filter evasion cheat sheet, PortSwigger's
/// XSS cheat sheet, and the html5sec.org mutation-XSS vectors, adapted to a text field.
const CORPUS: &[(&str, Expect)] = &[
    // Script tags, plain and disguised.
    ("<script>alert(1)</script>", Invalid),
    ("Hi <script>alert(1)</script>there", Text("Hi there")),
    ("<ScRiPt>alert(1)</sCrIpT>Hello", Text("Hello")),
    (
        "<SCRIPT SRC=//evil.example/x.js></SCRIPT>Hello",
        Text("Hello"),
    ),
    ("<script\n>alert(1)</script\n>Hello", Text("Hello")),
    ("<script/xss src=x>alert(1)</script>ok", Text("ok")),
    // The stray "<" and the "ok" after the script meet once the script is gone: "<ok" is a
    // tag, so nothing readable is left.
    ("<<script>alert(1);//<</script>ok", Invalid),
    ("<<script>alert(1);//<</script> ok", Text("< ok")),
    (
        "<scr<script>ipt>alert(1)</scr</script>ipt>ok",
        Contains("ok"),
    ),
    // Event handlers.
    ("<img src=x onerror=alert(1)>Photo", Text("Photo")),
    ("<img src=x onerror=alert(1)//", Invalid),
    ("Look: <img src=x onerror=alert(1)//", Text("Look:")),
    ("<body onload=alert(1)>Welcome", Text("Welcome")),
    (
        "<div onmouseover=\"alert(1)\">hover me</div>",
        Text("hover me"),
    ),
    ("<input autofocus onfocus=alert(1)>Form", Text("Form")),
    (
        "<details open ontoggle=alert(1)>Details</details>",
        Text("Details"),
    ),
    (
        "<video><source onerror=alert(1)></video>Video",
        Text("Video"),
    ),
    (
        "<marquee onstart=alert(1)>Scrolling</marquee>",
        Text("Scrolling"),
    ),
    (
        "<img \"\"\"><script>alert(1)</script>\">tail",
        Contains("tail"),
    ),
    // javascript: in href / src / action / formaction.
    (
        "<a href=\"javascript:alert(1)\">Click here</a>",
        Text("Click here"),
    ),
    ("<a href=\"JaVaScRiPt:alert(1)\">Click</a>", Text("Click")),
    ("<a href=\"jav&#x09;ascript:alert(1)\">Tab</a>", Text("Tab")),
    (
        "<a href=\"&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)\">Ent</a>",
        Text("Ent"),
    ),
    (
        "<iframe src=\"javascript:alert(1)\"></iframe>Frame",
        Text("Frame"),
    ),
    (
        "<form action=\"javascript:alert(1)\"><button>Submit</button></form>",
        Text("Submit"),
    ),
    (
        "<button formaction=javascript:alert(1)>Go</button>",
        Text("Go"),
    ),
    // SVG and MathML (namespace confusion, mutation XSS).
    ("<svg onload=alert(1)>Vector", Text("Vector")),
    ("<svg><script>alert(1)</script></svg>Pic", Contains("Pic")),
    // Elements in the SVG and MathML namespaces go with their content.
    (
        "<svg><animate onbegin=alert(1) attributeName=x dur=1s>Anim",
        Invalid,
    ),
    (
        "<svg><a xlink:href=\"javascript:alert(1)\"><text x=20 y=20>XSS</text></a></svg>",
        Invalid,
    ),
    (
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>Math",
        Invalid,
    ),
    (
        "Before <math><mi xlink:href=\"javascript:alert(1)\">x</mi></math> after",
        Text("Before after"),
    ),
    (
        "<svg></p><style><a id=\"</style><img src=1 onerror=alert(1)>\">Mut",
        Contains("Mut"),
    ),
    (
        "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\">Nos",
        Contains("Nos"),
    ),
    // iframe srcdoc, object, embed, meta, base, link.
    (
        "<iframe srcdoc=\"<script>alert(1)</script>\"></iframe>Doc",
        Text("Doc"),
    ),
    (
        "<object data=\"data:text/html,<script>alert(1)</script>\"></object>Obj",
        Text("Obj"),
    ),
    (
        "<embed src=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">Emb",
        Text("Emb"),
    ),
    (
        "<meta http-equiv=\"refresh\" content=\"0;url=javascript:alert(1)\">Meta",
        Text("Meta"),
    ),
    ("<base href=\"javascript:alert(1)//\">Base", Text("Base")),
    (
        "<link rel=import href=\"data:text/html,<script>alert(1)</script>\">Link",
        Text("Link"),
    ),
    // <style> and CSS.
    (
        "<style>@import 'javascript:alert(1)';</style>Styled",
        Text("Styled"),
    ),
    (
        "<div style=\"background:url(javascript:alert(1))\">Css</div>",
        Text("Css"),
    ),
    (
        "<div style=\"width: expression(alert(1))\">Expr</div>",
        Text("Expr"),
    ),
    // Entity-encoded and double-encoded markup.
    ("&lt;script&gt;alert(1)&lt;/script&gt;", Invalid),
    ("&lt;script&gt;alert(1)&lt;/script&gt;News", Text("News")),
    ("&#60;script&#62;alert(1)&#60;/script&#62;Dec", Text("Dec")),
    ("&#x3C;img src=x onerror=alert(1)&#x3E;Hex", Text("Hex")),
    (
        "&#x3c;svg onload=alert(1)&#x3e;hex lower",
        Text("hex lower"),
    ),
    (
        "&#0000060;script&#0000062;alert(1)&#0000060;/script&#0000062;Pad",
        Text("Pad"),
    ),
    ("&#60script&#62alert(1)&#60/script&#62Semi", Text("Semi")),
    (
        "&amp;lt;script&amp;gt;alert(1)&amp;lt;/script&amp;gt;Double",
        Text("Double"),
    ),
    (
        "&amp;amp;lt;img src=x onerror=alert(1)&amp;amp;gt;Triple",
        Text("Triple"),
    ),
    (
        "&amp;amp;amp;amp;amp;amp;amp;lt;script&amp;amp;amp;amp;amp;amp;amp;gt;",
        Invalid,
    ),
    (
        "%3Cscript%3Ealert(1)%3C/script%3E",
        Text("%3Cscript%3Ealert(1)%3C/script%3E"),
    ),
    // Comments, CDATA, processing instructions, doctype.
    ("<!-- <script>alert(1)</script> -->Comment", Text("Comment")),
    ("<!--><script>alert(1)</script>-->After", Contains("After")),
    (
        "<![CDATA[<script>alert(1)</script>]]>Cdata",
        Contains("Cdata"),
    ),
    (
        "<?xml version=\"1.0\"?><script>alert(1)</script>Pi",
        Text("Pi"),
    ),
    (
        "<!DOCTYPE html><html><body>Doc type</body></html>",
        Text("Doc type"),
    ),
    ("<!x onclick=alert(1)>Bang", Text("Bang")),
    ("</script><script>alert(1)</script>Close", Text("Close")),
    (
        "<title><script>alert(1)</script></title>Title",
        Contains("Title"),
    ),
    (
        "<textarea><script>alert(1)</script></textarea>Area",
        Contains("Area"),
    ),
    ("<xmp><script>alert(1)</script></xmp>Xmp", Contains("Xmp")),
    ("<plaintext><script>alert(1)</script>", Invalid),
    // Broken, unclosed and malformed tags.
    ("<img src=\"x\" onerror=\"alert(1)\"", Invalid),
    ("<a href='javascript:alert(1)'>unclosed", Text("unclosed")),
    (
        "<b>bold <i>italic</b> mixed</i> text",
        Text("bold italic mixed text"),
    ),
    ("< script>alert(1)</script>Space", Contains("Space")),
    ("<scr\u{1}ipt>alert(1)</scr\u{1}ipt>Ctrl", Contains("Ctrl")),
    ("<scr&#0;ipt>alert(1)</scr&#0;ipt>Nul", Contains("Nul")),
    ("<img/src=x/onerror=alert(1)>Slash", Text("Slash")),
    ("<img src=`x` onerror=alert(1)>Tick", Text("Tick")),
    ("<a\u{c}href=javascript:alert(1)>Feed</a>", Text("Feed")),
    // Unicode tricks (not markup, but must not turn into it).
    (
        "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e",
        Text("\\u003cscript\\u003ealert(1)\\u003c/script\\u003e"),
    ),
    (
        "\u{ff1c}script\u{ff1e}alert(1)\u{ff1c}/script\u{ff1e}",
        Text("\u{ff1c}script\u{ff1e}alert(1)\u{ff1c}/script\u{ff1e}"),
    ),
    (
        "<\u{17f}cript>alert(1)</\u{17f}cript>Long s",
        Contains("Long s"),
    ),
    ("abc\u{202e}<b>gpj.exe</b>", Text("abcgpj.exe")),
    // Readable text around markup survives.
    ("Hello <b>World</b>", Text("Hello World")),
    (
        "You have a new message from <b>Alice</b> & Bob",
        Text("You have a new message from Alice & Bob"),
    ),
    ("2 < 3 and 5 > 4", Text("2 < 3 and 5 > 4")),
    ("caf&eacute; d&#233;j&agrave; vu", Text("café déjà vu")),
    ("Line one<br>Line two<p>Para</p>", Contains("Line one")),
    ("javascript:alert(1)", Text("javascript:alert(1)")),
];

/// True when an HTML tokenizer in the data state (what `innerHTML` uses) would leave the
/// text state somewhere in `s`: a `<` followed by an ASCII letter (start tag), `/` (end
/// tag), `!` (comment, doctype, CDATA) or `?` (processing instruction). Character
/// references in the data state only ever produce text, so without these `s` is inert.
fn markup_at(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len().saturating_sub(1)).find(|&i| {
        b[i] == b'<' && (b[i + 1].is_ascii_alphabetic() || matches!(b[i + 1], b'/' | b'!' | b'?'))
    })
}

/// `javascript:` or an `on...=` handler inside something that looks like a tag (between a
/// `<` and the next `>`). With `markup_at` empty this cannot happen, but it is checked
/// separately so a failure says what leaked.
fn dangerous_in_tag(s: &str) -> Option<String> {
    let lower = s.to_ascii_lowercase();
    let mut rest = lower.as_str();
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let tag = &after[..after.find('>').unwrap_or(after.len())];
        let squeezed: String = tag.chars().filter(|c| !c.is_whitespace()).collect();
        if squeezed.contains("javascript:") {
            return Some(format!("javascript: in <{tag}>"));
        }
        let handler = squeezed.match_indices("on").any(|(i, _)| {
            let name: String = squeezed[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            !name.is_empty() && squeezed[i + 2 + name.len()..].starts_with('=')
        });
        if handler {
            return Some(format!("event handler in <{tag}>"));
        }
        rest = after;
    }
    None
}

#[test]
fn the_checks_themselves_catch_markup() {
    for bad in [
        "<script>",
        "x<img src=x>",
        "</a>",
        "<!-- c -->",
        "<?php",
        "a <b>",
        "<svg/onload=alert(1)>",
    ] {
        assert!(markup_at(bad).is_some(), "{bad:?}");
    }
    for ok in [
        "2 < 3",
        "a <3 b",
        "<",
        "x <",
        "< script>",
        "＜script＞",
        "<ſcript>",
    ] {
        assert!(markup_at(ok).is_none(), "{ok:?}");
    }
    assert!(dangerous_in_tag("< a href=javascript:x>").is_some());
    assert!(dangerous_in_tag("< img onerror = alert(1)>").is_some());
    assert!(dangerous_in_tag("< b>on top = fine").is_none());
    assert!(dangerous_in_tag("javascript:alert(1)").is_none());
}

#[tokio::test]
async fn hostile_bodies_are_stored_inert_or_refused() {
    assert!(CORPUS.len() >= 40, "the corpus shrank to {}", CORPUS.len());
    let db = TestDb::new().await;
    // One user per vector, so the rate limit plays no part.
    let mut ids = Vec::new();
    for (i, (body, _)) in CORPUS.iter().enumerate() {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO notify.events (user_id, event_type, body) VALUES ($1, 'new_message', $2)
             RETURNING id",
        )
        .bind(format!("xss-{i}"))
        .bind(body)
        .fetch_one(&db.pool)
        .await
        .unwrap_or_else(|e| panic!("vector {i} {body:?} refused at INSERT: {e}"));
        ids.push(id);
    }
    let outcomes = process(&db.pipeline(), &ids).await;

    let mut failures = Vec::new();
    for (i, (((raw, expect), id), outcome)) in CORPUS.iter().zip(&ids).zip(&outcomes).enumerate() {
        let stored: Option<String> =
            sqlx::query_scalar("SELECT body FROM notify.notifications WHERE event_id = $1")
                .bind(id)
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        let (recorded, reason): (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT outcome, outcome_reason FROM notify.event_outcomes WHERE event_id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        let mut fail = |what: String| failures.push(format!("#{i} {raw:?}: {what}"));

        if let Some(body) = &stored {
            if let Some(at) = markup_at(body) {
                fail(format!("stored body has markup at byte {at}: {body:?}"));
            }
            if let Some(what) = dangerous_in_tag(body) {
                fail(format!("{what}: {body:?}"));
            }
            if body
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                fail(format!("control characters left: {body:?}"));
            }
        }
        match (expect, outcome, &stored) {
            (Text(want), Outcome::Stored { .. }, Some(body)) => {
                if body != want {
                    fail(format!("expected {want:?}, stored {body:?}"));
                }
            }
            (Contains(want), Outcome::Stored { .. }, Some(body)) => {
                if !body.contains(want) {
                    fail(format!("readable text {want:?} lost: {body:?}"));
                }
            }
            (Invalid, Outcome::Invalid { reason: r }, None) => {
                if r.is_empty() {
                    fail("invalid without a reason".into());
                }
                if recorded.as_deref() != Some("invalid") || reason.as_deref() != Some(r.as_str()) {
                    fail(format!("events row says {recorded:?} / {reason:?}"));
                }
            }
            (expect, outcome, stored) => fail(format!(
                "expected {expect:?}, got {outcome:?} with {stored:?}"
            )),
        }
        if matches!(outcome, Outcome::Stored { .. }) && recorded.as_deref() != Some("stored") {
            fail(format!("events row says {recorded:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors failed:\n{}",
        failures.len(),
        CORPUS.len(),
        failures.join("\n")
    );
}

/// Every vector that comes out `invalid` says why, in words an operator can act on.
#[tokio::test]
async fn bodies_with_no_text_left_are_invalid_with_a_reason() {
    let db = TestDb::new().await;
    let cases = [
        ("<script>alert(1)</script>", "no text left"),
        ("<img src=x onerror=alert(1)>", "no text left"),
        ("<style>body{}</style><!-- x -->", "no text left"),
        ("&lt;script&gt;alert(1)&lt;/script&gt;", "no text left"),
        (
            "&amp;amp;amp;amp;amp;amp;amp;lt;script&amp;amp;amp;amp;amp;amp;amp;gt;",
            "nested",
        ),
    ];
    let mut ids = Vec::new();
    for (body, _) in cases {
        ids.push(db.enqueue("42", "new_message", body).await);
    }
    let out = process(&db.pipeline(), &ids).await;
    for ((body, want), o) in cases.iter().zip(&out) {
        match o {
            Outcome::Invalid { reason } => assert!(reason.contains(want), "{body:?}: {reason}"),
            other => panic!("{body:?}: {other:?}"),
        }
    }
    assert_eq!(
        db.count("SELECT count(*) FROM notify.notifications").await,
        0
    );
    let reasons = db
        .count(
            "SELECT count(*) FROM notify.events
             WHERE outcome = 'invalid' AND outcome_reason <> ''",
        )
        .await;
    assert_eq!(reasons, cases.len() as i64);
}

/// Hostile links never reach the worker: the `events_link_safe` constraint refuses them at
/// INSERT, whatever the body.
#[tokio::test]
async fn hostile_links_are_refused_at_insert() {
    let db = TestDb::new().await;
    let links = [
        "javascript:alert(1)",
        "JaVaScRiPt:alert(1)",
        "javascript&colon;alert(1)",
        "&#106;avascript:alert(1)",
        "jav\tascript:alert(1)",
        "jav\u{0}ascript:alert(1)",
        " javascript:alert(1)",
        "\u{b}javascript:alert(1)",
        "javascript://example.com/%0Aalert(1)",
        "vbscript:msgbox(1)",
        "livescript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
        "data:image/svg+xml,<svg onload=alert(1)>",
        "blob:https://example.com/uuid",
        "//evil.example/",
        "/\\evil.example/",
        "\\/evil.example/",
        // The URL parser strips tabs and newlines: these would become "//evil.example".
        "/\t/evil.example",
        "/\n/evil.example",
        "\t//evil.example",
        "https://evil.example\\@example.com/",
        "https://example.com@evil.example/",
        "http://evil.example:80@example.com/",
        "https:\\\\evil.example",
        "/inbox\" onmouseover=\"alert(1)",
        "/inbox' onmouseover='alert(1)",
        "\u{feff}javascript:alert(1)",
        "\u{2028}javascript:alert(1)",
    ];
    let mut refused = 0;
    for link in links {
        let r = sqlx::query(
            "INSERT INTO notify.events (user_id, event_type, body, link)
             VALUES ('42', 'new_message', 'hi', $1)",
        )
        .bind(link)
        .execute(&db.pool)
        .await;
        match r {
            Err(e) => {
                let db_err = e.as_database_error().expect("a database error");
                // NUL cannot even be sent as text (22021); the rest meet the constraint.
                if link.contains('\0') {
                    assert_eq!(db_err.code().as_deref(), Some("22021"), "{link:?}");
                } else {
                    assert_eq!(
                        db_err.constraint(),
                        Some("events_link_safe"),
                        "{link:?}: {}",
                        db_err.message()
                    );
                }
                refused += 1;
            }
            Ok(_) => panic!("hostile link {link:?} was accepted at INSERT"),
        }
    }
    assert_eq!(refused, links.len());
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 0);
}

/// Links that are well-formed paths or http(s) URLs but carry characters that matter in
/// HTML (quotes, angle brackets, backticks). Even a careless renderer that pastes a link
/// into a quoted attribute must not be broken out of, so both the constraint and the
/// worker's link check refuse them.
#[tokio::test]
async fn links_with_html_characters_are_refused() {
    let db = TestDb::new().await;
    let links = [
        "/inbox'><script>alert(1)</script>",
        "/inbox\"><script>alert(1)</script>",
        "/inbox'onmouseover='alert(1)",
        "/inbox\"onmouseover=\"alert(1)",
        "/a?x='y'&z=\"w\"",
        "/a#'onclick='alert(1)",
        "/a#\"><svg/onload=alert(1)>",
        "https://example.com/'onmouseover='alert(1)",
        "https://example.com/`alert(1)`",
        "https://example.com/?q=<script>alert(1)</script>",
    ];
    for link in links {
        let refused = sqlx::query(
            "INSERT INTO notify.events (user_id, event_type, body, link)
             VALUES ('42', 'new_message', 'hi', $1)",
        )
        .bind(link)
        .execute(&db.pool)
        .await
        .expect_err(link);
        let constraint = refused
            .as_database_error()
            .and_then(|e| e.constraint())
            .map(str::to_owned);
        assert_eq!(constraint.as_deref(), Some("events_link_safe"), "{link:?}");
        assert!(
            notifyd::sanitize::sanitize_link(link).is_err(),
            "the worker's link check accepted {link:?}"
        );
    }
    assert_eq!(db.count("SELECT count(*) FROM notify.events").await, 0);
}
