//! The store test suite, written once and run against every back end: each
//! back end's tests module calls `store_suite!(fixture)` with a function
//! that makes a fresh, empty database. A new store operation gets its test
//! here (and a line in the macro), so every back end runs it.

use crate::*;
use digibot_domain::event::Event;

/// A fresh database for one test; [`open`](TestDb::open) may be called
/// again to reopen the same database (as after a restart).
pub struct TestDb {
    open: Opener,
    /// Whatever keeps the database alive (a temp dir, a database to drop).
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

/// Opens the test's database (opening is async: PostgreSQL connects and
/// migrates on the caller's runtime).
type Opener = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Store> + Send>> + Send + Sync,
>;

impl TestDb {
    pub fn new<F, Fut>(open: F, keep: impl std::any::Any + Send + Sync) -> TestDb
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Store> + Send + 'static,
    {
        TestDb {
            open: Box::new(move || Box::pin(open())),
            _keep: Box::new(keep),
        }
    }

    pub async fn open(&self) -> Store {
        (self.open)().await
    }
}

/// One `#[tokio::test]` per suite test, each on a fresh database from
/// `$fixture: fn() -> Option<TestDb>` (`None`: the back end is not
/// available here, and the fixture said so).
#[macro_export]
macro_rules! store_suite {
    ($fixture:path) => {
        $crate::store_suite!(@tests $fixture;
            duplicates_are_detected_and_pending_survives_reopen,
            a_pending_event_is_found_by_key_until_completed,
            concurrent_inserts_all_land,
            completing_queues_actions_and_kv_once,
            outbox_heads_are_each_conversations_oldest_pending,
            outbox_heads_count_heads_not_what_waits_behind_them,
            retries_wait_and_dead_letters_can_be_retried_or_dropped,
            prune_removes_only_old_finished_work,
            outbox_depth_counts_pending_and_dead_and_ping_fails_once_closed,
            conversations_list_recent_first_with_events_and_actions,
            conversation_state_changes_once_per_event_and_survives_reopen,
            kv_usage_follows_every_write_per_conversation_and_plugin,
            retention_removes_old_dead_letters_and_idle_conversations_with_their_kv,
            journal_records_replaces_lists_and_survives_reopen,
            journal_is_pruned_with_finished_events_only,
            timers_fire_once_held_for_humans_cancelled_by_messages_dropped_at_archive,
            history_is_the_conversations_messages_oldest_first_and_bounded,
            a_hand_back_records_one_resume_event_with_the_human_turn,
            kv_scopes_are_each_plugins_own_and_counted_per_scope,
            kv_values_expire_and_retention_removes_them_and_idle_customers,
            kv_customer_writes_from_many_conversations_at_once_keep_exact_usage,
            a_conversation_keeps_the_customer_an_event_named,
            rollouts_count_each_event_once_end_once_and_survive_reopen,
            a_pin_is_set_once_per_conversation_and_plugin_and_dropped_by_unpin,
            an_agent_message_judged_at_insert_is_handled_once_or_left_pending,
            a_completion_is_never_applied_on_a_state_changed_behind_the_cache,
        );
    };
    (@tests $fixture:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(db) = $fixture() else { return };
                $crate::suite::$name(db).await
            }
        )*
    };
}

pub fn event(id: &str, conv: &str) -> Event {
    Event::parse(
        format!(
            r#"{{"event":"live_chat.new_message","data":{{"id":"{id}","data":{{"conversation_id":"{conv}","body":"hi","sender":{{"model_type":"third"}}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

pub fn action(key: &str) -> NewAction {
    NewAction {
        plugin: "echo".into(),
        idempotency_key: key.into(),
        method: "POST".into(),
        path: "/v1/messages".into(),
        body: serde_json::json!({"body": key}),
    }
}

/// Inserts a customer message in conversation `conv`, completes it with
/// `actions` actions (keys `{id}/a{n}`), and returns its sequence number.
async fn handled_in(store: &Store, id: &str, conv: &str, actions: usize) -> i64 {
    let Inserted::New(seq) = store.insert_event(event(id, conv)).await.unwrap() else {
        panic!("{id} is a duplicate")
    };
    let actions = (0..actions)
        .map(|n| action(&format!("{id}/a{n}")))
        .collect();
    store
        .complete_event(
            seq,
            conv.into(),
            serde_json::json!([]),
            actions,
            vec![],
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    seq
}

/// [`handled_in`] a conversation of its own, named after the event.
async fn handled(store: &Store, id: &str, actions: usize) -> i64 {
    handled_in(store, id, id, actions).await
}

/// The id of the pending action with this idempotency key, which must be
/// the head of its conversation.
async fn head_id(store: &Store, key: &str) -> i64 {
    store
        .outbox_heads(10_000)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.idempotency_key == key)
        .unwrap_or_else(|| panic!("{key} is not an outbox head"))
        .id
}

pub async fn duplicates_are_detected_and_pending_survives_reopen(db: TestDb) {
    let store = db.open().await;
    let first = store.insert_event(event("m1", "c1")).await.unwrap();
    assert!(matches!(first, Inserted::New(_)));
    assert_eq!(
        store.insert_event(event("m1", "c1")).await.unwrap(),
        Inserted::Duplicate
    );
    store.close();
    let store = db.open().await;
    let pending = store.pending_events().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].event.key, "live_chat.new_message:m1");
    assert_eq!(
        store.insert_event(event("m1", "c1")).await.unwrap(),
        Inserted::Duplicate
    );
}

pub async fn a_pending_event_is_found_by_key_until_completed(db: TestDb) {
    let store = db.open().await;
    let Inserted::New(seq) = store.insert_event(event("m1", "c1")).await.unwrap() else {
        panic!("m1 is new")
    };
    let key = "live_chat.new_message:m1";
    let found = store.pending_event(key).await.unwrap().expect("m1 pending");
    assert_eq!((found.seq, found.event.key.as_str()), (seq, key));
    assert!(
        store
            .pending_event("live_chat.new_message:m2")
            .await
            .unwrap()
            .is_none()
    );
    store
        .complete_event(
            seq,
            "c1".into(),
            serde_json::json!([]),
            Vec::new(),
            Vec::new(),
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    assert!(store.pending_event(key).await.unwrap().is_none(), "handled");
    // Still there for replays, handled or not.
    let kept = store.event(key).await.unwrap().expect("m1 kept");
    assert_eq!((kept.seq, kept.event.key.as_str()), (seq, key));
    assert!(
        store
            .event("live_chat.new_message:m2")
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn concurrent_inserts_all_land(db: TestDb) {
    let store = db.open().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Every event twice, at once: exactly one of each is new.
            let a = store.insert_event(event(&format!("m{i}"), "c")).await;
            (a, store.insert_event(event(&format!("m{i}"), "c")).await)
        }));
    }
    let mut new = 0;
    for t in tasks {
        let (a, b) = t.await.unwrap();
        new += [a.unwrap(), b.unwrap()]
            .iter()
            .filter(|i| matches!(i, Inserted::New(_)))
            .count();
    }
    assert_eq!(new, 200);
    let pending = store.pending_events().await.unwrap();
    assert_eq!(pending.len(), 200);
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
    store.close();
    let store = db.open().await;
    assert_eq!(store.pending_events().await.unwrap().len(), 200);
}

pub async fn completing_queues_actions_and_kv_once(db: TestDb) {
    let store = db.open().await;
    let Inserted::New(seq) = store.insert_event(event("m1", "c1")).await.unwrap() else {
        panic!()
    };
    let kv = KvChanges {
        plugin: "echo".into(),
        conversation_id: "c1".into(),
        writes: vec![
            KvWrite::set("topic", "orders"),
            KvWrite::set("gone", "x"),
            KvWrite::delete("gone"),
        ],
    };
    let queued = store
        .complete_event(
            seq,
            "c1".into(),
            serde_json::json!([{"plugin": "echo"}]),
            vec![action("k1"), action("k2")],
            vec![kv.clone()],
            ConversationUpdate::default(),
        )
        .await
        .unwrap()
        .queued;
    assert_eq!(queued, 2);
    // A second completion (recovery race) queues nothing.
    let again = store
        .complete_event(
            seq,
            "c1".into(),
            serde_json::json!([]),
            vec![action("k3")],
            vec![kv],
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    assert_eq!(again, Completed::default());
    let heads = store.outbox_heads(10).await.unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].idempotency_key, "k1");
    assert_eq!(heads[0].body, serde_json::json!({"body": "k1"}));
    assert_eq!(heads[0].conversation_id, "c1");
    assert_eq!(heads[0].event_seq, seq);
    assert_eq!(
        store
            .kv_get("echo", "c1", "topic")
            .await
            .unwrap()
            .as_deref(),
        Some("orders")
    );
    assert_eq!(store.kv_get("echo", "c1", "gone").await.unwrap(), None);
    assert_eq!(store.kv_get("echo", "c2", "topic").await.unwrap(), None);
    assert!(store.pending_events().await.unwrap().is_empty());
    let recent = store.recent_events(10).await.unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0].status, "handled");
    assert_eq!(recent[0].plugins, serde_json::json!([{"plugin": "echo"}]));
}

