//! The read API over real HTTP against a real Postgres: isolation, cursor paging (also
//! under concurrent inserts), unread state and its cached count, cursor expiry, the
//! cache's "no query for an empty poll", and strict parameters.

mod common;
mod serve_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use common::{Runner, process};
use notifyd::store::RateLimit;
use serve_support::{Server, add, eventually, ids, token};

const LIST: &str = "/api/notifications";
const UNREAD: &str = "/api/notifications/unread";

#[tokio::test]
async fn users_only_ever_see_their_own_notifications() {
    let s = Server::start().await;
    let b = add(&s.db, "bob", 2).await;
    let a = add(&s.db, "alice", 3).await;
    let b2 = add(&s.db, "bob", 1).await;
    let (ta, tb) = (token("alice"), token("bob"));

    let pa = s.page(LIST, &ta).await;
    let pb = s.page(LIST, &tb).await;
    assert_eq!(ids(&pa), a);
    assert_eq!(ids(&pb), [b.clone(), b2.clone()].concat());
    assert_eq!(pa["unread_count"], 3);
    assert_eq!(pb["unread_count"], 3);
    assert!(!pa.to_string().contains("bob"));

    // Bob's ids as cursors reveal nothing of Bob's to Alice.
    for cursor in b.iter().chain(&b2) {
        let r = s
            .get(&format!("{LIST}?after={}", cursor - 1), Some(&ta))
            .await;
        let status = r.status();
        let p: Value = r.json().await.unwrap();
        match status.as_u16() {
            200 => assert!(ids(&p).iter().all(|id| a.contains(id)), "{p}"),
            400 => assert_eq!(p["error"]["code"], "invalid_cursor"),
            other => panic!("{other}: {p}"),
        }
    }
    // A user who has nothing sees nothing.
    let pc = s.page(LIST, &token("carol")).await;
    assert_eq!(ids(&pc), Vec::<i64>::new());
    assert_eq!(pc["unread_count"], 0);
    // No parameter can name a user.
    for q in ["user_id=bob", "user=bob", "sub=bob"] {
        let code = s.error(&format!("{LIST}?{q}"), Some(&ta), 400).await;
        assert_eq!(code, "unknown_parameter");
    }
    // Marking Bob's notifications read does not touch Alice's count.
    sqlx::query("UPDATE notify.notifications SET read_at = now() WHERE user_id = 'bob'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        (s.page(UNREAD, &tb).await["unread_count"] == 0).then_some(())
    })
    .await;
    assert_eq!(s.page(UNREAD, &ta).await["unread_count"], 3);
}

#[tokio::test]
async fn the_response_has_the_documented_shape() {
    let s = Server::start().await;
    let id = add(&s.db, "42", 1).await[0];
    let page = s.page(LIST, &token("42")).await;
    let keys: BTreeSet<&str> = page
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["notifications", "next_after", "unread_count"])
    );
    let n = &page["notifications"][0];
    let keys: BTreeSet<&str> = n.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        keys,
        BTreeSet::from([
            "id",
            "event_type",
            "body",
            "link",
            "created_at",
            "read_at",
            "digest"
        ])
    );
    assert_eq!(n["id"], id);
    assert!(n["digest"].is_null(), "only a digest has one");
    assert_eq!(n["event_type"], "new_message");
    assert_eq!(n["body"], "note 1");
    assert_eq!(n["link"], "/n/1");
    assert!(n["read_at"].is_null());
    let created = n["created_at"].as_str().unwrap();
    chrono::DateTime::parse_from_rfc3339(created).unwrap();
    assert!(created.len() == 27 && created.ends_with('Z'), "{created}");
    assert_eq!(page["next_after"], id);
    assert_eq!(page["unread_count"], 1);

    sqlx::query("UPDATE notify.notifications SET read_at = now() WHERE user_id = '42'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let page = eventually(Duration::from_secs(10), || async {
        let p = s.page(LIST, &token("42")).await;
        (p["unread_count"] == 0).then_some(p)
    })
    .await;
    chrono::DateTime::parse_from_rfc3339(page["notifications"][0]["read_at"].as_str().unwrap())
        .unwrap();
}

