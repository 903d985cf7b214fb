//! state-echo in digibot's real runtime, through the test harness: the
//! state the harness sets is the state the SDK hands the plugin, for both
//! events, and a new conversation starts as `bot`.
use digibot_testing::{Action, Bot, ConversationState};

fn text(body: &str) -> Vec<Action> {
    vec![Action::text(body).unwrap()]
}

#[test]
fn the_plugin_is_told_the_state_of_its_conversation() {
    let mut bot = Bot::build(env!("CARGO_MANIFEST_DIR")).expect("state-echo builds and loads");
    assert_eq!(bot.new_conversation("Salma").unwrap(), text("state: bot"));
    assert_eq!(bot.message("hello").unwrap(), text("bot: hello"));
    bot.set_state(ConversationState::Human);
    assert_eq!(bot.message("anyone?").unwrap(), text("human: anyone?"));
    bot.set_state(ConversationState::Closed);
    assert_eq!(bot.message("bye").unwrap(), text("closed: bye"));
    // Every conversation starts in the bot's hands.
    assert_eq!(bot.new_conversation("Youssef").unwrap(), text("state: bot"));
}
