//! A plugin's KV writes: made during a turn, committed with its event.

/// One KV write of a plugin, applied with the event it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    Set { key: String, value: String },
    Delete { key: String },
}

/// The KV writes of one plugin for one conversation.
#[derive(Debug, Clone)]
pub struct KvChanges {
    pub plugin: String,
    pub conversation_id: String,
    pub writes: Vec<KvWrite>,
}
