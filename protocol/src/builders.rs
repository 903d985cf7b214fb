//! Builders for the two structured replies (buttons, list menus) whose
//! `build` validates the whole message.

use crate::{Action, Button, Buttons, LimitError, ListMenu, ListRow, ListSection};

/// Builds reply buttons; see [`Action::buttons`].
///
/// ```
/// use digibot_protocol::Action;
/// let reply = Action::buttons("Track your order?")
///     .header("Suivi")
///     .button("yes", "Oui")
///     .button("no", "Non")
///     .build()
///     .unwrap();
/// assert_eq!(reply.kind(), "buttons");
/// ```
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the action"]
pub struct ButtonsBuilder(Buttons);

impl ButtonsBuilder {
    pub(crate) fn new(body: impl Into<String>) -> Self {
        ButtonsBuilder(Buttons {
            header: None,
            body: body.into(),
            buttons: Vec::new(),
        })
    }

    /// A text header above the body (at most 60 characters).
    pub fn header(mut self, header: impl Into<String>) -> Self {
        self.0.header = Some(header.into());
        self
    }

    /// Adds a button; its `id` comes back as the customer's choice.
    pub fn button(mut self, id: impl Into<String>, title: impl Into<String>) -> Self {
        self.0.buttons.push(Button {
            id: id.into(),
            title: title.into(),
        });
        self
    }

    /// Checks the limits (1-3 buttons, titles ≤ 20, header ≤ 60).
    pub fn build(self) -> Result<Action, LimitError> {
        let action = Action::Buttons(self.0);
        action.validate()?;
        Ok(action)
    }
}

/// Builds a list menu; see [`Action::list`].
///
/// Rows added with [`row`](Self::row) before any [`section`](Self::section)
/// go into one untitled section.
///
/// ```
/// use digibot_protocol::Action;
/// let menu = Action::list("How can we help?", "Menu")
///     .section("Orders")
///     .row("track", "Track a parcel")
///     .row_with_description("return", "Return an item", "Within 30 days")
///     .build()
///     .unwrap();
/// assert_eq!(menu.kind(), "list");
/// ```
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the action"]
pub struct ListBuilder(ListMenu);

impl ListBuilder {
    pub(crate) fn new(body: impl Into<String>, button: impl Into<String>) -> Self {
        ListBuilder(ListMenu {
            header: None,
            body: body.into(),
            button: button.into(),
            sections: Vec::new(),
        })
    }

    /// A text header above the body (at most 60 characters).
    pub fn header(mut self, header: impl Into<String>) -> Self {
        self.0.header = Some(header.into());
        self
    }

    /// Starts a new titled section; later rows go into it.
    pub fn section(mut self, title: impl Into<String>) -> Self {
        self.0.sections.push(ListSection {
            title: title.into(),
            rows: Vec::new(),
        });
        self
    }

    /// Adds a row (title at most 24 characters).
    pub fn row(self, id: impl Into<String>, title: impl Into<String>) -> Self {
        self.push_row(ListRow {
            id: id.into(),
            title: title.into(),
            description: None,
        })
    }

    /// Adds a row with a second line of description.
    pub fn row_with_description(
        self,
        id: impl Into<String>,
        title: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.push_row(ListRow {
            id: id.into(),
            title: title.into(),
            description: Some(description.into()),
        })
    }

    fn push_row(mut self, row: ListRow) -> Self {
        if self.0.sections.is_empty() {
            self.0.sections.push(ListSection {
                title: String::new(),
                rows: Vec::new(),
            });
        }
        if let Some(section) = self.0.sections.last_mut() {
            section.rows.push(row);
        }
        self
    }

    /// Checks the limits (1-10 rows in all, row titles ≤ 24, header ≤ 60).
    pub fn build(self) -> Result<Action, LimitError> {
        let action = Action::List(self.0);
        action.validate()?;
        Ok(action)
    }
}

#[cfg(test)]
mod tests {
    use crate::limits::*;
    use crate::{Action, LimitError};

    #[test]
    fn three_buttons_pass_four_fail() {
        let three = Action::buttons("Pick")
            .button("a", "A")
            .button("b", "B")
            .button("c", "C")
            .build();
        assert!(three.is_ok());
        let four = Action::buttons("Pick")
            .button("a", "A")
            .button("b", "B")
            .button("c", "C")
            .button("d", "D")
            .build();
        assert_eq!(
            four.unwrap_err(),
            LimitError::TooMany {
                what: "buttons",
                max: BUTTONS_MAX,
                count: 4
            }
        );
    }

    #[test]
    fn button_title_and_header_limits() {
        let long_title = Action::buttons("Pick")
            .button("a", "x".repeat(BUTTON_TITLE_MAX + 1))
            .build();
        assert_eq!(
            long_title.unwrap_err(),
            LimitError::TooLong {
                field: "button title",
                max: 20,
                len: 21
            }
        );
        let exact = Action::buttons("Pick")
            .button("a", "x".repeat(BUTTON_TITLE_MAX))
            .header("h".repeat(HEADER_MAX))
            .build();
        assert!(exact.is_ok());
        let long_header = Action::buttons("Pick")
            .header("h".repeat(HEADER_MAX + 1))
            .button("a", "A")
            .build();
        assert!(matches!(
            long_header.unwrap_err(),
            LimitError::TooLong {
                field: "header",
                ..
            }
        ));
    }

    #[test]
    fn buttons_need_at_least_one_and_unique_ids() {
        assert_eq!(
            Action::buttons("Pick").build().unwrap_err(),
            LimitError::NoItems { what: "buttons" }
        );
        assert_eq!(
            Action::buttons("Pick")
                .button("a", "A")
                .button("a", "B")
                .build()
                .unwrap_err(),
            LimitError::DuplicateId { id: "a".into() }
        );
    }

    #[test]
    fn list_rows_are_counted_across_sections() {
        let mut builder = Action::list("Menu", "Open").section("One");
        for i in 0..6 {
            builder = builder.row(format!("a{i}"), "Row");
        }
        builder = builder.section("Two");
        for i in 0..4 {
            builder = builder.row(format!("b{i}"), "Row");
        }
        assert!(builder.clone().build().is_ok(), "10 rows is the limit");
        let err = builder.row("b9", "Row").build().unwrap_err();
        assert_eq!(
            err,
            LimitError::TooMany {
                what: "list rows",
                max: LIST_ROWS_MAX,
                count: 11
            }
        );
    }

    #[test]
    fn row_title_limit_and_untitled_single_section() {
        let ok = Action::list("Menu", "Open")
            .row("a", "x".repeat(ROW_TITLE_MAX))
            .build();
        assert!(ok.is_ok(), "a single section may be untitled");
        let err = Action::list("Menu", "Open")
            .row("a", "x".repeat(ROW_TITLE_MAX + 1))
            .build()
            .unwrap_err();
        assert_eq!(
            err,
            LimitError::TooLong {
                field: "row title",
                max: 24,
                len: 25
            }
        );
        assert_eq!(
            Action::list("Menu", "Open").build().unwrap_err(),
            LimitError::NoItems { what: "list rows" }
        );
    }
}
