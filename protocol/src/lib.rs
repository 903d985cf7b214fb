//! Digishare reply actions and the limits the Messages API enforces.
//!
//! This crate is the one definition of what a bot may answer. The guest SDK
//! builds these values (and refuses bad ones before they leave the plugin);
//! the host converts what a plugin returns into them and validates again,
//! because a plugin need not have been built with our SDK. Neither side keeps
//! its own copy of a limit.
//!
//! It is also the one definition of [`ConversationState`], which the host
//! keeps per conversation and plugins are told with every event.
//!
//! No wasmtime, no tokio, no serde unless the `serde` feature asks for it:
//! this crate compiles into every Rust plugin. The `arbitrary` feature
//! derives `arbitrary::Arbitrary` for every action, for the fuzz targets
//! (`fuzz/`).
//!
//! ```
//! use digibot_protocol::{Action, LimitError, limits};
//! let menu = Action::buttons("Track your order?")
//!     .button("yes", "Yes")
//!     .button("no", "No")
//!     .build()
//!     .unwrap();
//! assert_eq!(menu.kind(), "buttons");
//!
//! let long = "x".repeat(limits::TEXT_MAX + 1);
//! assert!(matches!(Action::text(long), Err(LimitError::TooLong { .. })));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod builders;
mod validate;

pub use builders::{ButtonsBuilder, ListBuilder};
pub use validate::LimitError;

/// Who is in charge of a conversation. Plugins are told it with every event
/// they receive (`digishare:bot@0.2.0` and later).
///
/// ```
/// use digibot_protocol::ConversationState;
///
/// assert_eq!(ConversationState::default(), ConversationState::Bot);
/// assert_eq!(ConversationState::Human.to_string(), "human");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum ConversationState {
    /// The bot is in charge: plugins answer the customer. Every
    /// conversation starts so.
    #[default]
    Bot,
    /// A human agent is in charge: only assist plugins run, and they may
    /// only write internal notes.
    Human,
    /// The conversation is archived.
    Closed,
}

impl ConversationState {
    /// The name used in the store, the API and logs: `bot`, `human`, `closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConversationState::Bot => "bot",
            ConversationState::Human => "human",
            ConversationState::Closed => "closed",
        }
    }
}

impl std::fmt::Display for ConversationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits of Digishare's Messages API (and of WhatsApp behind it).
///
/// Lengths count characters (Unicode scalar values), not bytes.
pub mod limits {
    /// Characters in a text message.
    pub const TEXT_MAX: usize = 4096;
    /// Characters in the header of a buttons or list message.
    pub const HEADER_MAX: usize = 60;
    /// Reply buttons in one message.
    pub const BUTTONS_MAX: usize = 3;
    /// Characters in a reply button's title.
    pub const BUTTON_TITLE_MAX: usize = 20;
    /// Rows in a list menu, across all its sections.
    pub const LIST_ROWS_MAX: usize = 10;
    /// Characters in a list row's title.
    pub const ROW_TITLE_MAX: usize = 24;
    /// Characters in an id the customer's choice comes back with
    /// (button or row id). WhatsApp's limit.
    pub const CHOICE_ID_MAX: usize = 200;
    /// Characters in an id that digibot puts into a URL path or a
    /// `reply_to` (user ids, message ids).
    pub const REF_ID_MAX: usize = 128;

    /// Whether a latitude and longitude name a point on the globe (finite,
    /// within ±90 and ±180): the one check for locations going out and
    /// coming in.
    pub fn on_the_globe(latitude: f64, longitude: f64) -> bool {
        latitude.is_finite()
            && longitude.is_finite()
            && latitude.abs() <= 90.0
            && longitude.abs() <= 180.0
    }
}

