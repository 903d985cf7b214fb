//! Checking an [`Action`] against Digishare's limits: the one place they
//! are enforced, by the SDK before a plugin returns and by the host after.

use crate::limits::*;
use crate::{Action, Buttons, ListMenu};
use std::fmt;

/// Why an action would be refused by Digishare (or is unsafe to send).
///
/// Its `Display` is a sentence for logs and for a plugin's error:
///
/// ```
/// use digibot_protocol::{Action, LimitError};
/// let err = Action::buttons("Pick").build().unwrap_err();
/// assert_eq!(err, LimitError::NoItems { what: "buttons" });
/// assert_eq!(err.to_string(), "at least one of buttons is needed");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitError {
    /// A text field is longer than Digishare accepts (counted in characters).
    TooLong {
        /// The field, e.g. `"button title"`.
        field: &'static str,
        /// Digishare's limit, in characters.
        max: usize,
        /// The field's length, in characters.
        len: usize,
    },
    /// A required text field is empty (or only whitespace).
    Empty {
        /// The field, e.g. `"text"`.
        field: &'static str,
    },
    /// Too many items (buttons, rows).
    TooMany {
        /// What is counted, e.g. `"buttons"`.
        what: &'static str,
        /// The most allowed.
        max: usize,
        /// How many there are.
        count: usize,
    },
    /// No items where at least one is needed.
    NoItems {
        /// What is missing, e.g. `"list rows"`.
        what: &'static str,
    },
    /// Two buttons or rows share an id, so the reply would be ambiguous.
    DuplicateId {
        /// The repeated id.
        id: String,
    },
    /// An id that digibot puts into a URL or `reply_to` has characters
    /// outside `A-Z a-z 0-9 - _ . :`.
    BadId {
        /// The field, `"reply_to"` or `"user id"`.
        field: &'static str,
    },
    /// A file URL that is not http(s).
    BadUrl,
    /// Latitude or longitude out of range.
    BadCoordinates,
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::TooLong { field, max, len } => {
                write!(f, "{field} is {len} characters, the limit is {max}")
            }
            LimitError::Empty { field } => write!(f, "{field} must not be empty"),
            LimitError::TooMany { what, max, count } => {
                write!(f, "{count} {what}, the limit is {max}")
            }
            LimitError::NoItems { what } => write!(f, "at least one of {what} is needed"),
            LimitError::DuplicateId { id } => write!(f, "id {id:?} is used twice"),
            LimitError::BadId { field } => write!(
                f,
                "{field} may only hold letters, digits, '-', '_', '.' and ':' (at most {REF_ID_MAX})"
            ),
            LimitError::BadUrl => write!(f, "file url must start with https:// or http://"),
            LimitError::BadCoordinates => {
                write!(f, "latitude must be within ±90 and longitude within ±180")
            }
        }
    }
}

impl std::error::Error for LimitError {}

fn text(field: &'static str, value: &str, max: usize) -> Result<(), LimitError> {
    if value.trim().is_empty() {
        return Err(LimitError::Empty { field });
    }
    let len = value.chars().count();
    if len > max {
        return Err(LimitError::TooLong { field, max, len });
    }
    Ok(())
}

fn header(value: &Option<String>) -> Result<(), LimitError> {
    match value {
        Some(h) => text("header", h, HEADER_MAX),
        None => Ok(()),
    }
}

/// Ids that end up in a URL path or a `reply_to`: a strict charset, so a
/// plugin cannot steer a request to another conversation's route.
fn reference(field: &'static str, value: &str) -> Result<(), LimitError> {
    let ok = !value.is_empty()
        && value.len() <= REF_ID_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        && value != "."
        && value != "..";
    if ok {
        Ok(())
    } else {
        Err(LimitError::BadId { field })
    }
}

fn unique_ids<'a>(ids: impl Iterator<Item = &'a str>) -> Result<(), LimitError> {
    let mut seen: Vec<&str> = Vec::new();
    for id in ids {
        if seen.contains(&id) {
            return Err(LimitError::DuplicateId { id: id.to_string() });
        }
        seen.push(id);
    }
    Ok(())
}

fn buttons(b: &Buttons) -> Result<(), LimitError> {
    header(&b.header)?;
    text("body", &b.body, TEXT_MAX)?;
    if b.buttons.is_empty() {
        return Err(LimitError::NoItems { what: "buttons" });
    }
    if b.buttons.len() > BUTTONS_MAX {
        return Err(LimitError::TooMany {
            what: "buttons",
            max: BUTTONS_MAX,
            count: b.buttons.len(),
        });
    }
    for button in &b.buttons {
        text("button id", &button.id, CHOICE_ID_MAX)?;
        text("button title", &button.title, BUTTON_TITLE_MAX)?;
    }
    unique_ids(b.buttons.iter().map(|b| b.id.as_str()))
}

