//! Real-time delivery over real HTTP against a real Postgres: the SSE stream (delivery,
//! resume without gaps or repeats, heartbeats, caps, authentication, the query token and
//! the logs, shutdown, a lost LISTEN connection) and long-polls.
//!
//! No guessed sleeps: every wait is a bounded wait on a condition (a frame, a response,
//! a counter).

mod common;
mod serve_support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::TestDb;
use serve_support::{SECRET, Server, add, add_on, args, eventually, hs256, ids, now_secs, token};

const LIST: &str = "/api/notifications";
const STREAM: &str = "/api/notifications/stream";
/// Longest wait for one frame of a stream.
const FRAME_WAIT: Duration = Duration::from_secs(10);

/// Test settings with a one-second heartbeat, so that "nothing else came" is observable:
/// a heartbeat is only sent after a second of silence.
fn stream_args() -> notifyd::serve::ServeArgs {
    let mut a = args();
    a.stream.stream_heartbeat_secs = 1;
    a
}

async fn start() -> Server {
    Server::start_with(TestDb::new().await, stream_args()).await
}

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Retry(u64),
    Comment(String),
    Event { id: i64, event: String, data: Value },
}

/// A minimal SSE client over reqwest's body chunks.
struct Sse {
    response: reqwest::Response,
    buffer: String,
}

impl Sse {
    fn new(response: reqwest::Response) -> Self {
        Sse {
            response,
            buffer: String::new(),
        }
    }

    /// The next frame, or `None` when the server ended the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let raw: String = self.buffer.drain(..end + 2).collect();
                return Some(parse(&raw));
            }
            let chunk = tokio::time::timeout(FRAME_WAIT, self.response.chunk())
                .await
                .expect("a frame within the bound")
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => {
                    assert!(self.buffer.is_empty(), "a partial frame: {:?}", self.buffer);
                    return None;
                }
            }
        }
    }

    /// The next notification event, skipping the retry hint and heartbeats.
    async fn event(&mut self) -> (i64, Value) {
        loop {
            match self.frame().await.expect("the stream is open") {
                Frame::Event { id, event, data } => {
                    assert_eq!(event, "notification");
                    assert_eq!(data["id"], id, "the id field matches the data");
                    return (id, data);
                }
                Frame::Retry(_) | Frame::Comment(_) => {}
            }
        }
    }

    async fn events(&mut self, n: usize) -> Vec<i64> {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(self.event().await.0);
        }
        got
    }

    /// Nothing but heartbeats follows: the next frame (after a second of silence) is one.
    async fn quiet(&mut self) {
        loop {
            match self.frame().await.expect("the stream is open") {
                Frame::Comment(c) => {
                    assert_eq!(c, "heartbeat");
                    return;
                }
                Frame::Retry(_) => {}
                other => panic!("expected only a heartbeat, got {other:?}"),
            }
        }
    }
}

fn parse(raw: &str) -> Frame {
    let mut id = None;
    let mut event = None;
    let mut data = None;
    for line in raw.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix(':') {
            return Frame::Comment(comment.trim().to_owned());
        }
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "retry" => return Frame::Retry(value.parse().unwrap()),
            "id" => id = Some(value.parse().unwrap()),
            "event" => event = Some(value.to_owned()),
            "data" => {
                assert!(data.is_none(), "one data line per event: {raw:?}");
                data = Some(serde_json::from_str(value).unwrap());
            }
            other => panic!("unexpected field {other:?} in {raw:?}"),
        }
    }
    Frame::Event {
        id: id.expect("an id"),
        event: event.expect("an event name"),
        data: data.expect("data"),
    }
}

/// Open a stream and expect 200 with the SSE headers and the retry hint.
async fn open(s: &Server, path: &str, token: Option<&str>, last_event_id: Option<&str>) -> Sse {
    let r = request(s, path, token, last_event_id).await;
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let mut sse = Sse::new(r);
    assert_eq!(
        sse.frame().await,
        Some(Frame::Retry(3000)),
        "retry hint first"
    );
    sse
}