/// A digest (the worker's sweep, after the rate limit held events back) is served with its
/// counts in `digest`; the other notifications have `digest: null`.
#[tokio::test]
async fn a_digest_is_served_with_its_counts() {
    let s = Server::start().await;
    let mut p = Runner::new(
        s.db.pool.clone(),
        RateLimit {
            limit: 1,
            window: Duration::from_secs(3600),
        },
    );
    let now = chrono::Utc::now();
    p.now = Some(now);
    let mut events = Vec::new();
    for (ty, body) in [
        ("new_message", "one"),
        ("new_message", "two"),
        ("status_change", "three"),
    ] {
        events.push(s.db.enqueue("42", ty, body).await);
    }
    let out = process(&p, &events).await;
    assert_eq!(out[0].label(), "stored");
    notifyd::digest::run_once(&s.db.pool, p.rate, Some(now + chrono::Duration::hours(2)))
        .await
        .unwrap();
    let page = eventually(Duration::from_secs(10), || async {
        let page = s.page(LIST, &token("42")).await;
        (page["notifications"].as_array().unwrap().len() == 2).then_some(page)
    })
    .await;
    let n = &page["notifications"];
    assert!(n[0]["digest"].is_null());
    assert_eq!(n[1]["event_type"], "digest");
    assert_eq!(
        n[1]["body"],
        "2 more notifications while you were away: 1 new message, 1 status change"
    );
    let d = &n[1]["digest"];
    assert_eq!(d["total"], 2);
    assert_eq!(
        d["counts"],
        serde_json::json!({"new_message": 1, "status_change": 1})
    );
    chrono::DateTime::parse_from_rfc3339(d["first_at"].as_str().unwrap()).unwrap();
    chrono::DateTime::parse_from_rfc3339(d["last_at"].as_str().unwrap()).unwrap();
}

#[tokio::test]
async fn cursor_paging_is_ascending_and_echoable() {
    let s = Server::start().await;
    let all = add(&s.db, "alice", 12).await;
    let t = token("alice");

    // Without `after`: the newest page, in ascending order.
    let newest = s.page(&format!("{LIST}?limit=5"), &t).await;
    assert_eq!(ids(&newest), all[7..]);
    assert_eq!(newest["next_after"], all[11]);

    // after=0: everything from the oldest, page by page, echoing next_after.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let p = s.page(&format!("{LIST}?after={after}&limit=5"), &t).await;
        let got = ids(&p);
        let next = p["next_after"].as_i64().unwrap();
        if got.is_empty() {
            assert_eq!(next, after, "nothing new: next_after echoes the cursor");
            break;
        }
        assert_eq!(next, *got.last().unwrap());
        seen.extend(got);
        after = next;
    }
    assert_eq!(seen, all);

    // Default and maximum limits.
    add(&s.db, "bulk", 250).await;
    let tb = token("bulk");
    assert_eq!(
        ids(&s.page(&format!("{LIST}?after=0"), &tb).await).len(),
        50
    );
    assert_eq!(ids(&s.page(LIST, &tb).await).len(), 50);
    assert_eq!(
        ids(&s.page(&format!("{LIST}?after=0&limit=200"), &tb).await).len(),
        200
    );
}

#[tokio::test]
async fn invalid_parameters_are_400_with_a_message() {
    let s = Server::start().await;
    add(&s.db, "alice", 1).await;
    let t = token("alice");
    for q in [
        "after=abc",
        "after=-1",
        "after=1.5",
        "after=",
        "after=99999999999999999999",
        "after=1&after=2",
        "limit=0",
        "limit=-3",
        "limit=201",
        "limit=ten",
        "limit=",
    ] {
        for path in [LIST, UNREAD] {
            let code = s.error(&format!("{path}?{q}"), Some(&t), 400).await;
            assert_eq!(code, "invalid_parameter", "{path}?{q}");
        }
    }
    for q in ["page=2", "after=1&offset=3", "Limit=5"] {
        let code = s.error(&format!("{LIST}?{q}"), Some(&t), 400).await;
        assert_eq!(code, "unknown_parameter", "{q}");
    }
    let r = s.get(&format!("{LIST}?limit=0"), Some(&t)).await;
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"].as_str().unwrap().contains("200"),
        "{body}"
    );
}