fn list(l: &ListMenu) -> Result<(), LimitError> {
    header(&l.header)?;
    text("body", &l.body, TEXT_MAX)?;
    text("list button", &l.button, BUTTON_TITLE_MAX)?;
    let rows = l.sections.iter().map(|s| s.rows.len()).sum::<usize>();
    if rows == 0 {
        return Err(LimitError::NoItems { what: "list rows" });
    }
    if rows > LIST_ROWS_MAX {
        return Err(LimitError::TooMany {
            what: "list rows",
            max: LIST_ROWS_MAX,
            count: rows,
        });
    }
    for section in &l.sections {
        // WhatsApp needs section titles only when there are several.
        if l.sections.len() > 1 {
            text("section title", &section.title, ROW_TITLE_MAX)?;
        }
        for row in &section.rows {
            text("row id", &row.id, CHOICE_ID_MAX)?;
            text("row title", &row.title, ROW_TITLE_MAX)?;
        }
    }
    unique_ids(
        l.sections
            .iter()
            .flat_map(|s| s.rows.iter().map(|r| r.id.as_str())),
    )
}

impl Action {
    /// Checks every limit; the first one broken is the error.
    ///
    /// The constructors already call it; it matters for values built by
    /// hand, or received from a plugin that was not built with the SDK.
    ///
    /// ```
    /// use digibot_protocol::{Action, Button, Buttons, LimitError};
    /// let reply = Action::Buttons(Buttons {
    ///     header: None,
    ///     body: "Pick one".into(),
    ///     buttons: vec![Button { id: "a".into(), title: "A title far over twenty".into() }],
    /// });
    /// assert_eq!(
    ///     reply.validate(),
    ///     Err(LimitError::TooLong { field: "button title", max: 20, len: 23 })
    /// );
    /// ```
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            Action::Text { body, reply_to } => {
                text("text", body, TEXT_MAX)?;
                match reply_to {
                    Some(id) => reference("reply_to", id),
                    None => Ok(()),
                }
            }
            Action::Buttons(b) => buttons(b),
            Action::List(l) => list(l),
            Action::Location(loc) => {
                if crate::limits::on_the_globe(loc.latitude, loc.longitude) {
                    Ok(())
                } else {
                    Err(LimitError::BadCoordinates)
                }
            }
            Action::LocationRequest { body } => text("location request", body, TEXT_MAX),
            Action::File(f) => {
                let url = f.url.trim();
                if url.starts_with("https://") || url.starts_with("http://") {
                    Ok(())
                } else {
                    Err(LimitError::BadUrl)
                }
            }
            Action::Note { body } => text("note", body, TEXT_MAX),
            Action::HandOff { user_id, .. } => reference("user id", user_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Button, Buttons};

    #[test]
    fn text_limit_counts_characters_not_bytes() {
        let accents = "é".repeat(TEXT_MAX);
        assert!(Action::text(accents).is_ok(), "4096 two-byte chars is fine");
        let err = Action::text("a".repeat(TEXT_MAX + 1)).unwrap_err();
        assert_eq!(
            err,
            LimitError::TooLong {
                field: "text",
                max: 4096,
                len: 4097
            }
        );
        assert_eq!(
            err.to_string(),
            "text is 4097 characters, the limit is 4096"
        );
    }

    #[test]
    fn empty_text_is_refused() {
        assert_eq!(
            Action::text("  ").unwrap_err(),
            LimitError::Empty { field: "text" }
        );
    }

    #[test]
    fn reply_to_and_user_ids_cannot_carry_a_path() {
        assert!(Action::text_reply_to("hi", "msg_t_0001").is_ok());
        for bad in ["../conv_2", "a/b", "x?y=1", "", ".."] {
            assert!(Action::text_reply_to("hi", bad).is_err(), "{bad}");
            assert_eq!(
                Action::hand_off(bad, false).unwrap_err(),
                LimitError::BadId { field: "user id" }
            );
        }
        assert!(Action::hand_off("usr_17", true).is_ok());
    }

    #[test]
    fn validate_catches_hand_built_values() {
        // A plugin not built with the SDK can hand the host anything.
        let four = Action::Buttons(Buttons {
            header: None,
            body: "Pick".into(),
            buttons: (0..4)
                .map(|i| Button {
                    id: format!("b{i}"),
                    title: "ok".into(),
                })
                .collect(),
        });
        assert_eq!(
            four.validate().unwrap_err(),
            LimitError::TooMany {
                what: "buttons",
                max: 3,
                count: 4
            }
        );
    }

    #[test]
    fn locations_and_files() {
        assert!(Action::location(33.57, -7.59).is_ok());
        assert_eq!(
            Action::location(91.0, 0.0).unwrap_err(),
            LimitError::BadCoordinates
        );
        assert_eq!(
            Action::location(f64::NAN, 0.0).unwrap_err(),
            LimitError::BadCoordinates
        );
        assert!(Action::file("https://example.com/a.pdf").is_ok());
        assert_eq!(
            Action::file("file:///etc/passwd").unwrap_err(),
            LimitError::BadUrl
        );
    }

    #[test]
    fn note_and_location_request_need_text() {
        assert!(Action::note("VIP customer").is_ok());
        assert!(Action::note("").is_err());
        assert!(Action::location_request("Where are you?").is_ok());
        assert_eq!(Action::note("n").unwrap().kind(), "note");
    }
}