async fn request(
    s: &Server,
    path: &str,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut req = s.http.get(s.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    req.send().await.unwrap()
}

/// Expect `status` and a JSON error; return its code.
async fn refused(r: reqwest::Response, status: u16) -> (String, reqwest::header::HeaderMap) {
    assert_eq!(r.status().as_u16(), status);
    assert_eq!(r.headers()["content-type"], "application/json");
    let headers = r.headers().clone();
    let body: Value = r.json().await.unwrap();
    (body["error"]["code"].as_str().unwrap().to_owned(), headers)
}

#[tokio::test]
async fn sse_delivers_notifications_inserted_after_connect() {
    let s = start().await;
    let old = add(&s.db, "alice", 3).await;
    let t = token("alice");
    // No cursor: only what comes after the user's newest notification.
    let mut sse = open(&s, STREAM, Some(&t), None).await;
    let new = add(&s.db, "alice", 2).await;
    add(&s.db, "bob", 2).await;
    let more = add(&s.db, "alice", 1).await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(sse.event().await);
    }
    let got_ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        got_ids,
        [new.clone(), more].concat(),
        "Bob's never, old ones never"
    );
    assert!(got_ids.iter().all(|id| !old.contains(id)));
    // Each event's data is exactly the list endpoint's item.
    let page = s.page(&format!("{LIST}?after={}", old[2]), &t).await;
    for (i, (_, data)) in got.iter().enumerate() {
        assert_eq!(data, &page["notifications"][i]);
    }
    sse.quiet().await;
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_ones() {
    let s = start().await;
    let t = token("alice");
    let all = add(&s.db, "alice", 6).await;

    // Last-Event-ID, as a reconnecting EventSource sends it.
    let mut sse = open(&s, STREAM, Some(&t), Some(&all[1].to_string())).await;
    assert_eq!(sse.events(4).await, all[2..]);
    let later = add(&s.db, "alice", 2).await;
    assert_eq!(sse.events(2).await, later);
    sse.quiet().await;
    drop(sse);

    // ?after=, as a first connect with a cursor sends it.
    let mut sse = open(&s, &format!("{STREAM}?after={}", all[3]), Some(&t), None).await;
    assert_eq!(sse.events(4).await, [&all[4..], &later[..]].concat());
    sse.quiet().await;
    drop(sse);

    // Both: Last-Event-ID wins (the browser keeps the first URL, and sends the header).
    let mut sse = open(
        &s,
        &format!("{STREAM}?after={}", all[0]),
        Some(&t),
        Some(&later[0].to_string()),
    )
    .await;
    assert_eq!(sse.events(1).await, [later[1]]);
    sse.quiet().await;
    drop(sse);

    // A backlog longer than a page comes in order, page after page, while new ones
    // arrive; then it continues live.
    let backlog = add(&s.db, "carol", 450).await;
    let tc = token("carol");
    let mut sse = open(&s, &format!("{STREAM}?after=0"), Some(&tc), None).await;
    let racing = add(&s.db, "carol", 3).await;
    let got = sse.events(453).await;
    assert_eq!(got, [backlog, racing].concat(), "no gap, no repeat");
    sse.quiet().await;
}