#[tokio::test]
async fn unread_follows_mark_read_and_the_cached_count_updates() {
    let s = Server::start().await;
    let all = add(&s.db, "alice", 6).await;
    let t = token("alice");

    let p = s.page(UNREAD, &t).await;
    assert_eq!(ids(&p), all);
    assert_eq!(p["unread_count"], 6);
    let cursor = p["next_after"].as_i64().unwrap();

    // An empty poll, answered from the cache.
    let empty = s.page(&format!("{UNREAD}?after={cursor}"), &t).await;
    assert_eq!(ids(&empty), Vec::<i64>::new());
    assert_eq!(empty["unread_count"], 6);

    // The backend marks two read, with the contract's statement.
    sqlx::query(
        "UPDATE notify.notifications SET read_at = now() WHERE user_id = $1 AND id = ANY($2)",
    )
    .bind("alice")
    .bind(&all[..2])
    .execute(&s.db.pool)
    .await
    .unwrap();

    // The same empty poll: its count changes once the trigger's NOTIFY arrives.
    eventually(Duration::from_secs(10), || async {
        let p = s.page(&format!("{UNREAD}?after={cursor}"), &t).await;
        (p["unread_count"] == 4).then_some(())
    })
    .await;
    let p = s.page(UNREAD, &t).await;
    assert_eq!(ids(&p), all[2..]);
    let p = s.page(&format!("{UNREAD}?after=0&limit=2"), &t).await;
    assert_eq!(ids(&p), all[2..4]);
    assert_eq!(p["next_after"], all[3]);
    let p = s.page(LIST, &t).await;
    assert_eq!(ids(&p), all, "the full list still has the read ones");
    assert_eq!(p["unread_count"], 4);
    assert!(p["notifications"][0]["read_at"].is_string());
}

#[tokio::test]
async fn empty_polls_need_no_query_and_new_notifications_show_up() {
    let s = Server::start().await;
    let first = add(&s.db, "alice", 3).await;
    let t = token("alice");
    let cursor = s.page(LIST, &t).await["next_after"].as_i64().unwrap();
    assert_eq!(cursor, first[2]);

    // The first empty poll may still race the announcement of the rows just added;
    // from the first answer out of memory on, the snapshot covers them.
    eventually(Duration::from_secs(10), || async {
        let before = s.state.metrics().cache_answers();
        s.page(&format!("{LIST}?after={cursor}"), &t).await;
        (s.state.metrics().cache_answers() > before).then_some(())
    })
    .await;
    let queries = s.state.metrics().queries();
    for _ in 0..20 {
        for path in [LIST, UNREAD] {
            let p = s.page(&format!("{path}?after={cursor}"), &t).await;
            assert_eq!(ids(&p), Vec::<i64>::new());
            assert_eq!(p["next_after"], cursor);
            assert_eq!(p["unread_count"], 3);
        }
    }
    assert_eq!(
        s.state.metrics().queries(),
        queries,
        "empty polls queried the database"
    );
    assert!(s.state.metrics().cache_answers() >= 40);

    // A new notification invalidates the watermark; polling finds it.
    let more = add(&s.db, "alice", 2).await;
    let p = eventually(Duration::from_secs(10), || async {
        let p = s.page(&format!("{LIST}?after={cursor}"), &t).await;
        (!ids(&p).is_empty()).then_some(p)
    })
    .await;
    assert_eq!(ids(&p), more);
    assert_eq!(p["unread_count"], 5);
}

