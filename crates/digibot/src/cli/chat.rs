//! `digibot chat --plugin FILE.wasm [--config KEY=VALUE] [--name CUSTOMER]`: a
//! conversation with a bot in the terminal. It opens with a new-conversation
//! event; each line typed is a customer message. Replies are rendered as a
//! customer (or, for notes and hand-offs, an agent) would see them; buttons
//! and list rows are numbered, and typing a number picks one. KV state is
//! kept across turns. Reads stdin line by line, so it also runs from a pipe.

use super::replay::{PluginArgs, Session, Turn};
use crate::config::Settings;
use clap::Args;
use digibot_domain::actions;
use digibot_domain::event::{Choice, Content, Location};
use digibot_domain::event::{customer_message_event, new_conversation_event};
use digibot_protocol::Action;
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub plugins: PluginArgs,
    /// The customer's name.
    #[arg(long, default_value = "Customer")]
    pub name: String,
}

const HELP: &str = "Type as the customer. A number picks a button or list row; \
/location LAT LON shares a location; /bot hands the conversation back to the bot \
after a hand-off (as the agent's note would); /new starts a new conversation; /quit exits.";

/// A button or list row the customer can pick by number.
#[derive(Debug, Clone, PartialEq)]
enum Pick {
    Button { id: String, title: String },
    Row { id: String, title: String },
}

/// What the customer typed.
#[derive(Debug, PartialEq)]
enum Input {
    Quit,
    Help,
    New,
    Release,
    Send(Content),
    Invalid(String),
}

fn parse_input(line: &str, picks: &[Pick]) -> Input {
    let line = line.trim();
    match line {
        "/quit" | "/exit" => return Input::Quit,
        "/help" => return Input::Help,
        "/new" => return Input::New,
        "/bot" => return Input::Release,
        _ => {}
    }
    if let Some(rest) = line.strip_prefix("/location") {
        let numbers: Vec<f64> = rest
            .split([' ', ','])
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.parse().ok())
            .collect();
        return match numbers[..] {
            [latitude, longitude]
                if digibot_protocol::limits::on_the_globe(latitude, longitude) =>
            {
                Input::Send(Content::Location(Location {
                    latitude,
                    longitude,
                    name: None,
                    address: None,
                }))
            }
            _ => Input::Invalid(
                "usage: /location LATITUDE LONGITUDE (e.g. /location 33.57 -7.59)".into(),
            ),
        };
    }
    if let Some(pick) = line
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| picks.get(i))
    {
        let choice = |id: &str, title: &str| Choice {
            id: id.to_string(),
            title: title.to_string(),
            description: None,
        };
        return Input::Send(match pick {
            Pick::Button { id, title } => Content::ButtonReply(choice(id, title)),
            Pick::Row { id, title } => Content::ListReply(choice(id, title)),
        });
    }
    Input::Send(Content::Text {
        text: line.to_string(),
    })
}

/// Renders what one turn did, and the choices it offers (none: the
/// previous ones stay pickable, as older buttons do in a real chat).
fn render(turn: &Turn, conversation_id: &str, out: &mut String) -> Vec<Pick> {
    let mut picks = Vec::new();
    if turn.duplicate {
        out.push_str("[already delivered: nothing runs]\n");
    }
    for outcome in &turn.handled.outcomes {
        let prefix = format!("{}> ", outcome.plugin);
        let indent = " ".repeat(prefix.chars().count());
        let mut say = |first: bool, text: &str| {
            for (i, line) in text.lines().enumerate() {
                out.push_str(if first && i == 0 { &prefix } else { &indent });
                out.push_str(line);
                out.push('\n');
            }
        };
        match outcome.outcome {
            "failed" => {
                let reason = outcome.reason.as_deref().unwrap_or("");
                say(true, &format!("[plugin failed: {reason}]"));
                continue;
            }
            "filtered" | "skipped" => continue,
            _ => {}
        }
        for (index, action) in outcome.returned.iter().enumerate() {
            if let Err(rejected) =
                actions::to_request(&outcome.plugin, index, conversation_id, action)
            {
                say(true, &format!("[not sent: {rejected}]"));
                continue;
            }
            match action {
                Action::Text { body, reply_to } => match reply_to {
                    Some(id) => say(true, &format!("(replying to {id}) {body}")),
                    None => say(true, body),
                },
                Action::Buttons(b) => {
                    let mut first = true;
                    if let Some(h) = &b.header {
                        say(true, &format!("*{h}*"));
                        first = false;
                    }
                    say(first, &b.body);
                    for button in &b.buttons {
                        picks.push(Pick::Button {
                            id: button.id.clone(),
                            title: button.title.clone(),
                        });
                        say(false, &format!("[{}] {}", picks.len(), button.title));
                    }
                }
                Action::List(l) => {
                    let mut first = true;
                    if let Some(h) = &l.header {
                        say(true, &format!("*{h}*"));
                        first = false;
                    }
                    say(first, &l.body);
                    say(false, &format!("({})", l.button));
                    for section in &l.sections {
                        if !section.title.is_empty() {
                            say(false, &format!("{}:", section.title));
                        }
                        for row in &section.rows {
                            picks.push(Pick::Row {
                                id: row.id.clone(),
                                title: row.title.clone(),
                            });
                            let line = match &row.description {
                                Some(d) => format!("  [{}] {} - {d}", picks.len(), row.title),
                                None => format!("  [{}] {}", picks.len(), row.title),
                            };
                            say(false, &line);
                        }
                    }
                }
                Action::Location(loc) => {
                    let place = [loc.name.as_deref(), loc.address.as_deref()]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(", ");
                    let at = format!("({}, {})", loc.latitude, loc.longitude);
                    say(
                        true,
                        &format!("[location] {}", [place, at].join(" ").trim()),
                    );
                }
                Action::LocationRequest { body } => {
                    say(true, body);
                    say(false, "[asks for your location: type /location LAT LON]");
                }
                Action::File(f) => {
                    let what = if f.voice { "voice note" } else { "file" };
                    match &f.file_name {
                        Some(name) => say(true, &format!("[{what}] {name} {}", f.url.trim())),
                        None => say(true, &format!("[{what}] {}", f.url.trim())),
                    }
                }
                Action::Note { body } => {
                    say(true, &format!("[internal note, agents only] {body}"));
                }
                Action::HandOff {
                    user_id,
                    as_handler,
                } => {
                    let role = if *as_handler {
                        "as the handler"
                    } else {
                        "as a participant"
                    };
                    say(
                        true,
                        &format!("[hand-off] agent {user_id} joins the conversation {role}"),
                    );
                }
            }
        }
    }
    picks
}