/// One reply a bot asks digibot to perform, in the conversation of the
/// event being handled.
///
/// Build actions with the constructors ([`Action::text`],
/// [`Action::buttons`], ...), which check Digishare's limits; a value built
/// by hand is checked by [`Action::validate`], which the host runs on every
/// action a plugin returns.
///
/// ```
/// use digibot_protocol::Action;
/// let reply = Action::text("Bonjour !").unwrap();
/// assert_eq!(reply, Action::Text { body: "Bonjour !".into(), reply_to: None });
/// assert!(Action::text("").is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum Action {
    /// A text message to the customer.
    Text {
        /// The message, at most [`limits::TEXT_MAX`] characters.
        body: String,
        /// The id of a message of this conversation to quote.
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        reply_to: Option<String>,
    },
    /// Up to three reply buttons.
    Buttons(Buttons),
    /// A list menu.
    List(ListMenu),
    /// A location pin.
    Location(Location),
    /// Ask the customer to share their location.
    LocationRequest {
        /// The prompt shown with the request.
        body: String,
    },
    /// A file Digishare downloads from a URL.
    File(FileReply),
    /// An internal note, visible to agents only (`send_to_third = false`).
    Note {
        /// The note's text.
        body: String,
    },
    /// Attach a human agent to the conversation.
    HandOff {
        /// The Digishare user (agent) to attach.
        user_id: String,
        /// Also make that agent the conversation's handler.
        as_handler: bool,
    },
}

/// A reply-buttons message.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Buttons {
    /// A text header above the body, at most [`limits::HEADER_MAX`] characters.
    pub header: Option<String>,
    /// The message above the buttons.
    pub body: String,
    /// One to [`limits::BUTTONS_MAX`] buttons, with distinct ids.
    pub buttons: Vec<Button>,
}

/// One reply button.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Button {
    /// Comes back as the customer's choice when they tap the button.
    pub id: String,
    /// The label, at most [`limits::BUTTON_TITLE_MAX`] characters.
    pub title: String,
}

/// A list-menu message.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ListMenu {
    /// A text header above the body, at most [`limits::HEADER_MAX`] characters.
    pub header: Option<String>,
    /// The message above the menu button.
    pub body: String,
    /// Label of the button that opens the list.
    pub button: String,
    /// The rows, grouped; at most [`limits::LIST_ROWS_MAX`] rows in all.
    pub sections: Vec<ListSection>,
}

/// A titled group of rows in a list menu.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ListSection {
    /// Required (at most [`limits::ROW_TITLE_MAX`] characters) when the menu
    /// has several sections; may be empty when it has one.
    pub title: String,
    /// The choices of this section.
    pub rows: Vec<ListRow>,
}

/// One choice in a list menu.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ListRow {
    /// Comes back as the customer's choice when they pick the row.
    pub id: String,
    /// The row's label, at most [`limits::ROW_TITLE_MAX`] characters.
    pub title: String,
    /// A second, smaller line under the title.
    pub description: Option<String>,
}

/// A location pin.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Location {
    /// Degrees, within ±90.
    pub latitude: f64,
    /// Degrees, within ±180.
    pub longitude: f64,
    /// The place's name, shown above the address.
    pub name: Option<String>,
    /// The place's address.
    pub address: Option<String>,
}

/// A file sent by URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FileReply {
    /// Where Digishare downloads the file from (http or https).
    pub url: String,
    /// The name the customer sees.
    pub file_name: Option<String>,
    /// The file's extension (e.g. `pdf`), when the URL does not tell.
    pub extension: Option<String>,
    /// Deliver audio as a voice note.
    pub voice: bool,
}

impl Action {
    /// A text message, checked against [`limits::TEXT_MAX`].
    pub fn text(body: impl Into<String>) -> Result<Action, LimitError> {
        Action::Text {
            body: body.into(),
            reply_to: None,
        }
        .validated()
    }

    /// A text message quoting the message `message_id` of this conversation.
    /// The id must be a plain id (letters, digits, `-_.:`), so it cannot
    /// steer the request elsewhere.
    ///
    /// ```
    /// use digibot_protocol::Action;
    /// assert!(Action::text_reply_to("Noted", "msg_t_0001").is_ok());
    /// assert!(Action::text_reply_to("Noted", "../other").is_err());
    /// ```
    pub fn text_reply_to(
        body: impl Into<String>,
        message_id: impl Into<String>,
    ) -> Result<Action, LimitError> {
        Action::Text {
            body: body.into(),
            reply_to: Some(message_id.into()),
        }
        .validated()
    }

    /// Reply buttons: `Action::buttons("Body").button("id", "Title").build()`.
    pub fn buttons(body: impl Into<String>) -> ButtonsBuilder {
        ButtonsBuilder::new(body)
    }

    /// A list menu: `Action::list("Body", "Open").row("id", "Title").build()`.
    pub fn list(body: impl Into<String>, button: impl Into<String>) -> ListBuilder {
        ListBuilder::new(body, button)
    }

