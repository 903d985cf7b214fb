//! Hostile test plugin: a `digishare:bot@0.2.0` component written by hand
//! (WebAssembly text), with as many core instances, linear memories and
//! tables as asked. A Rust (or Python, or JavaScript) guest has one memory
//! and a few tables; an attacker writing components by hand can have
//! hundreds, each one a slot of the host's instance pool, so that one
//! instance of it takes every slot and no other plugin instantiates.
//!
//! The bot itself is real: it exports both handlers with the world's exact
//! types (imported from `digishare:bot/types`, as every SDK does), lifts
//! them with the canonical ABI, and answers every event with no actions,
//! or, with [`Shape::spin`], loops until its deadline while holding its
//! slots.

/// What the component is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Linear memories (at least 1: the bot's own).
    pub memories: usize,
    /// Tables.
    pub tables: usize,
    /// Core instances in all (at least one per memory and table, plus the
    /// bot's: more adds empty instances).
    pub core_instances: usize,
    /// Loop forever in both handlers instead of answering.
    pub spin: bool,
}

impl Shape {
    /// The smallest shape: one instance, one memory, no table.
    pub const MINIMAL: Shape = Shape {
        memories: 1,
        tables: 0,
        core_instances: 1,
        spin: false,
    };

    /// `n` memories (and the instances they need).
    pub fn memories(n: usize) -> Shape {
        Shape {
            memories: n.max(1),
            core_instances: n.max(1),
            ..Shape::MINIMAL
        }
    }

    /// Core instances the text below creates.
    pub fn instances_created(&self) -> usize {
        self.core_instances.max(self.memories.max(1) + self.tables)
    }
}