/// One conversation after another in the same session (same KV store,
/// scoped per conversation as in the server).
struct Chat {
    session: Session,
    customer: String,
    conversation: u32,
    messages: u64,
    picks: Vec<Pick>,
}

impl Chat {
    fn conversation_id(&self) -> String {
        format!("conv_chat_{}", self.conversation)
    }

    fn start(&mut self, out: &mut String) {
        self.conversation += 1;
        self.picks.clear();
        let id = self.conversation_id();
        out.push_str(&format!(
            "--- new conversation {id} with {} ---\n",
            self.customer
        ));
        let event = new_conversation_event(&id, &self.customer);
        let turn = self.session.run(&event);
        self.picks = render(&turn, &id, out);
        no_reply(&turn, out);
    }

    fn send(&mut self, content: Content, out: &mut String) {
        self.messages += 1;
        let id = self.conversation_id();
        let event = customer_message_event(
            &id,
            &format!("msg_chat_{}", self.messages),
            &self.customer,
            content,
        );
        let turn = self.session.run(&event);
        let picks = render(&turn, &id, out);
        if !picks.is_empty() {
            self.picks = picks;
        }
        no_reply(&turn, out);
    }
}

/// Says so when no plugin answered (silence is easy to miss).
fn no_reply(turn: &Turn, out: &mut String) {
    let silent = turn
        .handled
        .outcomes
        .iter()
        .all(|o| o.outcome != "failed" && o.returned.is_empty());
    if silent && !turn.duplicate {
        out.push_str("(no reply)\n");
        if turn
            .handled
            .outcomes
            .iter()
            .any(|o| o.reason.as_deref() == Some("human"))
        {
            out.push_str("[a human agent is in charge since the hand-off: /bot hands it back]\n");
        }
    }
}

pub fn run(args: ChatArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let session = Session::open(settings, &args.plugins)?;
    let mut stdout = std::io::stdout();
    let interactive = std::io::stdin().is_terminal();
    writeln!(
        stdout,
        "Chatting with {} as {}. {HELP}",
        session.names().join(", "),
        args.name
    )?;
    let mut chat = Chat {
        session,
        customer: args.name,
        conversation: 0,
        messages: 0,
        picks: Vec::new(),
    };
    let mut out = String::new();
    chat.start(&mut out);
    stdout.write_all(out.as_bytes())?;
    let mut lines = std::io::stdin().lock().lines();
    loop {
        write!(stdout, "you> ")?;
        stdout.flush()?;
        let Some(line) = lines.next() else {
            writeln!(stdout)?;
            break;
        };
        let line = line?;
        if !interactive {
            // A pipe does not echo: show what "was typed" for a readable log.
            writeln!(stdout, "{line}")?;
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut out = String::new();
        match parse_input(&line, &chat.picks) {
            Input::Quit => break,
            Input::Help => out.push_str(&format!("{HELP}\n")),
            Input::New => chat.start(&mut out),
            Input::Release => {
                let id = chat.conversation_id();
                if chat.session.release(&id) {
                    out.push_str("[the agent hands the conversation back to the bot]\n");
                } else {
                    out.push_str("[no human agent is in charge of this conversation]\n");
                }
            }
            Input::Invalid(message) => out.push_str(&format!("{message}\n")),
            Input::Send(content) => chat.send(content, &mut out),
        }
        stdout.write_all(out.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_pick_the_offered_choices() {
        let picks = vec![
            Pick::Button {
                id: "orders".into(),
                title: "Mes commandes".into(),
            },
            Pick::Row {
                id: "invoice".into(),
                title: "Recevoir ma facture".into(),
            },
        ];
        let Input::Send(Content::ButtonReply(c)) = parse_input("1", &picks) else {
            panic!("1 is the first button");
        };
        assert_eq!(
            (c.id.as_str(), c.title.as_str()),
            ("orders", "Mes commandes")
        );
        assert!(matches!(
            parse_input(" 2 ", &picks),
            Input::Send(Content::ListReply(c)) if c.id == "invoice"
        ));
        // Out of range, or no choices: it is text.
        assert_eq!(
            parse_input("3", &picks),
            Input::Send(Content::Text { text: "3".into() })
        );
        assert_eq!(
            parse_input("0", &[]),
            Input::Send(Content::Text { text: "0".into() })
        );
    }

    #[test]
    fn commands() {
        assert_eq!(parse_input("/quit", &[]), Input::Quit);
        assert!(matches!(
            parse_input("/location 33.57 -7.59", &[]),
            Input::Send(Content::Location(l)) if l.latitude == 33.57 && l.longitude == -7.59
        ));
        assert!(matches!(
            parse_input("/location north", &[]),
            Input::Invalid(_)
        ));
        assert!(matches!(
            parse_input("/location 95 0", &[]),
            Input::Invalid(_)
        ));
    }
}