pub async fn outbox_heads_are_each_conversations_oldest_pending(db: TestDb) {
    let store = db.open().await;
    handled_in(&store, "a1", "a", 2).await;
    handled_in(&store, "b1", "b", 1).await;
    handled_in(&store, "a2", "a", 1).await;
    async fn keys(store: &Store) -> Vec<String> {
        let mut k: Vec<String> = store
            .outbox_heads(100)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.idempotency_key)
            .collect();
        k.sort();
        k
    }
    assert_eq!(keys(&store).await, ["a1/a0", "b1/a0"]);
    store
        .mark_sent(head_id(&store, "a1/a0").await, 201, None, false)
        .await
        .unwrap();
    assert_eq!(keys(&store).await, ["a1/a1", "b1/a0"]);
    store
        .mark_sent(head_id(&store, "a1/a1").await, 201, None, false)
        .await
        .unwrap();
    store
        .mark_sent(head_id(&store, "b1/a0").await, 201, None, false)
        .await
        .unwrap();
    assert_eq!(keys(&store).await, ["a2/a0"]);
    let mut counts = store.outbox_counts().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        [("pending".to_string(), 1), ("sent".to_string(), 3)]
    );
}

/// The read walks pending actions in due order: what waits behind a head
/// is due sooner than a retried head, yet is never returned, and the limit
/// counts heads, however many followers come first.
pub async fn outbox_heads_count_heads_not_what_waits_behind_them(db: TestDb) {
    let store = db.open().await;
    handled_in(&store, "a1", "a", 3).await;
    handled_in(&store, "b1", "b", 1).await;
    let a0 = head_id(&store, "a1/a0").await;
    let later = now_ms() + 60_000;
    store
        .mark_retry(a0, later, Some(503), "busy".into())
        .await
        .unwrap();
    let keys = |heads: Vec<OutboxAction>| -> Vec<String> {
        heads.into_iter().map(|a| a.idempotency_key).collect()
    };
    // a1/a1 and a1/a2 are due now, before b's head and a's retry.
    assert_eq!(
        keys(store.outbox_heads(1).await.unwrap()),
        ["b1/a0"],
        "the limit must count heads"
    );
    assert_eq!(
        keys(store.outbox_heads(10).await.unwrap()),
        ["b1/a0", "a1/a0"],
        "soonest due first, followers never"
    );
    // A dead letter made pending again is older than the head after it:
    // it is its conversation's head once more.
    store.mark_dead(a0, Some(400), "bad".into()).await.unwrap();
    assert_eq!(
        keys(store.outbox_heads(10).await.unwrap()),
        ["a1/a1", "b1/a0"]
    );
    assert_eq!(store.retry_dead(Some(a0)).await.unwrap(), 1);
    let mut heads = keys(store.outbox_heads(10).await.unwrap());
    heads.sort();
    assert_eq!(heads, ["a1/a0", "b1/a0"]);
}

pub async fn retries_wait_and_dead_letters_can_be_retried_or_dropped(db: TestDb) {
    let store = db.open().await;
    handled(&store, "r", 1).await;
    handled(&store, "d1", 1).await;
    handled(&store, "d2", 1).await;
    let later = now_ms() + 60_000;
    let r = head_id(&store, "r/a0").await;
    store
        .mark_retry(r, later, Some(503), "busy".into())
        .await
        .unwrap();
    let head = store
        .outbox_heads(10)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == r)
        .unwrap();
    assert_eq!(
        (head.attempts, head.next_attempt_at, head.last_status),
        (1, later, Some(503))
    );
    assert_eq!(head.last_error.as_deref(), Some("busy"));
    // Soonest due first: the retry comes last.
    assert_eq!(store.outbox_heads(10).await.unwrap().last().unwrap().id, r);

    let d1 = head_id(&store, "d1/a0").await;
    let d2 = head_id(&store, "d2/a0").await;
    store.mark_dead(d1, Some(400), "bad".into()).await.unwrap();
    store.mark_dead(d2, None, "refused".into()).await.unwrap();
    let dead = store.dead_letters().await.unwrap();
    assert_eq!(dead.iter().map(|a| a.id).collect::<Vec<_>>(), [d1, d2]);
    assert_eq!(dead[0].last_status, Some(400));
    assert_eq!(dead[0].status, "dead");
    assert_eq!(dead[0].body, serde_json::json!({"body": "d1/a0"}));

    assert_eq!(store.retry_dead(Some(d1)).await.unwrap(), 1);
    assert_eq!(store.retry_dead(Some(d1)).await.unwrap(), 0);
    let retried = store
        .outbox_heads(10)
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.id == d1)
        .unwrap();
    assert_eq!(retried.attempts, 0);
    assert!(retried.next_attempt_at <= now_ms());
    assert!(!store.drop_dead(d1).await.unwrap());
    assert!(store.drop_dead(d2).await.unwrap());
    assert!(store.dead_letters().await.unwrap().is_empty());
    store.mark_dead(d1, Some(400), "bad".into()).await.unwrap();
    assert_eq!(store.retry_dead(None).await.unwrap(), 1);
    assert!(store.dead_letters().await.unwrap().is_empty());
}

pub async fn prune_removes_only_old_finished_work(db: TestDb) {
    let store = db.open().await;
    // Old and finished: its action was sent. Both go.
    handled(&store, "old_sent", 1).await;
    store
        .mark_sent(head_id(&store, "old_sent/a0").await, 201, None, false)
        .await
        .unwrap();
    // Old system message (recorded, never pending). Goes.
    let agent = Event::parse(br#"{"event":"live_chat.new_message","data":{"id":"old_agent","data":{"conversation_id":"c","system":true,"body":"hi","sender":{"model_type":"user"}}}}"#).unwrap();
    assert!(matches!(
        store.insert_event(agent).await.unwrap(),
        Inserted::New(_)
    ));
    // Old dead letter: kept, and so is its event.
    handled(&store, "old_dead", 1).await;
    store
        .mark_dead(head_id(&store, "old_dead/a0").await, Some(400), "no".into())
        .await
        .unwrap();
    // Old event whose action is still pending: both kept.
    handled(&store, "old_unsent", 1).await;
    // Old event still pending (never dispatched): kept.
    store.insert_event(event("old_pending", "p")).await.unwrap();
    // The cut: strictly after everything above, strictly before the rest
    // (timestamps are in ms).
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let cut = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    // Recent and finished: kept.
    handled(&store, "recent_sent", 1).await;
    store
        .mark_sent(head_id(&store, "recent_sent/a0").await, 201, None, false)
        .await
        .unwrap();

    let finished = Retention {
        finished_before: Some(cut),
        ..Retention::default()
    };
    let pruned = store.prune(finished).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            events: 2,
            actions: 1,
            ..Pruned::default()
        }
    );
    let mut keys: Vec<String> = store
        .recent_events(100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            e.key
                .trim_start_matches("live_chat.new_message:")
                .to_string()
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        ["old_dead", "old_pending", "old_unsent", "recent_sent"]
    );
    let mut counts = store.outbox_counts().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("dead".to_string(), 1),
            ("pending".to_string(), 1),
            ("sent".to_string(), 1)
        ]
    );
    assert_eq!(store.dead_letters().await.unwrap().len(), 1);
    assert_eq!(store.pending_events().await.unwrap().len(), 1);
    // Pruning again finds nothing more.
    assert_eq!(store.prune(finished).await.unwrap(), Pruned::default());
}