/// The types of `digishare:bot/types@0.2.0` that the exports use, as an
/// instance type's declarations: each type is exported (with `eq`) before
/// another refers to it, which is what makes it nameable in an export.
const TYPES: &str = r#"
    (type $conversation-state' (enum "bot" "human" "closed"))
    (export "conversation-state" (type $conversation-state (eq $conversation-state')))
    (type $sender-kind' (enum "customer" "agent" "system" "other"))
    (export "sender-kind" (type $sender-kind (eq $sender-kind')))
    (type $sender' (record (field "kind" $sender-kind) (field "name" (option string)) (field "id" (option string))))
    (export "sender" (type $sender (eq $sender')))
    (type $location' (record (field "latitude" f64) (field "longitude" f64) (field "name" (option string)) (field "address" (option string))))
    (export "location" (type $location (eq $location')))
    (type $choice' (record (field "id" string) (field "title" string) (field "description" (option string))))
    (export "choice" (type $choice (eq $choice')))
    (type $media-kind' (enum "image" "webp" "video" "audio" "pdf" "other"))
    (export "media-kind" (type $media-kind (eq $media-kind')))
    (type $media' (record (field "kind" $media-kind) (field "file-name" (option string)) (field "mime-type" (option string)) (field "size" (option u64)) (field "storage-path" (option string)) (field "is-voice" bool)))
    (export "media" (type $media (eq $media')))
    (type $phone' (record (field "number" string) (field "kind" (option string))))
    (export "phone" (type $phone (eq $phone')))
    (type $contact' (record (field "name" string) (field "phones" (list $phone))))
    (export "contact" (type $contact (eq $contact')))
    (type $unknown-content' (record (field "type-name" string) (field "raw-json" string)))
    (export "unknown-content" (type $unknown-content (eq $unknown-content')))
    (type $content' (variant
        (case "text" string) (case "location" $location) (case "button-reply" $choice)
        (case "list-reply" $choice) (case "media" $media) (case "sticker")
        (case "contacts" (list $contact)) (case "unsupported" (list string))
        (case "unknown" $unknown-content)))
    (export "content" (type $content (eq $content')))
    (type $message' (record (field "id" string) (field "conversation-id" string) (field "sender" $sender) (field "created-at" (option string)) (field "content" $content)))
    (export "message" (type $message (eq $message')))
    (type $conversation' (record (field "id" string) (field "customer-id" string) (field "customer-name" (option string)) (field "channel" (option string)) (field "platform-id" (option string)) (field "created-at" (option string))))
    (export "conversation" (type $conversation (eq $conversation')))
    (type $new-conversation-event' (record (field "event-id" string) (field "conversation" $conversation) (field "state" $conversation-state)))
    (export "new-conversation-event" (type $new-conversation-event (eq $new-conversation-event')))
    (type $message-event' (record (field "event-id" string) (field "message" $message) (field "state" $conversation-state)))
    (export "message-event" (type $message-event (eq $message-event')))
    (type $text-reply' (record (field "body" string) (field "reply-to" (option string))))
    (export "text-reply" (type $text-reply (eq $text-reply')))
    (type $button' (record (field "id" string) (field "title" string)))
    (export "button" (type $button (eq $button')))
    (type $buttons-reply' (record (field "header" (option string)) (field "body" string) (field "buttons" (list $button))))
    (export "buttons-reply" (type $buttons-reply (eq $buttons-reply')))
    (type $list-row' (record (field "id" string) (field "title" string) (field "description" (option string))))
    (export "list-row" (type $list-row (eq $list-row')))
    (type $list-section' (record (field "title" string) (field "rows" (list $list-row))))
    (export "list-section" (type $list-section (eq $list-section')))
    (type $list-reply' (record (field "header" (option string)) (field "body" string) (field "button" string) (field "sections" (list $list-section))))
    (export "list-reply" (type $list-reply (eq $list-reply')))
    (type $file-reply' (record (field "url" string) (field "file-name" (option string)) (field "extension" (option string)) (field "voice" bool)))
    (export "file-reply" (type $file-reply (eq $file-reply')))
    (type $hand-off' (record (field "user-id" string) (field "as-handler" bool)))
    (export "hand-off" (type $hand-off (eq $hand-off')))
    (type $action' (variant
        (case "text" $text-reply) (case "buttons" $buttons-reply) (case "list" $list-reply)
        (case "location" $location) (case "location-request" string) (case "file" $file-reply)
        (case "note" string) (case "hand-off" $hand-off)))
    (export "action" (type $action (eq $action')))
"#;

/// The bot's core module: a bump allocator for what the host writes into
/// it, and handlers that return `ok([])` (a zeroed return area) or spin.
fn bot_module(spin: bool) -> String {
    let body = if spin {
        "(loop $forever (br $forever)) (i32.const 16)"
    } else {
        "(i32.const 16)"
    };
    format!(
        r#"
  (core module $Bot
    (memory (export "memory") 1)
    (global $next (mut i32) (i32.const 1024))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $ptr i32) (local $end i32)
      (local.set $ptr
        (i32.and (i32.add (global.get $next) (i32.sub (local.get 2) (i32.const 1)))
                 (i32.sub (i32.const 0) (local.get 2))))
      (local.set $end (i32.add (local.get $ptr) (local.get 3)))
      (block $room
        (br_if $room (i32.le_u (local.get $end) (i32.shl (memory.size) (i32.const 16))))
        (br_if $room
          (i32.ne (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end)
                     (i32.shl (memory.size) (i32.const 16))) (i32.const 16)) (i32.const 1)))
                  (i32.const -1)))
        unreachable)
      (global.set $next (local.get $end))
      (local.get $ptr))
    ;; The answer lives at 16: discriminant 0 (ok), list pointer 0, length 0.
    (func (export "on-new-conversation") (param i32) (result i32) {body})
    (func (export "on-message") (param i32) (result i32) {body}))
"#
    )
}

/// The component's text for `shape`.
pub fn component_wat(shape: Shape) -> String {
    let memories = shape.memories.max(1);
    let extra = shape.core_instances.saturating_sub(memories + shape.tables);
    let mut wat = String::from("(component\n");
    wat.push_str(&format!(
        "  (import \"digishare:bot/types@0.2.0\" (instance $types {TYPES}  ))\n"
    ));
    for name in ["message-event", "new-conversation-event", "action"] {
        wat.push_str(&format!(
            "  (alias export $types \"{name}\" (type ${name}))\n"
        ));
    }
    wat.push_str("  (type $answer (result (list $action) (error string)))\n");
    wat.push_str(&bot_module(shape.spin));
    wat.push_str("  (core module $Memory (memory 1))\n");
    wat.push_str("  (core module $Table (table 1 funcref))\n");
    wat.push_str("  (core module $Empty)\n");
    wat.push_str("  (core instance $bot (instantiate $Bot))\n");
    for _ in 1..memories {
        wat.push_str("  (core instance (instantiate $Memory))\n");
    }
    for _ in 0..shape.tables {
        wat.push_str("  (core instance (instantiate $Table))\n");
    }
    for _ in 0..extra {
        wat.push_str("  (core instance (instantiate $Empty))\n");
    }
    wat.push_str(
        r#"  (alias core export $bot "memory" (core memory $memory))
  (alias core export $bot "realloc" (core func $realloc))
  (func $on-new-conversation (param "event" $new-conversation-event) (result $answer)
    (canon lift (core func $bot "on-new-conversation") (memory $memory) (realloc $realloc)))
  (func $on-message (param "event" $message-event) (result $answer)
    (canon lift (core func $bot "on-message") (memory $memory) (realloc $realloc)))
  (export "on-new-conversation" (func $on-new-conversation))
  (export "on-message" (func $on-message))
)
"#,
    );
    wat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_one_instance_per_memory_and_table_and_the_extra_ones() {
        let shape = Shape {
            memories: 3,
            tables: 2,
            core_instances: 8,
            spin: false,
        };
        let wat = component_wat(shape);
        assert_eq!(wat.matches("(instantiate $Memory)").count(), 2);
        assert_eq!(wat.matches("(instantiate $Table)").count(), 2);
        assert_eq!(wat.matches("(instantiate $Empty)").count(), 3);
        assert_eq!(shape.instances_created(), 8);
        assert!(!wat.contains("$forever"));
        assert!(
            component_wat(Shape {
                spin: true,
                ..shape
            })
            .contains("$forever")
        );
    }
}