#[tokio::test]
async fn bad_cursors_are_refused_before_the_stream_starts() {
    let s = start().await;
    let t = token("alice");
    let all = add(&s.db, "alice", 4).await;
    sqlx::query("DELETE FROM notify.notifications WHERE user_id = 'alice' AND id <= $1")
        .bind(all[2])
        .execute(&s.db.pool)
        .await
        .unwrap();
    // The cache hears of the DELETE within milliseconds.
    eventually(Duration::from_secs(10), || async {
        let r = request(&s, &format!("{STREAM}?after={}", all[0]), Some(&t), None).await;
        (r.status() == 410).then_some(())
    })
    .await;
    let r = request(&s, STREAM, Some(&t), Some(&all[1].to_string())).await;
    assert_eq!(refused(r, 410).await.0, "cursor_expired");
    let r = request(
        &s,
        &format!("{STREAM}?after={}", all[3] + 100),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(refused(r, 400).await.0, "invalid_cursor");
    for bad in ["abc", "-1", "1 2"] {
        let r = request(&s, STREAM, Some(&t), Some(bad)).await;
        assert_eq!(refused(r, 400).await.0, "invalid_parameter", "{bad}");
    }
    for q in ["after=x", "limit=5", "after=1&after=2"] {
        let r = request(&s, &format!("{STREAM}?{q}"), Some(&t), None).await;
        assert_eq!(r.status(), 400, "{q}");
    }
    // A cursor at the horizon missed nothing.
    let mut sse = open(&s, STREAM, Some(&t), Some(&all[2].to_string())).await;
    assert_eq!(sse.events(1).await, [all[3]]);
}

#[tokio::test]
async fn heartbeats_keep_an_idle_stream_alive() {
    // A request timeout shorter than the stream's life: it does not cut the stream.
    let mut a = stream_args();
    a.request_timeout_secs = 1;
    let s = Server::start_with(TestDb::new().await, a).await;
    let mut sse = open(&s, STREAM, Some(&token("alice")), None).await;
    let started = Instant::now();
    for _ in 0..2 {
        assert_eq!(sse.frame().await, Some(Frame::Comment("heartbeat".into())));
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let id = add(&s.db, "alice", 1).await;
    assert_eq!(
        sse.events(1).await,
        id,
        "still delivering past the request timeout"
    );
    // An idle stream costs no database work.
    let queries = s.state.metrics().queries();
    sse.quiet().await;
    assert_eq!(s.state.metrics().queries(), queries);
}

#[tokio::test]
async fn stream_caps_answer_429_per_user_and_503_per_process() {
    let mut a = stream_args();
    a.stream.max_streams_per_user = 2;
    a.stream.max_streams = 3;
    let s = Server::start_with(TestDb::new().await, a).await;
    let (alice, bob, carol) = (token("alice"), token("bob"), token("carol"));
    let a1 = open(&s, STREAM, Some(&alice), None).await;
    let _a2 = open(&s, STREAM, Some(&alice), None).await;
    let (code, headers) = refused(request(&s, STREAM, Some(&alice), None).await, 429).await;
    assert_eq!(code, "too_many_streams");
    assert_eq!(headers["retry-after"], "5");

    // Bob is not affected by Alice's cap, and gets his notifications.
    let mut b1 = open(&s, STREAM, Some(&bob), None).await;
    let id = add(&s.db, "bob", 1).await;
    assert_eq!(b1.events(1).await, id);

    // The process is full now.
    let (code, headers) = refused(request(&s, STREAM, Some(&carol), None).await, 503).await;
    assert_eq!(code, "streams_full");
    assert_eq!(headers["retry-after"], "5");
    // Polling still works meanwhile.
    s.page(LIST, &carol).await;

    // A closed stream gives its slot back (the server notices at the next heartbeat).
    drop(a1);
    eventually(Duration::from_secs(10), || async {
        (s.state.hub().streams() == 2).then_some(())
    })
    .await;
    let _a3 = open(&s, STREAM, Some(&alice), None).await;
}

#[tokio::test]
async fn stream_authentication_failures_are_401() {
    let s = start().await;
    let r = request(&s, STREAM, None, None).await;
    let (code, headers) = refused(r, 401).await;
    assert_eq!(code, "missing_token");
    assert!(headers.contains_key("www-authenticate"));
    let r = request(&s, STREAM, Some("not.a.jwt"), None).await;
    assert_eq!(refused(r, 401).await.0, "invalid_token");
    let wrong = hs256(
        b"another-secret-of-at-least-32-bytes-long",
        &json!({"sub": "alice", "exp": now_secs() + 60}),
    );
    let r = request(&s, &format!("{STREAM}?access_token={wrong}"), None, None).await;
    assert_eq!(refused(r, 401).await.0, "invalid_token");
    let expired = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "alice", "exp": now_secs() - 120}),
    );
    let r = request(&s, STREAM, Some(&expired), None).await;
    assert_eq!(refused(r, 401).await.0, "token_expired");
    let r = request(&s, &format!("{STREAM}?access_token={expired}"), None, None).await;
    assert_eq!(refused(r, 401).await.0, "token_expired");
    // Header and query token together: ambiguous, refused.
    let t = token("alice");
    let r = request(&s, &format!("{STREAM}?access_token={t}"), Some(&t), None).await;
    assert_eq!(refused(r, 400).await.0, "invalid_parameter");
    // The query token is for the stream only.
    let r = request(&s, &format!("{LIST}?access_token={t}"), None, None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        s.state.hub().streams(),
        0,
        "no refused request holds a slot"
    );
}

