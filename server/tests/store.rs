//! The store against real databases: every test runs once on SQLite (in a temporary
//! directory) and once on PostgreSQL (in a fresh schema of the database named by
//! `NBSERVER_TEST_POSTGRES_URL`; `scripts/postgres.sh` starts one and prints the URL).
//!
//! Without that variable the PostgreSQL runs skip with a note on stderr, except under CI
//! (`CI` set), where they fail: CI must exercise both databases.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nbserver::store::{
    Backend, FileChange, NewMessage, NewToken, Store, StoreError, StreamSummary, TokenError,
    TokenGrant,
};
use sqlx::{AnyConnection, AssertSqlSafe, Connection, Executor};

const POSTGRES_URL_VAR: &str = "NBSERVER_TEST_POSTGRES_URL";

/// A database for one test: its URL and what to clean up afterwards.
struct TestDb {
    url: String,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
    /// PostgreSQL: (server URL, schema to drop).
    schema: Option<(String, String)>,
}

fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("nbserver.db").display()
        );
        TestDb {
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
            schema: None,
        }
    }

    /// A fresh schema on the test PostgreSQL server, or `None` to skip.
    async fn postgres(test: &str) -> Option<TestDb> {
        let Ok(base) = std::env::var(POSTGRES_URL_VAR) else {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{POSTGRES_URL_VAR} is not set: on CI the PostgreSQL store tests must run; \
                     start a server with `export {POSTGRES_URL_VAR}=\"$(scripts/postgres.sh | tail -n 1)\"`"
                );
            }
            eprintln!(
                "SKIP {test} on PostgreSQL: {POSTGRES_URL_VAR} is not set \
                 (run scripts/postgres.sh and export the URL it prints)"
            );
            return None;
        };
        sqlx::any::install_default_drivers();
        let schema = unique("nbtest");
        let mut conn = AnyConnection::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {POSTGRES_URL_VAR}={base}: {e}"));
        conn.execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await
            .unwrap();
        conn.close().await.unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(TestDb {
            url: format!("{base}{sep}options[search_path]={schema}"),
            backend: Backend::Postgres,
            _dir: None,
            schema: Some((base, schema)),
        })
    }

    async fn open(&self) -> Store {
        let store = Store::open(&self.url).await.unwrap();
        assert_eq!(store.backend(), self.backend);
        store
    }

    async fn cleanup(self) {
        if let Some((base, schema)) = self.schema {
            let mut conn = AnyConnection::connect(&base).await.unwrap();
            conn.execute(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .await
                .unwrap();
            conn.close().await.unwrap();
        }
    }
}

/// Runs an `async fn(&TestDb)` as two tests, `<name>::sqlite` and `<name>::postgres`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::TestDb::sqlite().await;
                super::$name(&db).await;
                db.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = super::TestDb::postgres(stringify!($name)).await else {
                    return;
                };
                super::$name(&db).await;
                db.cleanup().await;
            }
        }
    )*};
}

on_both!(
    migrations_apply_twice,
    append_dedups_resends_and_refuses_gaps,
    concurrent_resends_store_once,
    concurrent_double_consume_has_one_winner,
    token_failures_are_distinct,
    messages_come_back_in_order_byte_identical,
    streams_and_counts_by_kind,
    agents_are_recorded_and_touched,
    blob_record_is_idempotent,
    bulk_append_of_100k_messages,
    files_are_listed_and_uploads_keep_conflicts,
    file_changes_apply_in_order_once_with_their_messages,
    file_changes_keep_versions_changed_underneath,
);