    /// A location pin.
    pub fn location(latitude: f64, longitude: f64) -> Result<Action, LimitError> {
        Action::Location(Location {
            latitude,
            longitude,
            name: None,
            address: None,
        })
        .validated()
    }

    /// A named location pin with an address.
    ///
    /// ```
    /// use digibot_protocol::Action;
    /// let shop = Action::place(33.5731, -7.5898, "Digishare", "Casablanca").unwrap();
    /// assert_eq!(shop.kind(), "location");
    /// assert!(Action::place(123.0, 0.0, "Nowhere", "").is_err());
    /// ```
    pub fn place(
        latitude: f64,
        longitude: f64,
        name: impl Into<String>,
        address: impl Into<String>,
    ) -> Result<Action, LimitError> {
        Action::Location(Location {
            latitude,
            longitude,
            name: Some(name.into()),
            address: Some(address.into()),
        })
        .validated()
    }

    /// Ask the customer to share their location, with a prompt.
    pub fn location_request(prompt: impl Into<String>) -> Result<Action, LimitError> {
        Action::LocationRequest {
            body: prompt.into(),
        }
        .validated()
    }

    /// A file Digishare fetches from `url` (http or https).
    ///
    /// ```
    /// use digibot_protocol::{Action, LimitError};
    /// assert!(Action::file("https://example.com/menu.pdf").is_ok());
    /// assert_eq!(Action::file("file:///etc/passwd"), Err(LimitError::BadUrl));
    /// ```
    pub fn file(url: impl Into<String>) -> Result<Action, LimitError> {
        Action::File(FileReply {
            url: url.into(),
            file_name: None,
            extension: None,
            voice: false,
        })
        .validated()
    }

    /// An internal note for the agents; the customer never sees it.
    pub fn note(body: impl Into<String>) -> Result<Action, LimitError> {
        Action::Note { body: body.into() }.validated()
    }

    /// Attach the agent `user_id`; `as_handler` also makes them the handler.
    ///
    /// ```
    /// use digibot_protocol::Action;
    /// let hand_off = Action::hand_off("usr_17", true).unwrap();
    /// assert_eq!(hand_off.kind(), "hand_off");
    /// ```
    pub fn hand_off(user_id: impl Into<String>, as_handler: bool) -> Result<Action, LimitError> {
        Action::HandOff {
            user_id: user_id.into(),
            as_handler,
        }
        .validated()
    }

    /// Short name of the action kind, as used in logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Text { .. } => "text",
            Action::Buttons(_) => "buttons",
            Action::List(_) => "list",
            Action::Location(_) => "location",
            Action::LocationRequest { .. } => "location_request",
            Action::File(_) => "file",
            Action::Note { .. } => "note",
            Action::HandOff { .. } => "hand_off",
        }
    }

    /// Approximate size in bytes of the strings this action carries; the
    /// host caps the total per invocation.
    ///
    /// ```
    /// use digibot_protocol::Action;
    /// assert_eq!(Action::text("héllo").unwrap().payload_len(), 6);
    /// ```
    pub fn payload_len(&self) -> usize {
        fn opt(s: &Option<String>) -> usize {
            s.as_deref().map_or(0, str::len)
        }
        match self {
            Action::Text { body, reply_to } => body.len() + opt(reply_to),
            Action::Buttons(b) => {
                opt(&b.header)
                    + b.body.len()
                    + b.buttons
                        .iter()
                        .map(|x| x.id.len() + x.title.len())
                        .sum::<usize>()
            }
            Action::List(l) => {
                opt(&l.header)
                    + l.body.len()
                    + l.button.len()
                    + l.sections
                        .iter()
                        .map(|s| {
                            s.title.len()
                                + s.rows
                                    .iter()
                                    .map(|r| r.id.len() + r.title.len() + opt(&r.description))
                                    .sum::<usize>()
                        })
                        .sum::<usize>()
            }
            Action::Location(l) => 16 + opt(&l.name) + opt(&l.address),
            Action::LocationRequest { body } | Action::Note { body } => body.len(),
            Action::File(f) => f.url.len() + opt(&f.file_name) + opt(&f.extension),
            Action::HandOff { user_id, .. } => user_id.len(),
        }
    }

    fn validated(self) -> Result<Action, LimitError> {
        self.validate()?;
        Ok(self)
    }
}
