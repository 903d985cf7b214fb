//! A builder for file replies with the optional fields that
//! [`Action::file`] leaves out.

use crate::{Action, FileReply, LimitError};

/// Builds a file reply with a file name, an extension or as a voice note;
/// [`Action::file`] is the short form for a bare URL.
///
/// ```
/// use digibot_sdk::{Action, FileBuilder};
///
/// let invoice = FileBuilder::new("https://example.com/facture.pdf")
///     .file_name("facture.pdf")
///     .build()
///     .unwrap();
/// assert_eq!(invoice.kind(), "file");
///
/// // The URL is checked like Action::file's.
/// assert!(FileBuilder::new("file:///etc/passwd").build().is_err());
/// ```
#[derive(Debug, Clone)]
#[must_use = "call .build() to get the action"]
pub struct FileBuilder(FileReply);

impl FileBuilder {
    /// A file Digishare downloads from `url` (http or https).
    pub fn new(url: impl Into<String>) -> Self {
        FileBuilder(FileReply {
            url: url.into(),
            file_name: None,
            extension: None,
            voice: false,
        })
    }

    /// The name the customer sees, e.g. `facture.pdf`.
    pub fn file_name(mut self, file_name: impl Into<String>) -> Self {
        self.0.file_name = Some(file_name.into());
        self
    }

    /// The file extension, e.g. `pdf`, when the URL does not make it clear.
    pub fn extension(mut self, extension: impl Into<String>) -> Self {
        self.0.extension = Some(extension.into());
        self
    }

    /// Deliver an audio file as a voice note.
    pub fn voice(mut self, voice: bool) -> Self {
        self.0.voice = voice;
        self
    }

    /// Checks the action like [`Action::file`] does.
    pub fn build(self) -> Result<Action, LimitError> {
        let action = Action::File(self.0);
        action.validate()?;
        Ok(action)
    }
}