pub async fn outbox_depth_counts_pending_and_dead_and_ping_fails_once_closed(db: TestDb) {
    let store = db.open().await;
    store.ping().await.unwrap();
    assert_eq!(store.outbox_depth().await.unwrap(), OutboxDepth::default());
    handled(&store, "p", 2).await;
    handled(&store, "s", 1).await;
    handled(&store, "d", 1).await;
    store
        .mark_sent(head_id(&store, "s/a0").await, 200, None, false)
        .await
        .unwrap();
    store
        .mark_dead(head_id(&store, "d/a0").await, Some(400), "bad".into())
        .await
        .unwrap();
    // A retry waiting for its time still counts as pending.
    store
        .mark_retry(
            head_id(&store, "p/a0").await,
            now_ms() + 60_000,
            Some(500),
            "x".into(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.outbox_depth().await.unwrap(),
        OutboxDepth {
            pending: 2,
            dead: 1
        }
    );
    store.close();
    assert!(matches!(store.ping().await, Err(StoreError::Closed)));
}

pub async fn conversations_list_recent_first_with_events_and_actions(db: TestDb) {
    let store = db.open().await;
    // Conversation "c": two handled messages, one sent and one dead action.
    handled_in(&store, "c1", "c", 1).await;
    handled_in(&store, "c2", "c", 1).await;
    store
        .mark_sent(head_id(&store, "c1/a0").await, 201, None, false)
        .await
        .unwrap();
    store
        .mark_dead(head_id(&store, "c2/a0").await, Some(422), "bad".into())
        .await
        .unwrap();
    // Then conversation "d": one pending event.
    store.insert_event(event("d1", "d")).await.unwrap();

    let list = store.recent_conversations(10).await.unwrap();
    let ids: Vec<&str> = list.iter().map(|c| c.conversation_id.as_str()).collect();
    assert_eq!(ids, ["d", "c"]);
    assert_eq!((list[0].events, list[0].pending_events), (1, 1));
    assert_eq!(list[0].actions, ActionCounts::default());
    assert_eq!((list[1].events, list[1].pending_events), (2, 0));
    assert_eq!(list[1].last_event, "live_chat.new_message");
    assert!(list[1].first_event_at <= list[1].last_event_at);
    assert_eq!(
        list[1].actions,
        ActionCounts {
            sent: 1,
            pending: 0,
            dead: 1
        }
    );
    assert_eq!(store.recent_conversations(1).await.unwrap().len(), 1);

    let detail = store.conversation("c").await.unwrap();
    let keys: Vec<&str> = detail.events.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        ["live_chat.new_message:c1", "live_chat.new_message:c2"]
    );
    let actions: Vec<(&str, &str, Option<i64>)> = detail
        .actions
        .iter()
        .map(|a| (a.idempotency_key.as_str(), a.status.as_str(), a.last_status))
        .collect();
    assert_eq!(
        actions,
        [("c1/a0", "sent", Some(201)), ("c2/a0", "dead", Some(422))]
    );
    let unknown = store.conversation("nope").await.unwrap();
    assert!(unknown.events.is_empty() && unknown.actions.is_empty());
}

fn takeover(reason: &str) -> ConversationUpdate {
    ConversationUpdate {
        agent_at: Some(now_ms()),
        change: Some(StateChange {
            from: None,
            to: ConversationState::Human,
            reason: reason.into(),
        }),
        ..ConversationUpdate::default()
    }
}

async fn complete_with(
    store: &Store,
    id: &str,
    conv: &str,
    update: ConversationUpdate,
) -> Completed {
    let Inserted::New(seq) = store.insert_event(event(id, conv)).await.unwrap() else {
        panic!("{id} is a duplicate")
    };
    let done = store
        .complete_event(
            seq,
            conv.into(),
            serde_json::json!([]),
            vec![],
            vec![],
            update.clone(),
        )
        .await
        .unwrap();
    // Completing it again (a recovery race) changes nothing.
    let again = store
        .complete_event(
            seq,
            conv.into(),
            serde_json::json!([]),
            vec![],
            vec![],
            update,
        )
        .await
        .unwrap();
    assert_eq!(again, Completed::default());
    done
}