fn msg(seq: u64) -> NewMessage {
    NewMessage {
        seq,
        kind: "output".to_owned(),
        header: format!(r#"{{"type":"output","seq":{seq}}}"#),
        payload_hash: None,
        received_at: 1_700_000_000_000 + seq as i64,
    }
}

fn msgs(range: std::ops::RangeInclusive<u64>) -> Vec<NewMessage> {
    range.map(msg).collect()
}

fn token(id: &str, agent: &str, expires_at: i64) -> NewToken {
    NewToken {
        id: id.to_owned(),
        secret_hash: format!("hash-of-{id}"),
        agent: agent.to_owned(),
        created_at: 1_000,
        expires_at,
    }
}

async fn migrations_apply_twice(db: &TestDb) {
    let first = db.open().await;
    first
        .append("a", "s", &msgs(1..=3))
        .await
        .expect("append on a fresh schema");
    // A second store on the same database while the first is open, then a third after
    // both closed: the migrations are already applied and must not run again.
    let second = db.open().await;
    assert_eq!(second.stream_stored("a", "s").await.unwrap(), 3);
    first.close().await;
    second.close().await;
    let third = db.open().await;
    assert_eq!(third.stream_stored("a", "s").await.unwrap(), 3);
    assert_eq!(third.messages("a", "s", 0, 10).await.unwrap().len(), 3);
    third.close().await;
}

async fn append_dedups_resends_and_refuses_gaps(db: &TestDb) {
    let store = db.open().await;
    assert_eq!(store.stream_stored("a", "out").await.unwrap(), 0);
    assert_eq!(store.append("a", "out", &[]).await.unwrap(), 0);
    assert_eq!(store.append("a", "out", &msgs(1..=3)).await.unwrap(), 3);

    // A resend overlapping what is stored: 2 and 3 are skipped, 4 and 5 stored.
    assert_eq!(store.append("a", "out", &msgs(2..=5)).await.unwrap(), 5);
    // A resend of only old messages changes nothing.
    assert_eq!(store.append("a", "out", &msgs(1..=5)).await.unwrap(), 5);
    let seqs: Vec<u64> = store
        .messages("a", "out", 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);

    // A gap after the stored position is refused.
    match store.append("a", "out", &msgs(7..=8)).await {
        Err(StoreError::SequenceGap {
            agent,
            stream,
            expected,
            got,
        }) => {
            assert_eq!((agent.as_str(), stream.as_str()), ("a", "out"));
            assert_eq!((expected, got), (6, 7));
        }
        other => panic!("expected a sequence gap, got {other:?}"),
    }
    // A hole inside a batch refuses the whole batch, including its good start.
    let holey = vec![msg(6), msg(8)];
    assert!(matches!(
        store.append("a", "out", &holey).await,
        Err(StoreError::SequenceGap {
            expected: 7,
            got: 8,
            ..
        })
    ));
    assert_eq!(store.stream_stored("a", "out").await.unwrap(), 5);
    assert_eq!(store.messages("a", "out", 5, 100).await.unwrap(), vec![]);

    // Streams are independent, per agent and per stream name.
    assert_eq!(store.append("a", "other", &msgs(1..=2)).await.unwrap(), 2);
    assert_eq!(store.append("b", "out", &msgs(1..=1)).await.unwrap(), 1);
    assert_eq!(store.stream_stored("a", "out").await.unwrap(), 5);

    // Sequence numbers that do not fit the database are refused, not wrapped.
    let huge = vec![NewMessage {
        seq: u64::MAX,
        ..msg(1)
    }];
    assert!(store.append("c", "out", &huge).await.is_err());
    store.close().await;
}

async fn concurrent_resends_store_once(db: &TestDb) {
    let store = db.open().await;
    // The same batch delivered on two connections at once (a reconnect racing the old
    // session): exactly one copy is stored, and both calls report the same position.
    for round in 0..10u64 {
        let start = round * 50 + 1;
        let batch = msgs(start..=start + 49);
        let (a, b) = tokio::join!(
            tokio::spawn({
                let (store, batch) = (store.clone(), batch.clone());
                async move { store.append("agent", "race", &batch).await }
            }),
            tokio::spawn({
                let (store, batch) = (store.clone(), batch.clone());
                async move { store.append("agent", "race", &batch).await }
            }),
        );
        assert_eq!(a.unwrap().unwrap(), start + 49);
        assert_eq!(b.unwrap().unwrap(), start + 49);
    }
    let all = store.messages("agent", "race", 0, 10_000).await.unwrap();
    assert_eq!(all.len(), 500);
    assert!(all.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
    store.close().await;
}

async fn concurrent_double_consume_has_one_winner(db: &TestDb) {
    let store = db.open().await;
    for i in 0..20 {
        let id = format!("tok-{i}");
        store
            .insert_token(&token(&id, "nb-1", 10_000))
            .await
            .unwrap();
        let secret = format!("hash-of-{id}");
        let spawn = |who: &'static str| {
            let (store, id, secret) = (store.clone(), id.clone(), secret.clone());
            tokio::spawn(async move { store.consume_token(&id, &secret, 5_000, who).await })
        };
        let (a, b) = tokio::join!(spawn("first"), spawn("second"));
        let results = [a.unwrap(), b.unwrap()];
        let winners: Vec<&TokenGrant> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {i}: {results:?}");
        assert_eq!(winners[0].agent, "nb-1");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        match loser {
            TokenError::AlreadyUsed { used_at, used_by } => {
                assert_eq!(*used_at, 5_000);
                assert!(used_by == "first" || used_by == "second");
            }
            other => panic!("round {i}: loser got {other:?}"),
        }
    }
    store.close().await;
}

async fn token_failures_are_distinct(db: &TestDb) {
    let store = db.open().await;
    store
        .insert_token(&token("t1", "nb-1", 2_000))
        .await
        .unwrap();
    store
        .insert_token(&token("t2", "nb-2", 2_000))
        .await
        .unwrap();

    assert!(matches!(
        store
            .consume_token("nope", "hash-of-nope", 1_500, "x")
            .await,
        Err(TokenError::Unknown)
    ));
    // A wrong secret looks exactly like an unknown token.
    assert!(matches!(
        store.consume_token("t1", "hash-of-t2", 1_500, "x").await,
        Err(TokenError::Unknown)
    ));
    // Expired: at and after expires_at.
    assert!(matches!(
        store.consume_token("t1", "hash-of-t1", 2_000, "x").await,
        Err(TokenError::Expired { expired_at: 2_000 })
    ));
    assert!(matches!(
        store.consume_token("t1", "hash-of-t1", 9_999, "x").await,
        Err(TokenError::Expired { expired_at: 2_000 })
    ));
    // The failures above did not use the token up.
    assert_eq!(
        store
            .consume_token("t1", "hash-of-t1", 1_999, "host-a")
            .await
            .unwrap(),
        TokenGrant {
            agent: "nb-1".to_owned()
        }
    );
    match store
        .consume_token("t1", "hash-of-t1", 1_999, "host-b")
        .await
    {
        Err(TokenError::AlreadyUsed { used_at, used_by }) => {
            assert_eq!((used_at, used_by.as_str()), (1_999, "host-a"));
        }
        other => panic!("expected already used, got {other:?}"),
    }
    // Who used a token is not revealed to someone without its secret.
    assert!(matches!(
        store.consume_token("t1", "wrong", 1_999, "host-b").await,
        Err(TokenError::Unknown)
    ));
    // Token ids are unique.
    assert!(
        store
            .insert_token(&token("t2", "nb-3", 3_000))
            .await
            .is_err()
    );
    store.close().await;
}

async fn messages_come_back_in_order_byte_identical(db: &TestDb) {
    let store = db.open().await;
    let headers = [
        r#"{"type":"output","text":"héllo wörld ✓ 🚀"}"#.to_owned(),
        "{ \"b\" : 1 ,\n\t\"a\" : [ 1.50 , 2e3 ]   }".to_owned(),
        r#"{"escaped":"quote \" backslash \\ nul \u0000 tab \t"}"#.to_owned(),
        format!(r#"{{"big":"{}"}}"#, "x".repeat(100_000)),
        r#"{"sql":"'); DROP TABLE messages; --"}"#.to_owned(),
    ];
    let batch: Vec<NewMessage> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| NewMessage {
            seq: i as u64 + 1,
            kind: if i % 2 == 0 { "output" } else { "status" }.to_owned(),
            header: h.clone(),
            payload_hash: (i % 2 == 0).then(|| format!("{:064x}", i)),
            received_at: 1_700_000_000_123 + i as i64,
        })
        .collect();
    assert_eq!(store.append("a", "s", &batch).await.unwrap(), 5);

    let back = store.messages("a", "s", 0, 100).await.unwrap();
    assert_eq!(back.len(), batch.len());
    for (got, sent) in back.iter().zip(&batch) {
        assert_eq!(got.seq, sent.seq);
        assert_eq!(got.kind, sent.kind);
        assert_eq!(got.header.as_bytes(), sent.header.as_bytes());
        assert_eq!(got.payload_hash, sent.payload_hash);
        assert_eq!(got.received_at, sent.received_at);
    }
    // Paging: `after` is exclusive, `limit` caps the page.
    let page: Vec<u64> = store
        .messages("a", "s", 1, 2)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(page, vec![2, 3]);
    assert!(store.messages("a", "s", 5, 10).await.unwrap().is_empty());
    assert!(store.messages("a", "nope", 0, 10).await.unwrap().is_empty());
    store.close().await;
}

async fn streams_and_counts_by_kind(db: &TestDb) {
    let store = db.open().await;
    assert!(store.streams().await.unwrap().is_empty());
    let mut batch = msgs(1..=4);
    batch[1].kind = "status".to_owned();
    store.append("b", "out", &batch).await.unwrap();
    store.append("a", "out", &msgs(1..=2)).await.unwrap();
    store.append("a", "ctl", &msgs(1..=1)).await.unwrap();
    // A refused batch leaves no trace, not even an empty stream.
    assert!(store.append("a", "zzz", &msgs(3..=3)).await.is_err());

    let summary = |agent: &str, stream: &str, stored, messages| StreamSummary {
        agent: agent.to_owned(),
        stream: stream.to_owned(),
        stored,
        messages,
    };
    assert_eq!(
        store.streams().await.unwrap(),
        vec![
            summary("a", "ctl", 1, 1),
            summary("a", "out", 2, 2),
            summary("b", "out", 4, 4),
        ]
    );
    assert_eq!(
        store.count_by_kind("b").await.unwrap(),
        vec![("output".to_owned(), 3), ("status".to_owned(), 1)]
    );
    assert_eq!(
        store.count_by_kind("a").await.unwrap(),
        vec![("output".to_owned(), 3)]
    );
    assert!(store.count_by_kind("nobody").await.unwrap().is_empty());
    store.close().await;
}

async fn agents_are_recorded_and_touched(db: &TestDb) {
    let store = db.open().await;
    assert!(store.agent("nb-1").await.unwrap().is_none());
    assert!(matches!(
        store.touch_agent("nb-1", 10).await,
        Err(StoreError::UnknownAgent { agent }) if agent == "nb-1"
    ));
    store
        .record_agent_cert("nb-1", "01ab", 5_000, 100)
        .await
        .unwrap();
    store.touch_agent("nb-1", 150).await.unwrap();
    let rec = store.agent("nb-1").await.unwrap().unwrap();
    assert_eq!(
        (
            rec.enrolled_at,
            rec.cert_serial.as_str(),
            rec.cert_not_after,
            rec.last_seen_at
        ),
        (100, "01ab", 5_000, 150)
    );
    // Renewal keeps the enrolment time and replaces the certificate.
    store
        .record_agent_cert("nb-1", "02cd", 9_000, 200)
        .await
        .unwrap();
    let rec = store.agent("nb-1").await.unwrap().unwrap();
    assert_eq!(
        (
            rec.enrolled_at,
            rec.cert_serial.as_str(),
            rec.cert_not_after,
            rec.last_seen_at
        ),
        (100, "02cd", 9_000, 200)
    );
    store.close().await;
}

async fn blob_record_is_idempotent(db: &TestDb) {
    let store = db.open().await;
    let hash = "ab".repeat(32);
    assert!(store.blob(&hash).await.unwrap().is_none());
    store
        .record_blob(&hash, 1234, "image/png", 10)
        .await
        .unwrap();
    store
        .record_blob(&hash, 1234, "image/png", 20)
        .await
        .unwrap();
    store
        .record_blob(&hash, 1234, "application/octet-stream", 30)
        .await
        .unwrap();
    let rec = store.blob(&hash).await.unwrap().unwrap();
    assert_eq!(
        (
            rec.hash.as_str(),
            rec.size,
            rec.media_type.as_str(),
            rec.created_at
        ),
        (hash.as_str(), 1234, "image/png", 10)
    );
    // Sizes above i64::MAX cannot be stored and are refused rather than wrapped.
    assert!(matches!(
        store.record_blob(&"cd".repeat(32), u64::MAX, "x", 1).await,
        Err(StoreError::OutOfRange { .. })
    ));
    store.close().await;
}

async fn bulk_append_of_100k_messages(db: &TestDb) {
    const TOTAL: u64 = 100_000;
    const BATCH: u64 = 500;
    let store = db.open().await;
    let batches: Vec<Vec<NewMessage>> = (0..TOTAL / BATCH)
        .map(|b| msgs(b * BATCH + 1..=(b + 1) * BATCH))
        .collect();
    let started = Instant::now();
    for batch in &batches {
        store.append("bulk", "out", batch).await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{:?}: stored {TOTAL} messages in batches of {BATCH} in {:.2} s ({:.0} messages/s)",
        db.backend,
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(store.stream_stored("bulk", "out").await.unwrap(), TOTAL);
    assert_eq!(
        store.count_by_kind("bulk").await.unwrap(),
        vec![("output".to_owned(), TOTAL)]
    );
    let tail = store.messages("bulk", "out", TOTAL - 2, 10).await.unwrap();
    assert_eq!(
        tail.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![TOTAL - 1, TOTAL]
    );
    store.close().await;
}

fn file(agent: &str, root: &str, path: &str, version: &str) -> nbserver::store::FileRecord {
    nbserver::store::FileRecord {
        agent: agent.to_owned(),
        root: root.to_owned(),
        path: path.to_owned(),
        kind: "file".to_owned(),
        version: version.to_owned(),
        size: 3,
        mtime_ms: 1_700_000_000_000,
    }
}

async fn files_are_listed_and_uploads_keep_conflicts(db: &TestDb) {
    use nbserver::store::UploadOutcome;
    let store = db.open().await;
    store
        .put_file(&file("a", "notebook", "x.csv", "v1"))
        .await
        .unwrap();
    store
        .put_file(&file("a", "workspace", "w.md", "w1"))
        .await
        .unwrap();
    store
        .put_file(&file("b", "notebook", "x.csv", "b1"))
        .await
        .unwrap();
    // Replacing keeps one row per path.
    store
        .put_file(&file("a", "notebook", "x.csv", "v1"))
        .await
        .unwrap();
    let paths = |v: Vec<nbserver::store::FileRecord>| {
        v.into_iter()
            .map(|f| format!("{}/{}/{}", f.agent, f.root, f.path))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        paths(store.files(None, None).await.unwrap()),
        ["a/notebook/x.csv", "a/workspace/w.md", "b/notebook/x.csv"]
    );
    assert_eq!(
        paths(store.files(Some("a"), Some("notebook")).await.unwrap()),
        ["a/notebook/x.csv"]
    );
    // A whole tree in one aggregated row: the same records as row by row, large
    // sizes, directories and names that need quoting intact; an empty tree is empty.
    let mut big = file("a", "notebook", "d/q\"uote\\ é.bin", "v9");
    big.size = 5 << 40;
    big.mtime_ms = -1;
    store.put_file(&big).await.unwrap();
    let mut dir = file("a", "notebook", "d", "");
    dir.kind = "dir".to_owned();
    dir.size = 0;
    store.put_file(&dir).await.unwrap();
    let mut tree = store.tree("a", "notebook").await.unwrap();
    tree.sort_by(|x, y| x.path.cmp(&y.path));
    assert_eq!(
        tree,
        store.files(Some("a"), Some("notebook")).await.unwrap()
    );
    assert_eq!(tree.len(), 3);
    assert_eq!(tree[1], big);
    assert_eq!(tree[0], dir);
    assert!(store.tree("a", "nothing").await.unwrap().is_empty());
    assert!(store.tree("nobody", "notebook").await.unwrap().is_empty());
    assert_eq!(
        store
            .record_file_upload(&file("a", "notebook", "x.csv", "v2"), "v1", "t1")
            .await
            .unwrap(),
        UploadOutcome::Stored
    );
    assert_eq!(
        store
            .record_file_upload(&file("a", "notebook", "x.csv", "v2"), "v1", "t2")
            .await
            .unwrap(),
        UploadOutcome::AlreadyCurrent
    );
    let conflict = store
        .record_file_upload(&file("a", "notebook", "x.csv", "v3"), "v1", "t3")
        .await
        .unwrap();
    assert_eq!(
        conflict,
        UploadOutcome::Conflict {
            kept_as: "x.csv (conflict t3)".into()
        }
    );
    let current = store.file("a", "notebook", "x.csv").await.unwrap().unwrap();
    assert_eq!(current.version, "v2");
    let kept = store
        .file("a", "notebook", "x.csv (conflict t3)")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.version, "v3");
    // Other agents are untouched.
    assert_eq!(
        store
            .file("b", "notebook", "x.csv")
            .await
            .unwrap()
            .unwrap()
            .version,
        "b1"
    );
}

fn dir(agent: &str, path: &str) -> nbserver::store::FileRecord {
    nbserver::store::FileRecord {
        kind: "dir".to_owned(),
        version: String::new(),
        size: 0,
        ..file(agent, "notebook", path, "")
    }
}

fn upload(path: &str, base: &str, version: &str) -> FileChange {
    FileChange::Upload {
        upload: file("a", "notebook", path, version),
        base_version: base.to_owned(),
        conflict_tag: "t".to_owned(),
    }
}

fn remove(path: &str, is_dir: bool, base: &str) -> FileChange {
    FileChange::Remove {
        agent: "a".to_owned(),
        root: "notebook".to_owned(),
        path: path.to_owned(),
        dir: is_dir,
        base_version: base.to_owned(),
    }
}

fn rename(from: &str, to: &str, base: &str, replaced: &str) -> FileChange {
    FileChange::Rename {
        agent: "a".to_owned(),
        root: "notebook".to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        base_version: base.to_owned(),
        replaced_version: replaced.to_owned(),
        conflict_tag: "t".to_owned(),
        mtime_ms: 1_700_000_000_001,
    }
}

/// `path=version` of every notebook file of agent `a` (`path/` for directories), sorted.
async fn tree(store: &Store) -> Vec<String> {
    let mut entries: Vec<String> = store
        .files(Some("a"), Some("notebook"))
        .await
        .unwrap()
        .into_iter()
        .map(|f| {
            if f.kind == "dir" {
                format!("{}/", f.path)
            } else {
                format!("{}={}", f.path, f.version)
            }
        })
        .collect();
    entries.sort();
    entries
}

async fn file_changes_apply_in_order_once_with_their_messages(db: &TestDb) {
    let store = db.open().await;
    let changes: Vec<(u64, FileChange)> = vec![
        (1, upload("a.csv", "", "v1")),
        (2, FileChange::Mkdir { dir: dir("a", "d") }),
        (3, rename("a.csv", "d/b.csv", "v1", "")),
        (4, upload("d/c.csv", "", "v2")),
        (5, remove("d/c.csv", false, "v2")),
        (6, FileChange::Mkdir { dir: dir("a", "e") }),
        (7, remove("e", true, "")),
        (8, FileChange::Mkdir { dir: dir("a", "f") }),
        (9, rename("d", "g", "", "")),
        // Written again at the renamed-away path, then removed: order matters.
        (10, upload("a.csv", "", "v3")),
    ];
    let expected = ["a.csv=v3", "f/", "g/", "g/b.csv=v1"];
    assert_eq!(
        store
            .append_with_files("a", "s", &msgs(1..=10), &changes)
            .await
            .unwrap(),
        10
    );
    assert_eq!(tree(&store).await, expected);
    // A resend of the whole batch is a duplicate: nothing applies twice (a second
    // upload of v1 would now be a conflict copy, a second rename would do nothing).
    assert_eq!(
        store
            .append_with_files("a", "s", &msgs(1..=10), &changes)
            .await
            .unwrap(),
        10
    );
    assert_eq!(tree(&store).await, expected);
    // A batch refused for a gap applies none of its changes.
    let gap = store
        .append_with_files(
            "a",
            "s",
            &msgs(12..=12),
            &[(12, remove("a.csv", false, "v3"))],
        )
        .await;
    assert!(
        matches!(gap, Err(StoreError::SequenceGap { .. })),
        "{gap:?}"
    );
    assert_eq!(tree(&store).await, expected);
    // Only the new part of a partly resent batch applies.
    store
        .append_with_files(
            "a",
            "s",
            &msgs(10..=11),
            &[
                (10, upload("a.csv", "", "v3")),
                (11, remove("a.csv", false, "v3")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(tree(&store).await, ["f/", "g/", "g/b.csv=v1"]);
    // Another agent's files are untouched by a's changes.
    assert!(store.files(Some("b"), None).await.unwrap().is_empty());
    store.close().await;
}

async fn file_changes_keep_versions_changed_underneath(db: &TestDb) {
    let store = db.open().await;
    for (path, version) in [
        ("x.csv", "x9"),
        ("y.csv", "y9"),
        ("w.csv", "w9"),
        ("full/kept.csv", "k1"),
    ] {
        store
            .put_file(&file("a", "notebook", path, version))
            .await
            .unwrap();
    }
    store.put_file(&dir("a", "full")).await.unwrap();
    // The kernel's version of y.csv is known to the server (it was uploaded once).
    store
        .record_blob("y1", 7, "application/octet-stream", 0)
        .await
        .unwrap();
    let changes = vec![
        // The kernel removes x.csv as it saw it (x1); the server has x9: kept.
        (1, remove("x.csv", false, "x1")),
        // The kernel renames y.csv as it saw it (y1); the server has y9: y9 stays,
        // and the kernel's y1 appears at the new name.
        (2, rename("y.csv", "z.csv", "y1", "")),
        // A rename over w.csv, which the kernel saw at w1; the server has w9: kept
        // aside as a conflict copy.
        (3, rename("z.csv", "w.csv", "y1", "w1")),
        // A directory not empty on the server stays.
        (4, remove("full", true, "")),
        // Changes whose source is gone change nothing.
        (5, remove("never.csv", false, "n1")),
        (6, rename("never.csv", "other.csv", "n1", "")),
    ];
    store
        .append_with_files("a", "s", &msgs(1..=6), &changes)
        .await
        .unwrap();
    assert_eq!(
        tree(&store).await,
        [
            "full/",
            "full/kept.csv=k1",
            "w.csv (conflict t)=w9",
            "w.csv=y1",
            "x.csv=x9",
            "y.csv=y9",
        ]
    );
    assert_eq!(
        store
            .file("a", "notebook", "w.csv")
            .await
            .unwrap()
            .unwrap()
            .size,
        7
    );
    store.close().await;
}