/// Everything logged in this test process (the subscriber is global: with nextest each
/// test is its own process; with `cargo test` the buffer also holds other tests' lines,
/// which only makes the "not logged" check stricter).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        logs
    })
    .clone()
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_query_token_works_and_is_never_logged() {
    let logs = captured_logs();
    let s = start().await;
    let t = token("query-user");
    let mut sse = open(&s, &format!("{STREAM}?access_token={t}"), None, None).await;
    let id = add(&s.db, "query-user", 1).await;
    assert_eq!(sse.events(1).await, id);
    // A refused one too (its token is just as secret).
    let expired = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "query-user", "exp": now_secs() - 120}),
    );
    let r = request(&s, &format!("{STREAM}?access_token={expired}"), None, None).await;
    assert_eq!(r.status(), 401);
    drop(sse);
    let logged = eventually(Duration::from_secs(10), || async {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        (text.contains("status=401") && text.contains("query-user")).then_some(text)
    })
    .await;
    assert!(logged.contains("/api/notifications/stream"), "{logged}");
    for secret in [&t, &expired] {
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!logged.contains(signature), "a token was logged");
    }
    assert!(
        !logged.contains("access_token="),
        "a query string was logged"
    );
}

#[tokio::test]
async fn long_poll_returns_as_soon_as_a_notification_arrives() {
    let s = start().await;
    let t = token("alice");
    let first = add(&s.db, "alice", 2).await;
    let cursor = first[1];
    let poll = {
        let (http, url, t) = (
            s.http.clone(),
            s.url(&format!("{LIST}?after={cursor}&wait=25")),
            t.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http.get(url).bearer_auth(t).send().await.unwrap();
            assert_eq!(r.status(), 200);
            (r.json::<Value>().await.unwrap(), started.elapsed())
        })
    };
    // Insert only once the poll waits (it subscribed), so that it must be woken.
    eventually(Duration::from_secs(10), || async {
        (s.state.hub().users() == 1).then_some(())
    })
    .await;
    let new = add(&s.db, "alice", 1).await;
    let (page, took) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .expect("the long-poll answered early")
        .unwrap();
    assert_eq!(ids(&page), new);
    assert_eq!(page["next_after"], new[0]);
    assert_eq!(page["unread_count"], 3);
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(s.state.hub().users(), 0, "the waiter left");
}

#[tokio::test]
async fn long_poll_answers_empty_when_the_wait_runs_out_even_past_the_timeout() {
    // A request timeout shorter than the wait: the timeout runs on top of the wait.
    let mut a = stream_args();
    a.request_timeout_secs = 1;
    let s = Server::start_with(TestDb::new().await, a).await;
    let t = token("alice");
    let cursor = add(&s.db, "alice", 1).await[0];
    add(&s.db, "bob", 1).await;
    let started = Instant::now();
    let page = s.page(&format!("{LIST}?after={cursor}&wait=2"), &t).await;
    let took = started.elapsed();
    assert_eq!(ids(&page), Vec::<i64>::new());
    assert_eq!(page["next_after"], cursor);
    assert_eq!(page["unread_count"], 1);
    assert!(took >= Duration::from_secs(2), "{took:?}");
    // The unread feed waits the same way.
    let page = s
        .page(
            &format!("/api/notifications/unread?after={cursor}&wait=1"),
            &t,
        )
        .await;
    assert_eq!(ids(&page), Vec::<i64>::new());
    // wait=0 is a plain poll.
    let page = s.page(&format!("{LIST}?after=0&wait=0"), &t).await;
    assert_eq!(ids(&page), [cursor]);
}

#[tokio::test]
async fn long_poll_parameters_are_checked() {
    let s = start().await;
    let t = token("alice");
    add(&s.db, "alice", 1).await;
    for q in [
        "after=0&wait=31",
        "after=0&wait=-1",
        "after=0&wait=1.5",
        "after=0&wait=abc",
        "after=0&wait=",
        "after=0&wait=1&wait=2",
        "wait=5",
    ] {
        let code = s.error(&format!("{LIST}?{q}"), Some(&t), 400).await;
        assert_eq!(code, "invalid_parameter", "{q}");
    }
    let r = s.get(&format!("{LIST}?wait=5"), Some(&t)).await;
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("after"),
        "{body}"
    );
}