pub async fn conversation_state_changes_once_per_event_and_survives_reopen(db: TestDb) {
    let store = db.open().await;
    assert_eq!(store.conversation_state("c").await.unwrap(), None);
    // A customer message: the conversation appears, in the bot's hands,
    // with the customer's time and channel.
    handled_in(&store, "m1", "c", 2).await;
    let done = complete_with(
        &store,
        "m1b",
        "c",
        ConversationUpdate {
            customer_at: Some(1_000),
            channel: Some("whatsapp".into()),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert!(!done.changed);
    let first = store.conversation_state("c").await.unwrap().unwrap();
    assert_eq!(first.state, ConversationState::Bot);
    assert_eq!(
        (first.channel.as_deref(), first.last_customer_at),
        (Some("whatsapp"), Some(1_000))
    );
    // Times only move forward (events can be handled out of order).
    complete_with(
        &store,
        "m1c",
        "c",
        ConversationUpdate {
            customer_at: Some(500),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert_eq!(
        store
            .conversation_state("c")
            .await
            .unwrap()
            .unwrap()
            .last_customer_at,
        Some(1_000)
    );

    // An agent takes over, once.
    assert!(
        complete_with(&store, "a1", "c", takeover("agent wrote"))
            .await
            .changed
    );
    assert!(
        !complete_with(&store, "a2", "c", takeover("again"))
            .await
            .changed
    );
    let human = store.conversation_state("c").await.unwrap().unwrap();
    assert_eq!(
        (human.state, human.reason.as_str()),
        (ConversationState::Human, "agent wrote")
    );
    assert!(human.last_agent_at.is_some());
    assert_eq!(
        store
            .conversation_states(Some(ConversationState::Human), 10)
            .await
            .unwrap(),
        vec![human.clone()]
    );
    assert!(
        store
            .conversation_states(Some(ConversationState::Bot), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A delivery records its message id; a hand-off while human changes
    // nothing.
    let a0 = head_id(&store, "m1/a0").await;
    assert!(
        !store
            .mark_sent(a0, 201, Some("msg_bot_1".into()), true)
            .await
            .unwrap()
    );
    assert!(store.is_own_message("c", "msg_bot_1").await.unwrap());
    assert!(!store.is_own_message("other", "msg_bot_1").await.unwrap());
    assert!(!store.is_own_message("c", "msg_bot_2").await.unwrap());

    // Release: human → bot, then nothing to release.
    let release = async |id: &'static str| store.release(id, "cli".into()).await.unwrap();
    assert_eq!(release("c").await, Release::Released);
    assert_eq!(
        release("c").await,
        Release::NotHuman(ConversationState::Bot)
    );
    assert_eq!(release("nope").await, Release::Unknown);
    let bot = store.conversation_state("c").await.unwrap().unwrap();
    assert_eq!(
        (bot.state, bot.reason.as_str()),
        (ConversationState::Bot, "cli")
    );

    // A delivered hand-off takes over from the bot.
    handled_in(&store, "m2", "h", 1).await;
    assert!(
        store
            .mark_sent(head_id(&store, "m2/a0").await, 200, None, true)
            .await
            .unwrap()
    );
    let handed = store.conversation_state("h").await.unwrap().unwrap();
    assert_eq!(handed.state, ConversationState::Human);
    assert!(
        handed.reason.starts_with("hand-off delivered"),
        "{}",
        handed.reason
    );

    // Archiving: the pending action (in flight, say) becomes a dead letter;
    // its attempt ending in a retry does not revive it, and a failure does
    // not overwrite the reason.
    let a1 = head_id(&store, "m1/a1").await;
    let done = complete_with(
        &store,
        "x1",
        "c",
        ConversationUpdate {
            change: Some(StateChange {
                from: None,
                to: ConversationState::Closed,
                reason: "archived".into(),
            }),
            archive: Some("archived: test".into()),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert_eq!((done.changed, done.archived), (true, 1));
    store
        .mark_retry(a1, now_ms(), Some(503), "busy".into())
        .await
        .unwrap();
    store.mark_dead(a1, Some(400), "no".into()).await.unwrap();
    let dead = store.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, a1);
    assert_eq!(dead[0].last_error.as_deref(), Some("archived: test"));
    assert!(store.outbox_heads(10).await.unwrap().is_empty());

    store.close();
    let store = db.open().await;
    let closed = store.conversation_state("c").await.unwrap().unwrap();
    assert_eq!(
        (closed.state, closed.reason.as_str()),
        (ConversationState::Closed, "archived")
    );
    assert_eq!(
        store.conversation_state("h").await.unwrap().unwrap().state,
        ConversationState::Human
    );
    assert!(store.is_own_message("c", "msg_bot_1").await.unwrap());
}

fn set(key: &str, value: &str) -> KvWrite {
    KvWrite::set(key, value)
}

fn kv(plugin: &str, conv: &str, writes: Vec<KvWrite>) -> KvChanges {
    KvChanges {
        plugin: plugin.into(),
        conversation_id: conv.into(),
        writes,
    }
}

/// Inserts a customer message in `conv` and completes it with `changes`.
async fn complete_kv(store: &Store, id: &str, conv: &str, changes: Vec<KvChanges>) {
    let Inserted::New(seq) = store.insert_event(event(id, conv)).await.unwrap() else {
        panic!("{id} is a duplicate")
    };
    let done = store
        .complete_event(
            seq,
            conv.into(),
            serde_json::json!([]),
            vec![],
            changes.clone(),
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    assert!(done.completed);
    // A second completion (a recovery race) counts nothing twice.
    let again = store
        .complete_event(
            seq,
            conv.into(),
            serde_json::json!([]),
            vec![],
            changes,
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    assert_eq!(again, Completed::default());
}

fn size(keys: i64, bytes: i64) -> KvSize {
    KvSize { keys, bytes }
}

async fn usage(store: &Store, plugin: &str, conv: &str) -> (KvSize, KvSize) {
    let u = store.kv_usage(plugin, conv).await.unwrap();
    (u.scope, u.plugin)
}

pub async fn kv_usage_follows_every_write_per_conversation_and_plugin(db: TestDb) {
    let store = db.open().await;
    assert_eq!(
        usage(&store, "echo", "c1").await,
        (KvSize::default(), KvSize::default())
    );
    // Sizes are UTF-8 bytes of key plus value: "topic"+"orders" is 11,
    // "clé"+"été" is 9.
    complete_kv(
        &store,
        "k1",
        "c1",
        vec![
            kv(
                "echo",
                "c1",
                vec![set("topic", "orders"), set("clé", "été")],
            ),
            kv("other", "c1", vec![set("a", "1")]),
        ],
    )
    .await;
    assert_eq!(
        usage(&store, "echo", "c1").await,
        (size(2, 20), size(2, 20))
    );
    assert_eq!(usage(&store, "other", "c1").await, (size(1, 2), size(1, 2)));

    // Another conversation: its own usage, the plugin's total grows.
    complete_kv(
        &store,
        "k2",
        "c2",
        vec![kv("echo", "c2", vec![set("topic", "x")])],
    )
    .await;
    assert_eq!(usage(&store, "echo", "c2").await, (size(1, 6), size(3, 26)));

    // Overwrites count the difference; a delete gives its entry back;
    // deleting a missing key and a write then a delete of the same key in
    // one turn change nothing.
    complete_kv(
        &store,
        "k3",
        "c1",
        vec![kv(
            "echo",
            "c1",
            vec![
                set("topic", "o"),
                KvWrite::delete("clé"),
                KvWrite::delete("missing"),
                set("brief", "x"),
                KvWrite::delete("brief"),
            ],
        )],
    )
    .await;
    assert_eq!(usage(&store, "echo", "c1").await, (size(1, 6), size(2, 12)));
    assert_eq!(
        store
            .kv_get("echo", "c1", "topic")
            .await
            .unwrap()
            .as_deref(),
        Some("o")
    );
    assert_eq!(store.kv_get("echo", "c1", "brief").await.unwrap(), None);

    // Survives a reopen.
    store.close();
    let store = db.open().await;
    assert_eq!(usage(&store, "echo", "c1").await, (size(1, 6), size(2, 12)));
    assert_eq!(usage(&store, "other", "c1").await, (size(1, 2), size(1, 2)));
    assert_eq!(
        usage(&store, "echo", "nowhere").await,
        (KvSize::default(), size(2, 12))
    );
}

pub async fn retention_removes_old_dead_letters_and_idle_conversations_with_their_kv(db: TestDb) {
    let store = db.open().await;
    // Idle since before the cut: a conversation with two plugins' KV and
    // a dead letter, and one whose later event is still pending.
    complete_kv(
        &store,
        "old1",
        "old",
        vec![
            kv("echo", "old", vec![set("a", "12345"), set("b", "1")]),
            kv("other", "old", vec![set("c", "1")]),
        ],
    )
    .await;
    handled_in(&store, "old2", "old", 1).await;
    store
        .mark_dead(head_id(&store, "old2/a0").await, Some(400), "no".into())
        .await
        .unwrap();
    complete_kv(
        &store,
        "waiting1",
        "waiting",
        vec![kv("echo", "waiting", vec![set("w", "1")])],
    )
    .await;
    store
        .insert_event(event("waiting2", "waiting"))
        .await
        .unwrap();
    // Idle too, but a follow-up is scheduled: work still to come.
    complete_with(
        &store,
        "timed1",
        "timed",
        ConversationUpdate {
            timers: timers(
                "timed",
                vec![schedule("f", "follow-up", now_ms() + 86_400_000, false)],
            ),
            ..ConversationUpdate::default()
        },
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let cut = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    // Active after the cut: kept, with its KV and its dead letter.
    complete_kv(
        &store,
        "new1",
        "new",
        vec![kv("echo", "new", vec![set("n", "123")])],
    )
    .await;
    handled_in(&store, "new2", "new", 1).await;
    store
        .mark_dead(head_id(&store, "new2/a0").await, Some(400), "no".into())
        .await
        .unwrap();
    assert_eq!(
        usage(&store, "echo", "old").await,
        (size(2, 8), size(4, 14))
    );

    // Nothing asked, nothing removed.
    assert_eq!(
        store.prune(Retention::default()).await.unwrap(),
        Pruned::default()
    );
    let retention = Retention {
        finished_before: None,
        dead_before: Some(cut),
        idle_before: Some(cut),
        ..Retention::default()
    };
    assert_eq!(
        store.prune(retention).await.unwrap(),
        Pruned {
            dead_letters: 1,
            conversations: 1,
            kv_entries: 3,
            ..Pruned::default()
        }
    );
    assert_eq!(store.conversation_state("old").await.unwrap(), None);
    assert_eq!(store.kv_get("echo", "old", "a").await.unwrap(), None);
    assert_eq!(store.kv_get("other", "old", "c").await.unwrap(), None);
    // The plugins' totals lost exactly what went.
    assert_eq!(
        usage(&store, "echo", "old").await,
        (KvSize::default(), size(2, 6))
    );
    assert_eq!(
        usage(&store, "other", "old").await,
        (KvSize::default(), KvSize::default())
    );
    // The conversation with a pending event stays, with its KV; so does
    // the one with a pending timer, and its timer.
    assert!(store.conversation_state("waiting").await.unwrap().is_some());
    assert!(store.conversation_state("timed").await.unwrap().is_some());
    assert_eq!(
        store.timer_names("reminder", "timed").await.unwrap(),
        ["follow-up"]
    );
    assert_eq!(
        store
            .kv_get("echo", "waiting", "w")
            .await
            .unwrap()
            .as_deref(),
        Some("1")
    );
    assert!(store.conversation_state("new").await.unwrap().is_some());
    assert_eq!(usage(&store, "echo", "new").await, (size(1, 4), size(2, 6)));
    let dead = store.dead_letters().await.unwrap();
    assert_eq!(
        dead.iter()
            .map(|a| a.idempotency_key.as_str())
            .collect::<Vec<_>>(),
        ["new2/a0"]
    );
    // A conversation that comes back after retention starts afresh.
    complete_kv(
        &store,
        "old3",
        "old",
        vec![kv("echo", "old", vec![set("a", "1")])],
    )
    .await;
    assert_eq!(usage(&store, "echo", "old").await, (size(1, 2), size(3, 8)));
    assert_eq!(
        store
            .conversation_state("old")
            .await
            .unwrap()
            .unwrap()
            .reason,
        "first event"
    );
    assert_eq!(store.prune(retention).await.unwrap(), Pruned::default());
}

/// A journaled call of `plugin` in `event_key`, answered `status` with
/// `body`.
pub fn call(event_key: &str, plugin: &str, call: u32, status: u16, body: &[u8]) -> JournalEntry {
    JournalEntry {
        event_key: event_key.into(),
        plugin: plugin.into(),
        call,
        request: JournalRequest {
            method: "GET".into(),
            url: format!("https://api.shop.example/orders/{call}"),
            headers: vec![
                (
                    "authorization".into(),
                    "Bearer {{secret:ORDERS_TOKEN}}".into(),
                ),
                (
                    "idempotency-key".into(),
                    format!("{event_key}/{plugin}/{call}"),
                ),
            ],
            body_bytes: 0,
            body_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
        },
        outcome: JournalOutcome::Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_vec(),
        },
        elapsed_ms: 12,
        recorded_at: now_ms(),
    }
}

pub async fn journal_records_replaces_lists_and_survives_reopen(db: TestDb) {
    let store = db.open().await;
    let e1 = "live_chat.new_message:j1";
    // Not UTF-8, with a NUL: bodies are bytes.
    let odd = [0xff, 0x00, b'{', 0xc3];
    for entry in [
        call(e1, "orders", 1, 200, br#"{"status":"shipped"}"#),
        call(e1, "orders", 0, 404, &odd),
        call(e1, "hostile", 0, 500, b""),
        call("live_chat.new_message:j2", "orders", 0, 200, b"other event"),
    ] {
        store.record_call(entry).await.unwrap();
    }
    let mut orders = store.journal(e1, Some("orders")).await.unwrap();
    orders.iter_mut().for_each(|c| c.recorded_at = 0);
    let want = [
        call(e1, "orders", 0, 404, &odd),
        call(e1, "orders", 1, 200, br#"{"status":"shipped"}"#),
    ]
    .map(|mut c| {
        c.recorded_at = 0;
        c
    });
    assert_eq!(orders, want);
    let all: Vec<(String, u32)> = store
        .journal(e1, None)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.plugin, c.call))
        .collect();
    assert_eq!(
        all,
        [
            ("hostile".into(), 0),
            ("orders".into(), 0),
            ("orders".into(), 1)
        ]
    );
    assert!(
        store
            .journal("live_chat.new_message:none", None)
            .await
            .unwrap()
            .is_empty()
    );

    // A call recorded again (a re-run that asked for something else) replaces the first.
    let mut failed = call(e1, "orders", 1, 0, b"");
    failed.outcome = JournalOutcome::Failed {
        refusal: Refusal::Timeout {
            after: std::time::Duration::from_millis(500),
        },
    };
    store.record_call(failed.clone()).await.unwrap();
    store.close();
    drop(store);

    let store = db.open().await;
    let orders = store.journal(e1, Some("orders")).await.unwrap();
    assert_eq!(orders.len(), 2);
    assert_eq!(orders[1].outcome, failed.outcome);
    assert_eq!(orders[1].request, failed.request);
    assert_eq!(orders[1].elapsed_ms, 12);
    match &orders[0].outcome {
        JournalOutcome::Response {
            status,
            headers,
            body,
        } => {
            assert_eq!((*status, body.as_slice()), (404, &odd[..]));
            assert_eq!(
                headers,
                &[("content-type".to_string(), "application/json".to_string())]
            );
        }
        other => panic!("{other:?}"),
    }
}

pub async fn journal_is_pruned_with_finished_events_only(db: TestDb) {
    let store = db.open().await;
    // A finished event's old call goes; a pending event's old call stays
    // (its turn may run again and replay it).
    let done = event("jdone", "c1");
    let pending = event("jpending", "c2");
    let (done_key, pending_key) = (done.key.clone(), pending.key.clone());
    let Inserted::New(seq) = store.insert_event(done).await.unwrap() else {
        panic!()
    };
    store
        .complete_event(
            seq,
            "c1".into(),
            serde_json::json!([]),
            vec![],
            vec![],
            ConversationUpdate::default(),
        )
        .await
        .unwrap();
    store.insert_event(pending).await.unwrap();
    store
        .record_call(call(&done_key, "orders", 0, 200, b"a"))
        .await
        .unwrap();
    store
        .record_call(call(&pending_key, "orders", 0, 200, b"b"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let cut = now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    // Recorded after the cut: stays.
    store
        .record_call(call(&done_key, "orders", 1, 200, b"c"))
        .await
        .unwrap();

    let pruned = store
        .prune(Retention {
            finished_before: Some(cut),
            ..Retention::default()
        })
        .await
        .unwrap();
    assert_eq!(pruned.calls, 1, "{pruned:?}");
    let left: Vec<u32> = store
        .journal(&done_key, None)
        .await
        .unwrap()
        .iter()
        .map(|c| c.call)
        .collect();
    assert_eq!(left, [1]);
    assert_eq!(store.journal(&pending_key, None).await.unwrap().len(), 1);
    assert_eq!(
        store
            .prune(Retention {
                finished_before: Some(cut),
                ..Retention::default()
            })
            .await
            .unwrap()
            .calls,
        0
    );
}

fn schedule(id: &str, name: &str, due_at: i64, cancel: bool) -> TimerOp {
    TimerOp::Schedule {
        id: id.into(),
        name: name.into(),
        due_at,
        payload: format!("p-{id}"),
        cancel_on_customer_message: cancel,
    }
}

fn timers(conv: &str, ops: Vec<TimerOp>) -> Vec<TimerChanges> {
    vec![TimerChanges {
        plugin: "reminder".into(),
        conversation_id: conv.into(),
        ops,
    }]
}

pub async fn timers_fire_once_held_for_humans_cancelled_by_messages_dropped_at_archive(db: TestDb) {
    let store = db.open().await;
    let now = now_ms();
    // Scheduled with an event (not a customer message: nothing cancelled).
    complete_with(
        &store,
        "s1",
        "t",
        ConversationUpdate {
            timers: timers(
                "t",
                vec![
                    schedule("a", "follow-up", now + 1000, true),
                    schedule("b", "keep", now + 1000, false),
                    schedule("c", "gone", now + 1000, false),
                    TimerOp::Cancel {
                        name: "gone".into(),
                    },
                    // Same name: replaces `b`.
                    schedule("b2", "keep", now + 2000, false),
                ],
            ),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert_eq!(
        store.timer_names("reminder", "t").await.unwrap(),
        ["follow-up", "keep"]
    );
    assert!(store.timer_names("other", "t").await.unwrap().is_empty());
    let detail = store.conversation("t").await.unwrap();
    let ids: Vec<&str> = detail.timers.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["a", "b2"]);
    assert_eq!(detail.timers[1].payload, "p-b2");
    assert!(detail.timers[0].cancel_on_customer_message);

    // Not due yet: nothing fires.
    assert!(store.fire_due_timers(now, 10).await.unwrap().is_empty());

    // A customer message cancels `follow-up`, not `keep`.
    complete_with(
        &store,
        "m1",
        "t",
        ConversationUpdate {
            customer_at: Some(now),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert_eq!(store.timer_names("reminder", "t").await.unwrap(), ["keep"]);

    // Due: it fires once, as a pending event of its conversation, and
    // survives a reopen as that event, not as a timer.
    let fired = store.fire_due_timers(now + 5000, 10).await.unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].event.key, "timer:b2");
    let digibot_domain::event::EventKind::Timer(t) = &fired[0].event.kind else {
        panic!("not a timer event: {:?}", fired[0].event)
    };
    assert_eq!((t.name.as_str(), t.payload.as_str()), ("keep", "p-b2"));
    assert!(
        store
            .fire_due_timers(now + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.close();
    let store = db.open().await;
    assert!(
        store
            .fire_due_timers(now + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let pending = store.pending_events().await.unwrap();
    assert_eq!(
        pending.iter().filter(|e| e.event.key == "timer:b2").count(),
        1
    );

    // Held while a human is in charge, fired once the bot has it back.
    complete_with(
        &store,
        "h1",
        "h",
        ConversationUpdate {
            change: Some(StateChange {
                from: None,
                to: ConversationState::Human,
                reason: "test".into(),
            }),
            timers: timers("h", vec![schedule("h-t", "later", now, false)]),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert!(
        store
            .fire_due_timers(now + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.release("h", "test".into()).await.unwrap(),
        Release::Released
    );
    let fired = store.fire_due_timers(now + 5000, 10).await.unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].event.key, "timer:h-t");

    // Archiving drops a conversation's timers.
    complete_with(
        &store,
        "z1",
        "z",
        ConversationUpdate {
            timers: timers("z", vec![schedule("z-t", "later", now, false)]),
            ..ConversationUpdate::default()
        },
    )
    .await;
    complete_with(
        &store,
        "z2",
        "z",
        ConversationUpdate {
            change: Some(StateChange {
                from: None,
                to: ConversationState::Closed,
                reason: "archived".into(),
            }),
            archive: Some("archived: test".into()),
            ..ConversationUpdate::default()
        },
    )
    .await;
    assert!(store.conversation("z").await.unwrap().timers.is_empty());
    assert!(
        store
            .fire_due_timers(now + 5000, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn history_is_the_conversations_messages_oldest_first_and_bounded(db: TestDb) {
    let store = db.open().await;
    for n in 0..3 {
        let Inserted::New(seq) = store
            .insert_event(event(&format!("hm{n}"), "hist"))
            .await
            .unwrap()
        else {
            panic!("duplicate")
        };
        let reply = NewAction {
            plugin: "echo".into(),
            idempotency_key: format!("hm{n}/echo/0"),
            method: "POST".into(),
            path: "/v1/messages".into(),
            body: serde_json::json!({"conversation_id": "hist", "type": "text", "body": format!("reply {n}"), "send_to_third": true}),
        };
        store
            .complete_event(
                seq,
                "hist".into(),
                serde_json::json!([]),
                vec![reply],
                vec![],
                ConversationUpdate::default(),
            )
            .await
            .unwrap();
    }
    handled_in(&store, "other1", "other", 0).await;
    let history = store.history("hist", 100).await.unwrap();
    let seen: Vec<(digibot_domain::history::Author, Option<&str>)> = history
        .iter()
        .map(|e| (e.author, e.text.as_deref()))
        .collect();
    use digibot_domain::history::Author::{Bot, Customer};
    assert_eq!(
        seen,
        [
            (Customer, Some("hi")),
            (Bot, Some("reply 0")),
            (Customer, Some("hi")),
            (Bot, Some("reply 1")),
            (Customer, Some("hi")),
            (Bot, Some("reply 2")),
        ]
    );
    let last = store.history("hist", 2).await.unwrap();
    assert_eq!(last, history[4..]);
    assert!(store.history("nobody", 10).await.unwrap().is_empty());
}

/// A hand-back (the release command committed with its event, or an
/// operator's release) records one `digibot.resumed` event in its
/// transaction: when the human took over, and the messages since.
pub async fn a_hand_back_records_one_resume_event_with_the_human_turn(db: TestDb) {
    use digibot_domain::event::EventKind;
    use digibot_domain::resume::{Cause, Resumed};
    let store = db.open().await;
    let resumed = async |conv: &str| -> Vec<(i64, Resumed)> {
        store
            .pending_in(conv)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|s| match s.event.kind {
                EventKind::Resumed(r) => Some((s.seq, r)),
                _ => None,
            })
            .collect()
    };
    handled_in(&store, "r0", "c", 0).await;
    assert!(
        complete_with(&store, "r1", "c", takeover("agent wrote"))
            .await
            .changed
    );
    let taken = store
        .conversation_state("c")
        .await
        .unwrap()
        .unwrap()
        .changed_at;
    let wrote = |customer: bool| ConversationUpdate {
        customer_at: customer.then(now_ms),
        agent_at: (!customer).then(now_ms),
        ..ConversationUpdate::default()
    };
    // Two customer messages and an agent's while the human has it.
    complete_with(&store, "r2", "c", wrote(true)).await;
    complete_with(&store, "r3", "c", wrote(true)).await;
    complete_with(&store, "r4", "c", wrote(false)).await;
    assert!(resumed("c").await.is_empty());

    // The release command, an agent's note, counts as the fourth.
    let release = ConversationUpdate {
        change: Some(StateChange {
            from: Some(ConversationState::Human),
            to: ConversationState::Bot,
            reason: "release command from Ann (message r5)".into(),
        }),
        ..wrote(false)
    };
    assert!(complete_with(&store, "r5", "c", release).await.changed);
    let found = resumed("c").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let (seq, r) = &found[0];
    assert_eq!(
        (r.cause, r.messages, r.taken_at, r.conversation_id.as_str()),
        (Cause::Command, 4, taken, "c")
    );
    assert!(r.released_at >= taken);
    let stored = store
        .event(&Resumed::key("c", taken))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.seq, *seq);
    store
        .complete_event(
            *seq,
            "c".into(),
            serde_json::json!([]),
            vec![],
            vec![],
            ConversationUpdate::default(),
        )
        .await
        .unwrap();

    // Taken over again, then an operator releases it: another, with no
    // message in between; a second release records nothing.
    assert!(
        complete_with(&store, "r6", "c", takeover("agent wrote again"))
            .await
            .changed
    );
    assert_eq!(
        store
            .release("c", "released through the admin API".into())
            .await
            .unwrap(),
        Release::Released
    );
    assert_eq!(
        store.release("c", "again".into()).await.unwrap(),
        Release::NotHuman(ConversationState::Bot)
    );
    let found = resumed("c").await;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].1.cause, found[0].1.messages),
        (Cause::Operator, 0)
    );

    // Other changes of hands record none: a reopening, an archiving.
    let closed = ConversationUpdate {
        change: Some(StateChange {
            from: None,
            to: ConversationState::Closed,
            reason: "archived".into(),
        }),
        ..ConversationUpdate::default()
    };
    complete_with(&store, "r7", "d", closed).await;
    let reopened = ConversationUpdate {
        change: Some(StateChange {
            from: Some(ConversationState::Closed),
            to: ConversationState::Bot,
            reason: "reopened".into(),
        }),
        ..ConversationUpdate::default()
    };
    assert!(complete_with(&store, "r8", "d", reopened).await.changed);
    assert!(resumed("d").await.is_empty());
}

fn set_in(scope: &KvScope, key: &str, value: &str, expires_at: Option<i64>) -> KvWrite {
    KvWrite::Set {
        scope: scope.clone(),
        key: key.into(),
        value: value.into(),
        expires_at,
    }
}

async fn get_in(
    store: &Store,
    plugin: &str,
    conv: &str,
    scope: &KvScope,
    key: &str,
) -> Option<String> {
    store.kv_get_in(plugin, conv, scope, key).await.unwrap()
}

async fn usage_in(store: &Store, plugin: &str, conv: &str, scope: &KvScope) -> (KvSize, KvSize) {
    let u = store.kv_usage_in(plugin, conv, scope).await.unwrap();
    (u.scope, u.plugin)
}

pub async fn kv_scopes_are_each_plugins_own_and_counted_per_scope(db: TestDb) {
    let store = db.open().await;
    let salma = KvScope::Customer("thd_salma".into());
    let omar = KvScope::Customer("thd_omar".into());
    // One turn: echo writes its conversation, Salma's memory and its
    // shared scope, all under the key "k"; other writes Salma's memory.
    complete_kv(
        &store,
        "s1",
        "c1",
        vec![
            kv(
                "echo",
                "c1",
                vec![
                    set("k", "conv"),
                    set_in(&salma, "k", "fr", None),
                    set_in(&KvScope::Plugin, "k", "41", None),
                    set_in(&KvScope::Plugin, "k", "42", None),
                ],
            ),
            kv("other", "c1", vec![set_in(&salma, "k", "other's", None)]),
        ],
    )
    .await;
    // Each scope holds its own "k"; another conversation of Salma reads
    // her memory, not c1's conversation value.
    assert_eq!(
        get_in(&store, "echo", "c1", &KvScope::Conversation, "k")
            .await
            .as_deref(),
        Some("conv")
    );
    assert_eq!(
        get_in(&store, "echo", "c2", &salma, "k").await.as_deref(),
        Some("fr")
    );
    assert_eq!(
        get_in(&store, "echo", "c2", &KvScope::Plugin, "k")
            .await
            .as_deref(),
        Some("42")
    );
    assert_eq!(
        get_in(&store, "echo", "c2", &KvScope::Conversation, "k").await,
        None
    );
    // Plugin B never reads plugin A's memory of the same customer, nor
    // its shared scope; another customer has none.
    assert_eq!(
        get_in(&store, "other", "c1", &salma, "k").await.as_deref(),
        Some("other's")
    );
    assert_eq!(
        get_in(&store, "other", "c1", &KvScope::Plugin, "k").await,
        None
    );
    assert_eq!(get_in(&store, "echo", "c1", &omar, "k").await, None);
    // Usage per scope; the plugin's total counts every scope: "k"+"conv"
    // is 5, "k"+"fr" 3, "k"+"42" 3.
    assert_eq!(
        usage_in(&store, "echo", "c1", &KvScope::Conversation).await,
        (size(1, 5), size(3, 11))
    );
    assert_eq!(
        usage_in(&store, "echo", "c9", &salma).await,
        (size(1, 3), size(3, 11))
    );
    assert_eq!(
        usage_in(&store, "echo", "c9", &KvScope::Plugin).await,
        (size(1, 3), size(3, 11))
    );
    assert_eq!(
        usage_in(&store, "echo", "c9", &omar).await,
        (KvSize::default(), size(3, 11))
    );
    assert_eq!(
        usage_in(&store, "other", "c9", &salma).await,
        (size(1, 8), size(1, 8))
    );
    // Deleting in one scope leaves the others.
    complete_kv(
        &store,
        "s2",
        "c2",
        vec![kv(
            "echo",
            "c2",
            vec![KvWrite::Delete {
                scope: salma.clone(),
                key: "k".into(),
            }],
        )],
    )
    .await;
    assert_eq!(get_in(&store, "echo", "c1", &salma, "k").await, None);
    assert_eq!(
        get_in(&store, "other", "c1", &salma, "k").await.as_deref(),
        Some("other's")
    );
    assert_eq!(
        usage_in(&store, "echo", "c9", &salma).await,
        (KvSize::default(), size(2, 8))
    );
    // Survives a reopen.
    store.close();
    let store = db.open().await;
    assert_eq!(
        get_in(&store, "echo", "c3", &KvScope::Plugin, "k")
            .await
            .as_deref(),
        Some("42")
    );
    assert_eq!(
        usage_in(&store, "echo", "c9", &KvScope::Plugin).await,
        (size(1, 3), size(2, 8))
    );
}

pub async fn kv_values_expire_and_retention_removes_them_and_idle_customers(db: TestDb) {
    let store = db.open().await;
    let salma = KvScope::Customer("thd_salma".into());
    let now = now_ms();
    let (past, future) = (Some(now - 1), Some(now + 3_600_000));
    complete_kv(
        &store,
        "t1",
        "c1",
        vec![kv(
            "echo",
            "c1",
            vec![
                set_in(&KvScope::Conversation, "gone", "1", past),
                set_in(&KvScope::Conversation, "kept", "1", future),
                set_in(&salma, "gone", "1", past),
                set_in(&salma, "kept", "1", future),
                set_in(&KvScope::Plugin, "gone", "1", past),
                set_in(&KvScope::Plugin, "forever", "1", None),
            ],
        )],
    )
    .await;
    // An expired value reads as absent at once; it counts until retention.
    for scope in [&KvScope::Conversation, &salma, &KvScope::Plugin] {
        assert_eq!(
            get_in(&store, "echo", "c1", scope, "gone").await,
            None,
            "{scope:?}"
        );
    }
    assert_eq!(
        get_in(&store, "echo", "c1", &salma, "kept")
            .await
            .as_deref(),
        Some("1")
    );
    // "gone"+"1" and "kept"+"1" are 5 bytes, "forever"+"1" 8.
    assert_eq!(
        usage_in(&store, "echo", "c1", &salma).await,
        (size(2, 10), size(6, 33))
    );
    // Setting it again (without a TTL) brings it back.
    complete_kv(
        &store,
        "t2",
        "c1",
        vec![kv(
            "echo",
            "c1",
            vec![set_in(&KvScope::Plugin, "gone", "2", None)],
        )],
    )
    .await;
    assert_eq!(
        get_in(&store, "echo", "c1", &KvScope::Plugin, "gone")
            .await
            .as_deref(),
        Some("2")
    );
    let pruned = store
        .prune(Retention {
            expired_before: Some(now_ms()),
            ..Retention::default()
        })
        .await
        .unwrap();
    assert_eq!(pruned.kv_expired, 2, "{pruned:?}");
    assert_eq!(
        usage_in(&store, "echo", "c1", &KvScope::Conversation).await,
        (size(1, 5), size(4, 23))
    );
    assert_eq!(
        usage_in(&store, "echo", "c1", &salma).await,
        (size(1, 5), size(4, 23))
    );
    assert_eq!(
        usage_in(&store, "echo", "c1", &KvScope::Plugin).await,
        (size(2, 13), size(4, 23))
    );
    // Nothing is left to expire.
    let again = store
        .prune(Retention {
            expired_before: Some(now_ms()),
            ..Retention::default()
        })
        .await
        .unwrap();
    assert_eq!(again.kv_expired, 0);

    // A customer memory not written since the cut-off goes, and only the
    // customer scope: the shared scope and the conversation stay.
    complete_kv(
        &store,
        "t3",
        "c2",
        vec![kv("other", "c2", vec![set_in(&salma, "lang", "fr", None)])],
    )
    .await;
    let pruned = store
        .prune(Retention {
            customer_idle_before: Some(now_ms() + 1),
            ..Retention::default()
        })
        .await
        .unwrap();
    assert_eq!(pruned.customer_entries, 2, "{pruned:?}");
    assert_eq!(get_in(&store, "echo", "c1", &salma, "kept").await, None);
    assert_eq!(get_in(&store, "other", "c2", &salma, "lang").await, None);
    assert_eq!(
        usage_in(&store, "echo", "c1", &salma).await,
        (KvSize::default(), size(3, 18))
    );
    assert_eq!(
        usage_in(&store, "other", "c1", &salma).await,
        (KvSize::default(), KvSize::default())
    );
    assert_eq!(
        get_in(&store, "echo", "c1", &KvScope::Plugin, "forever")
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        get_in(&store, "echo", "c1", &KvScope::Conversation, "kept")
            .await
            .as_deref(),
        Some("1")
    );
    // A memory written after the cut-off stays.
    let cut = now_ms() - 60_000;
    complete_kv(
        &store,
        "t4",
        "c3",
        vec![kv("echo", "c3", vec![set_in(&salma, "lang", "ar", None)])],
    )
    .await;
    let pruned = store
        .prune(Retention {
            customer_idle_before: Some(cut),
            ..Retention::default()
        })
        .await
        .unwrap();
    assert_eq!(pruned.customer_entries, 0);
    assert_eq!(
        get_in(&store, "echo", "c4", &salma, "lang")
            .await
            .as_deref(),
        Some("ar")
    );
}

pub async fn kv_customer_writes_from_many_conversations_at_once_keep_exact_usage(db: TestDb) {
    let store = db.open().await;
    let salma = KvScope::Customer("thd_salma".into());
    let mut tasks = Vec::new();
    for i in 0..24 {
        let store = store.clone();
        let salma = salma.clone();
        tasks.push(tokio::spawn(async move {
            // Every conversation overwrites one key (its value's length
            // differs), adds one key of its own, and bumps a shared one.
            let writes = vec![
                set_in(&salma, "last", &"x".repeat(i + 1), None),
                set_in(&salma, &format!("k{i}"), "v", None),
                set_in(&KvScope::Plugin, "seen", &i.to_string(), None),
            ];
            let conv = format!("c{i}");
            complete_kv(
                &store,
                &format!("m{i}"),
                &conv,
                vec![kv("echo", &conv, writes)],
            )
            .await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Last committed write wins: one of the values, whole.
    let last = get_in(&store, "echo", "c0", &salma, "last").await.unwrap();
    assert!(last.len() <= 24 && last.chars().all(|c| c == 'x'), "{last}");
    let seen = get_in(&store, "echo", "c0", &KvScope::Plugin, "seen")
        .await
        .unwrap();
    // The counts are those of the rows as they are: 25 keys for Salma.
    // "k0"+"v" .. "k9"+"v" are 3 bytes, "k10"+"v" .. "k23"+"v" 4.
    let customer_bytes = 4 + last.len() as i64 + 10 * 3 + 14 * 4;
    let shared_bytes = 4 + seen.len() as i64;
    assert_eq!(
        usage_in(&store, "echo", "c0", &salma).await,
        (
            size(25, customer_bytes),
            size(26, customer_bytes + shared_bytes)
        )
    );
    assert_eq!(
        usage_in(&store, "echo", "c0", &KvScope::Plugin).await.0,
        size(1, shared_bytes)
    );
}

pub async fn a_conversation_keeps_the_customer_an_event_named(db: TestDb) {
    let store = db.open().await;
    for (id, customer) in [("n1", Some("thd_salma")), ("n2", None)] {
        let Inserted::New(seq) = store.insert_event(event(id, "c1")).await.unwrap() else {
            panic!()
        };
        store
            .complete_event(
                seq,
                "c1".into(),
                serde_json::json!([]),
                vec![],
                vec![],
                ConversationUpdate {
                    customer_id: customer.map(str::to_string),
                    ..ConversationUpdate::default()
                },
            )
            .await
            .unwrap();
        // An event that names none (an agent's, a timer) keeps it.
        let record = store.conversation_state("c1").await.unwrap().unwrap();
        assert_eq!(record.customer_id.as_deref(), Some("thd_salma"));
    }
    handled_in(&store, "n3", "c2", 0).await;
    let record = store.conversation_state("c2").await.unwrap().unwrap();
    assert_eq!(record.customer_id, None);
}

fn rollout_record(plugin: &str, id: &str) -> RolloutRecord {
    RolloutRecord {
        plugin: plugin.into(),
        id: id.into(),
        mode: "shadow".into(),
        percent: 0,
        candidate: "ab".repeat(32),
        state: "active".into(),
        reason: None,
        started_at: 1,
        changed_at: 1,
        same: 0,
        different: 0,
        failed: 0,
    }
}

fn comparison(plugin: &str, id: &str, event_key: &str, verdict: &str) -> Comparison {
    Comparison {
        plugin: plugin.into(),
        rollout: id.into(),
        event_key: event_key.into(),
        conversation_id: "c".into(),
        verdict: verdict.into(),
        serving: serde_json::json!([{"text": "serving"}]),
        candidate: serde_json::json!([{"text": verdict}]),
        reason: None,
        at: 5,
    }
}

pub async fn rollouts_count_each_event_once_end_once_and_survive_reopen(db: TestDb) {
    let store = db.open().await;
    assert_eq!(store.rollout("echo").await.unwrap(), None);
    // No rollout: nothing to compare against.
    assert!(
        !store
            .record_comparison(comparison("echo", "r1", "e0", "same"))
            .await
            .unwrap()
    );
    store
        .start_rollout(rollout_record("echo", "r1"), b"wasm-1".to_vec())
        .await
        .unwrap();
    for (key, verdict) in [("e1", "same"), ("e2", "different"), ("e3", "failed")] {
        assert!(
            store
                .record_comparison(comparison("echo", "r1", key, verdict))
                .await
                .unwrap()
        );
    }
    // The same event compared again (a re-run, another replica): once.
    assert!(
        !store
            .record_comparison(comparison("echo", "r1", "e2", "same"))
            .await
            .unwrap()
    );
    let r = store.rollout("echo").await.unwrap().unwrap();
    assert_eq!((r.same, r.different, r.failed), (1, 1, 1));
    let listed = store.comparisons("echo", "r1", 2).await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|c| c.event_key.as_str()).collect();
    assert_eq!(keys, ["e3", "e2"], "newest first, bounded");
    assert_eq!(
        listed[1].candidate,
        serde_json::json!([{"text": "different"}])
    );
    assert_eq!(listed[1].serving, serde_json::json!([{"text": "serving"}]));
    assert_eq!(
        store.rollout_bytes("echo", "r1").await.unwrap().as_deref(),
        Some(&b"wasm-1"[..])
    );
    assert_eq!(store.rollout_bytes("echo", "r0").await.unwrap(), None);
    // Ended once: a second end (another replica) changes nothing.
    assert!(
        store
            .end_rollout("echo", "r1", "rolled_back", Some("why".into()))
            .await
            .unwrap()
    );
    assert!(
        !store
            .end_rollout("echo", "r1", "aborted", None)
            .await
            .unwrap()
    );
    store.close();
    drop(store);
    let store = db.open().await;
    let r = store.rollout("echo").await.unwrap().unwrap();
    assert_eq!(r.state, "rolled_back");
    assert_eq!(r.reason.as_deref(), Some("why"));
    // A new rollout replaces the old one and its comparisons.
    store
        .start_rollout(rollout_record("echo", "r2"), b"wasm-2".to_vec())
        .await
        .unwrap();
    store
        .start_rollout(rollout_record("greeter", "g1"), b"wasm-g".to_vec())
        .await
        .unwrap();
    let all = store.rollouts().await.unwrap();
    let ids: Vec<(&str, &str, u64)> = all
        .iter()
        .map(|r| (r.plugin.as_str(), r.id.as_str(), r.same))
        .collect();
    assert_eq!(ids, [("echo", "r2", 0), ("greeter", "g1", 0)]);
    assert!(
        store
            .comparisons("echo", "r1", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.rollout("echo").await.unwrap().unwrap().state,
        "active"
    );
}

pub async fn a_pin_is_set_once_per_conversation_and_plugin_and_dropped_by_unpin(db: TestDb) {
    let store = db.open().await;
    assert_eq!(store.pin_version("echo", "c1", "v1").await.unwrap(), "v1");
    // Pinned: a later version does not replace it.
    assert_eq!(store.pin_version("echo", "c1", "v2").await.unwrap(), "v1");
    // Another conversation, another plugin: their own pins.
    assert_eq!(store.pin_version("echo", "c2", "v2").await.unwrap(), "v2");
    assert_eq!(store.pin_version("orders", "c1", "o7").await.unwrap(), "o7");
    // Many at once on a new conversation: one wins, all answer it.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.pin_version("echo", "c3", &format!("r{i}")).await })
        })
        .collect();
    let mut answers = std::collections::BTreeSet::new();
    for r in racers {
        answers.insert(r.await.unwrap().unwrap());
    }
    assert_eq!(answers.len(), 1, "{answers:?}");
    let store = db.open().await;
    assert_eq!(
        store.pins("c1").await.unwrap(),
        vec![("echo".into(), "v1".into()), ("orders".into(), "o7".into())]
    );
    assert_eq!(store.unpin("c1").await.unwrap(), 2);
    assert_eq!(store.pins("c1").await.unwrap(), vec![]);
    assert_eq!(store.pin_version("echo", "c1", "v2").await.unwrap(), "v2");
    assert_eq!(
        store.pins("c2").await.unwrap(),
        vec![("echo".into(), "v2".into())]
    );
}

fn agent_event(id: &str, conv: &str) -> Event {
    Event::parse(
        format!(
            r#"{{"event":"live_chat.new_message","data":{{"id":"{id}","data":{{"conversation_id":"{conv}","body":"Ici Karim","sender":{{"model_type":"user","name":"Karim"}}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

/// `insert_judged` either handles the agent message in its insert's
/// transaction (judged once, with the conversation's state and whether the
/// id is one digibot sent) or records it pending for a lane; never both,
/// and a redelivery is a duplicate that is not judged again.
pub async fn an_agent_message_judged_at_insert_is_handled_once_or_left_pending(db: TestDb) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = db.open().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let judge = |calls: &Arc<AtomicUsize>| -> crate::Judge {
        let calls = calls.clone();
        Box::new(move |state, own| {
            calls.fetch_add(1, Ordering::SeqCst);
            assert_eq!(
                (state, own),
                (None, false),
                "a new conversation, not our message"
            );
            takeover("Karim wrote")
        })
    };
    let agent = agent_event("ag1", "cj");
    let key = agent.key.clone();
    match store
        .insert_judged(agent.clone(), judge(&calls))
        .await
        .unwrap()
    {
        crate::Judged::Handled {
            seq,
            from,
            update,
            changed,
        } => {
            assert!(seq > 0 && changed, "the takeover applied");
            assert_eq!(from, ConversationState::Bot);
            assert_eq!(update.change.unwrap().to, ConversationState::Human);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert!(store.pending_event(&key).await.unwrap().is_none());
            assert!(store.pending_events().await.unwrap().is_empty());
            let handled = store.event(&key).await.unwrap().unwrap();
            assert_eq!(handled.seq, seq);
            for state in [
                store.conversation_state("cj").await.unwrap().unwrap(),
                store
                    .cached_conversation_state("cj")
                    .await
                    .unwrap()
                    .unwrap(),
            ] {
                assert_eq!(
                    (state.state, state.reason.as_str()),
                    (ConversationState::Human, "Karim wrote")
                );
                assert!(state.last_agent_at.is_some());
            }
        }
        crate::Judged::Pending(seq) => {
            assert_eq!(calls.load(Ordering::SeqCst), 0, "judged and left pending");
            assert_eq!(store.pending_event(&key).await.unwrap().unwrap().seq, seq);
            assert_eq!(store.conversation_state("cj").await.unwrap(), None);
        }
        crate::Judged::Duplicate => panic!("a first delivery is not a duplicate"),
    }
    let before = calls.load(Ordering::SeqCst);
    assert_eq!(
        store.insert_judged(agent, judge(&calls)).await.unwrap(),
        crate::Judged::Duplicate
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "a duplicate is not judged"
    );
}

/// Two handles on one database (another process: `digibot conversations
/// release` beside the server). What one handle's cached read says may be
/// stale; a completion that expects it is then refused (nothing applied,
/// the event still pending) and the next read is fresh. A completion that
/// expects the state the conversation is in applies.
pub async fn a_completion_is_never_applied_on_a_state_changed_behind_the_cache(db: TestDb) {
    let server = db.open().await;
    let cli = db.open().await;
    complete_with(&server, "t1", "cs", takeover("agent wrote")).await;
    let cached = server
        .cached_conversation_state("cs")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cached.state, ConversationState::Human);
    assert_eq!(
        cli.release("cs", "released from the CLI".into())
            .await
            .unwrap(),
        Release::Released
    );
    let read = server
        .cached_conversation_state("cs")
        .await
        .unwrap()
        .unwrap();
    let t2 = event("t2", "cs");
    let t2_key = t2.key.clone();
    let Inserted::New(seq) = server.insert_event(t2).await.unwrap() else {
        panic!("t2 is a duplicate")
    };
    // The customer's message, completed as decided in `expect`.
    let complete = |expect: ConversationState| {
        server.complete_event(
            seq,
            "cs".into(),
            serde_json::json!([]),
            vec![action("cs/t2")],
            vec![],
            ConversationUpdate {
                customer_at: Some(now_ms()),
                expect: Some(expect),
                ..ConversationUpdate::default()
            },
        )
    };
    let done = complete(read.state).await.unwrap();
    if read.state == ConversationState::Bot {
        // A back end that read afresh: it applied.
        assert!(
            done.completed && !done.stale && done.queued == 1,
            "{done:?}"
        );
        return;
    }
    // Stale: refused, nothing queued, still pending; read afresh now.
    assert_eq!(
        done,
        Completed {
            stale: true,
            ..Completed::default()
        }
    );
    assert_eq!(
        server.pending_event(&t2_key).await.unwrap().unwrap().seq,
        seq
    );
    assert!(server.outbox_heads(10).await.unwrap().is_empty());
    let fresh = server
        .cached_conversation_state("cs")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.state, ConversationState::Bot);
    // Expecting the state it is in: applied.
    let done = complete(ConversationState::Bot).await.unwrap();
    assert!(
        done.completed && !done.stale && done.queued == 1,
        "{done:?}"
    );
    assert!(server.pending_event(&t2_key).await.unwrap().is_none());
    assert_eq!(
        server.cached_conversation_state("cs").await.unwrap(),
        server.conversation_state("cs").await.unwrap()
    );
}