#[tokio::test]
async fn expired_and_foreign_cursors_are_signalled() {
    let s = Server::start().await;
    let all = add(&s.db, "alice", 6).await;
    let t = token("alice");
    // Warm the cache so that both the cached and the uncached paths are exercised.
    let cursor = s.page(LIST, &t).await["next_after"].as_i64().unwrap();

    // A client saw the first two, then retention deletes the first four.
    let client_cursor = all[1];
    sqlx::query("DELETE FROM notify.notifications WHERE user_id = 'alice' AND id <= $1")
        .bind(all[3])
        .execute(&s.db.pool)
        .await
        .unwrap();
    // The cache hears of the DELETE within milliseconds; until then it may answer 200.
    eventually(Duration::from_secs(10), || async {
        let r = s
            .get(&format!("{LIST}?after={client_cursor}"), Some(&t))
            .await;
        (r.status() == 410).then_some(())
    })
    .await;
    for _ in 0..2 {
        let code = s
            .error(&format!("{LIST}?after={client_cursor}"), Some(&t), 410)
            .await;
        assert_eq!(code, "cursor_expired");
        let code = s
            .error(&format!("{UNREAD}?after={client_cursor}"), Some(&t), 410)
            .await;
        assert_eq!(code, "cursor_expired");
    }
    // A client that had seen everything deleted is fine, and so is after=0.
    let p = s.page(&format!("{LIST}?after={}", all[3]), &t).await;
    assert_eq!(ids(&p), all[4..]);
    let p = s.page(&format!("{LIST}?after=0"), &t).await;
    assert_eq!(ids(&p), all[4..]);
    let p = s.page(&format!("{LIST}?after={cursor}"), &t).await;
    assert_eq!(ids(&p), Vec::<i64>::new());

    // A cursor this user was never given.
    let code = s
        .error(&format!("{LIST}?after={}", cursor + 1000), Some(&t), 400)
        .await;
    assert_eq!(code, "invalid_cursor");
    let code = s
        .error(&format!("{LIST}?after=5"), Some(&token("nobody")), 400)
        .await;
    assert_eq!(code, "invalid_cursor");

    // Everything deleted: the last cursor stays valid and empty.
    sqlx::query("DELETE FROM notify.notifications WHERE user_id = 'alice'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let p = eventually(Duration::from_secs(10), || async {
        let p = s.page(&format!("{LIST}?after={cursor}"), &t).await;
        (p["unread_count"] == 0).then_some(p)
    })
    .await;
    assert_eq!(ids(&p), Vec::<i64>::new());
    assert_eq!(p["next_after"], cursor);
    let p = s.page(LIST, &t).await;
    assert_eq!(
        p["next_after"], cursor,
        "an empty first page hands out the horizon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_under_concurrent_inserts_has_no_gaps_or_repeats() {
    let s = Server::start().await;
    let t = token("alice");
    // The real store path (enqueue, then the pipeline's group commit and announcement),
    // with a limit high enough to store everything.
    let pipeline = Runner::new(
        s.db.pool.clone(),
        RateLimit {
            limit: 1_000_000,
            window: Duration::from_secs(3600),
        },
    );
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let pool = s.db.pool.clone();
        let done = done.clone();
        tokio::spawn(async move {
            for round in 0..40 {
                let mut ids = Vec::new();
                for i in 0..5 {
                    for user in ["alice", "bob"] {
                        let id: i64 = sqlx::query_scalar(
                            "INSERT INTO notify.events (user_id, event_type, body)
                             VALUES ($1, 'new_message', $2) RETURNING id",
                        )
                        .bind(user)
                        .bind(format!("round {round} item {i}"))
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                        ids.push(id);
                    }
                }
                process(&pipeline, &ids).await;
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    const EXPECTED: usize = 200;
    let mut seen: Vec<i64> = Vec::new();
    let mut after = 0;
    let mut polls_while_writing = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < EXPECTED {
        if !done.load(Ordering::SeqCst) {
            polls_while_writing += 1;
        }
        let p = s.page(&format!("{LIST}?after={after}&limit=7"), &t).await;
        let got = ids(&p);
        assert!(got.iter().all(|&id| id > after), "{got:?} after {after}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        seen.extend(&got);
        after = p["next_after"].as_i64().unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "paging did not finish: {} of {EXPECTED}",
            seen.len()
        );
    }
    writer.await.unwrap();
    assert!(polls_while_writing > 1, "the pager never raced the writer");
    let p = s.page(&format!("{LIST}?after={after}"), &t).await;
    assert_eq!(ids(&p), Vec::<i64>::new(), "nothing beyond the last page");

    let expected: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM notify.notifications WHERE user_id = 'alice' ORDER BY id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(expected.len(), EXPECTED);
    assert_eq!(seen, expected, "no gap, no repeat");
}

#[tokio::test]
async fn read_state_announcements_are_split_under_the_notify_limit() {
    use sqlx::postgres::PgListener;

    let s = Server::start().await;
    let users: Vec<String> = (0..300)
        .map(|i| format!("{i:03}-{}", "u".repeat(120)))
        .collect();
    for u in &users {
        add(&s.db, u, 1).await;
    }
    let mut listener = PgListener::connect(&s.db.url).await.unwrap();
    listener
        .listen(notifyd::contract::READ_STATE_CHANNEL)
        .await
        .unwrap();
    sqlx::query("UPDATE notify.notifications SET read_at = now()")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let mut heard = BTreeSet::new();
    while heard.len() < users.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("every user is announced")
            .unwrap();
        assert!(n.payload().len() < 8000);
        let batch: Vec<String> = serde_json::from_str(n.payload()).unwrap();
        heard.extend(batch);
    }
    assert_eq!(heard, users.iter().cloned().collect());
}

/// A page from a cached snapshot that holds rows committed after it (their announcement
/// not yet heard: here it is never sent) still carries the database's unread count, since
/// clients take the count as exact up to `next_after` (clients/js: a lower count there
/// stayed until the next refresh, 30 s later). Each feed with a user of its own, so each
/// meets a stale snapshot.
#[tokio::test]
async fn a_page_past_the_cached_snapshot_counts_from_the_database() {
    let s = Server::start().await;
    for (user, path) in [("alice", LIST), ("bob", UNREAD)] {
        add(&s.db, user, 3).await;
        let t = token(user);
        let cursor = s.page(path, &t).await["next_after"].as_i64().unwrap();
        // One more, announced; wait until the cache holds a snapshot that knows it.
        let known = add(&s.db, user, 1).await[0];
        eventually(Duration::from_secs(10), || async {
            let before = s.state.metrics().cache_answers();
            let p = s.page(&format!("{path}?after={known}"), &t).await;
            (s.state.metrics().cache_answers() > before && ids(&p).is_empty()).then_some(())
        })
        .await;

        // Two rows committed without an announcement: the cache still says 4 unread.
        let mut quiet: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO notify.notifications (user_id, event_id, event_type, body, created_at)
             SELECT $1, nextval(pg_get_serial_sequence('notify.events', 'id')),
                    'new_message', 'quiet ' || g, now()
             FROM generate_series(1, 2) AS g ORDER BY g RETURNING id",
        )
        .bind(user)
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
        quiet.sort_unstable();
        let queries = s.state.metrics().queries();
        let p = s.page(&format!("{path}?after={cursor}"), &t).await;
        assert_eq!(ids(&p), vec![known, quiet[0], quiet[1]], "{path}");
        assert_eq!(p["next_after"], quiet[1], "{path}");
        assert_eq!(
            p["unread_count"], 6,
            "{path}: the count must cover next_after"
        );
        assert_eq!(
            s.state.metrics().queries() - queries,
            2,
            "{path}: the page query, then the one statement"
        );
        // The refilled snapshot knows them: a page within it is one query again.
        let queries = s.state.metrics().queries();
        let p = s.page(&format!("{path}?after={known}"), &t).await;
        assert_eq!(ids(&p), quiet, "{path}");
        assert_eq!(p["unread_count"], 6, "{path}");
        assert_eq!(s.state.metrics().queries() - queries, 1, "{path}");
    }
}