#[tokio::test]
async fn streams_and_long_polls_end_promptly_on_shutdown() {
    let mut a = stream_args();
    // A long drain bound, so that finishing early proves the waits ended by themselves.
    a.shutdown_timeout_secs = 60;
    a.stream.stream_heartbeat_secs = 3600;
    let s = Server::start_with(TestDb::new().await, a).await;
    let mut sse = open(&s, STREAM, Some(&token("alice")), None).await;
    let cursor = add(&s.db, "bob", 1).await[0];
    let poll = {
        let (http, url, t) = (
            s.http.clone(),
            s.url(&format!("{LIST}?after={cursor}&wait=30")),
            token("bob"),
        );
        tokio::spawn(async move { http.get(url).bearer_auth(t).send().await.unwrap() })
    };
    // Alice's stream and Bob's long-poll both wait.
    eventually(Duration::from_secs(10), || async {
        (s.state.hub().users() == 2 && s.state.hub().streams() == 1).then_some(())
    })
    .await;
    let started = Instant::now();
    let reader = tokio::spawn(async move { sse.frame().await });
    tokio::time::timeout(Duration::from_secs(10), s.stop())
        .await
        .expect("shutdown does not wait for streams")
        .expect("stops cleanly");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(reader.await.unwrap(), None, "the stream ended cleanly");
    let r = poll.await.unwrap();
    assert_eq!(r.status(), 200, "the long-poll was answered");
    assert_eq!(ids(&r.json().await.unwrap()), Vec::<i64>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_loses_nothing() {
    let s = start().await;
    let t = token("alice");
    let mut sse = open(&s, STREAM, Some(&t), None).await;
    let before = add(&s.db, "alice", 1).await;
    assert_eq!(sse.events(1).await, before);

    // Keep the listener down for a while: no new connection to this database (existing
    // ones carry on: the stream's read connection, and a one-connection pool of the test
    // opened now), then end the LISTEN backend.
    let writer = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .connect(&s.db.url)
        .await
        .unwrap();
    add_on(&writer, "warm-up", 1).await;
    let admin = sqlx::PgPool::connect(&common::server_url()).await.unwrap();
    let allow = |on: bool| format!("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {on}", s.db.name);
    sqlx::query(sqlx::AssertSqlSafe(allow(false)))
        .execute(&admin)
        .await
        .unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND query LIKE 'LISTEN%') AS t",
    )
    .bind(&s.db.name)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(ended, 1, "one LISTEN backend");
    eventually(Duration::from_secs(10), || async {
        (!s.state.hub().is_live()).then_some(())
    })
    .await;

    // Inserted while the listener is down: announced to nobody, still delivered (the
    // stream re-reads every 1-2 s meanwhile).
    let during = add_on(&writer, "alice", 2).await;
    assert_eq!(sse.events(2).await, during);

    // The listener comes back; what is inserted afterwards arrives too, exactly once.
    sqlx::query(sqlx::AssertSqlSafe(allow(true)))
        .execute(&admin)
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        s.state.hub().is_live().then_some(())
    })
    .await;
    let after = add(&s.db, "alice", 2).await;
    assert_eq!(sse.events(2).await, after);
    sse.quiet().await;
    writer.close().await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_when_its_token_expires_and_resumes_with_a_fresh_one() {
    let mut a = stream_args();
    a.stream.stream_heartbeat_secs = 3600;
    let s = Server::start_with(TestDb::new().await, a).await;
    // exp in 2 to 3 s (the test server tolerates no clock skew).
    let short = hs256(
        SECRET.as_bytes(),
        &json!({"sub": "alice", "exp": now_secs() + 3}),
    );
    let mut sse = open(&s, STREAM, Some(&short), None).await;
    let first = add(&s.db, "alice", 1).await;
    assert_eq!(sse.events(1).await, first);
    let started = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), sse.frame())
        .await
        .expect("the stream outlived its token");
    assert_eq!(end, None, "the stream ended cleanly");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Its slot under the per-user cap is free again.
    eventually(Duration::from_secs(5), || async {
        (s.state.hub().streams() == 0).then_some(())
    })
    .await;
    // What arrived meanwhile is replayed to the reconnecting client, with a fresh token.
    let missed = add(&s.db, "alice", 2).await;
    let last = first[0].to_string();
    let mut again = open(&s, STREAM, Some(&token("alice")), Some(&last)).await;
    assert_eq!(again.events(2).await, missed);
}
