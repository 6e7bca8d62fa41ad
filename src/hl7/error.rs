//! Errors of the HL7 layer, and the HL7 table 0357 codes they map to.
//!
//! Every error must be usable twice: as an operator-facing log line and as the content of a
//! negative ACK sent back to the hospital system. Hence each variant names *where* (segment
//! index, input line, HL7 field) and *what*, never the field values themselves: messages
//! carry patient data and both logs and ACKs leave the clinical boundary. Only MSH values that
//! are protocol identifiers (MSH-9 message type, MSH-12 version, MSH-18 charset name) may be
//! quoted, and even those pass through [`safe_token`] first.

use thiserror::Error;

/// HL7 table 0357 (message error condition codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0
    MessageAccepted,
    /// 100
    SegmentSequenceError,
    /// 101
    RequiredFieldMissing,
    /// 102
    DataTypeError,
    /// 103
    TableValueNotFound,
    /// 200
    UnsupportedMessageType,
    /// 201
    UnsupportedEventCode,
    /// 202
    UnsupportedProcessingId,
    /// 203
    UnsupportedVersionId,
    /// 204
    UnknownKeyIdentifier,
    /// 205
    DuplicateKeyIdentifier,
    /// 206
    ApplicationRecordLocked,
    /// 207
    ApplicationInternalError,
}

impl ErrorCode {
    /// The numeric code from table 0357.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::MessageAccepted => 0,
            ErrorCode::SegmentSequenceError => 100,
            ErrorCode::RequiredFieldMissing => 101,
            ErrorCode::DataTypeError => 102,
            ErrorCode::TableValueNotFound => 103,
            ErrorCode::UnsupportedMessageType => 200,
            ErrorCode::UnsupportedEventCode => 201,
            ErrorCode::UnsupportedProcessingId => 202,
            ErrorCode::UnsupportedVersionId => 203,
            ErrorCode::UnknownKeyIdentifier => 204,
            ErrorCode::DuplicateKeyIdentifier => 205,
            ErrorCode::ApplicationRecordLocked => 206,
            ErrorCode::ApplicationInternalError => 207,
        }
    }

    /// The table 0357 description (used as the CWE text in ERR-3).
    pub fn text(self) -> &'static str {
        match self {
            ErrorCode::MessageAccepted => "Message accepted",
            ErrorCode::SegmentSequenceError => "Segment sequence error",
            ErrorCode::RequiredFieldMissing => "Required field missing",
            ErrorCode::DataTypeError => "Data type error",
            ErrorCode::TableValueNotFound => "Table value not found",
            ErrorCode::UnsupportedMessageType => "Unsupported message type",
            ErrorCode::UnsupportedEventCode => "Unsupported event code",
            ErrorCode::UnsupportedProcessingId => "Unsupported processing id",
            ErrorCode::UnsupportedVersionId => "Unsupported version id",
            ErrorCode::UnknownKeyIdentifier => "Unknown key identifier",
            ErrorCode::DuplicateKeyIdentifier => "Duplicate key identifier",
            ErrorCode::ApplicationRecordLocked => "Application record locked",
            ErrorCode::ApplicationInternalError => "Application internal error",
        }
    }

    /// The code for a numeric value, if it is in table 0357.
    pub fn from_code(code: u16) -> Option<Self> {
        ALL_CODES.iter().copied().find(|c| c.code() == code)
    }
}

const ALL_CODES: [ErrorCode; 13] = [
    ErrorCode::MessageAccepted,
    ErrorCode::SegmentSequenceError,
    ErrorCode::RequiredFieldMissing,
    ErrorCode::DataTypeError,
    ErrorCode::TableValueNotFound,
    ErrorCode::UnsupportedMessageType,
    ErrorCode::UnsupportedEventCode,
    ErrorCode::UnsupportedProcessingId,
    ErrorCode::UnsupportedVersionId,
    ErrorCode::UnknownKeyIdentifier,
    ErrorCode::DuplicateKeyIdentifier,
    ErrorCode::ApplicationRecordLocked,
    ErrorCode::ApplicationInternalError,
];

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.text())
    }
}

/// Why `parse` refused a message. Segment indexes and line numbers are 1-based; the index
/// counts segments (MSH = 1), the line counts input lines including skipped blank ones.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error(
        "message is empty: nothing left after trimming BOM, whitespace, framing and blank lines"
    )]
    Empty,
    #[error("message must start with an `MSH` segment, but line {line} starts with {}", found.as_deref().map_or_else(|| "something that is not a segment name".to_owned(), |f| format!("`{f}`")))]
    MissingMsh {
        line: usize,
        /// The segment name found instead, when it is a well-formed name (e.g. `FHS`, `BHS`).
        found: Option<String>,
    },
    #[error("MSH-1 (field separator) {reason}")]
    BadFieldSeparator { reason: &'static str },
    #[error("MSH-2 (encoding characters) {reason}")]
    BadEncodingCharacters { reason: &'static str },
    #[error(
        "segment {index} (line {line}) has no valid segment name: expected 3 characters A-Z/0-9 followed by the field separator or the end of the line (a line break inside a field value?)"
    )]
    BadSegmentName { index: usize, line: usize },
    #[error(
        "segment {index} (line {line}) is a second `MSH`: exactly one message per frame is accepted (split batches before parsing)"
    )]
    UnexpectedMsh { index: usize, line: usize },
    #[error("MSH-9 (message type) is missing")]
    MissingMessageType,
    #[error("MSH-9 (message type `{code}`) is missing the trigger event (MSH-9.2)")]
    MissingTriggerEvent { code: String },
    #[error("MSH-10 (message control id) is missing or empty")]
    MissingControlId,
    #[error("MSH-12 (version id) is missing or empty")]
    MissingVersion,
}

impl ParseError {
    /// The HL7 table 0357 code to report in a negative ACK.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ParseError::Empty
            | ParseError::MissingMsh { .. }
            | ParseError::BadSegmentName { .. }
            | ParseError::UnexpectedMsh { .. } => ErrorCode::SegmentSequenceError,
            ParseError::BadFieldSeparator { .. } | ParseError::BadEncodingCharacters { .. } => {
                ErrorCode::DataTypeError
            }
            ParseError::MissingMessageType
            | ParseError::MissingTriggerEvent { .. }
            | ParseError::MissingControlId
            | ParseError::MissingVersion => ErrorCode::RequiredFieldMissing,
        }
    }

    /// The error location in HL7 ERL form (`SEG^sequence^field^repetition^component`), with `^`
    /// as the component separator (`build_ack` re-encodes it with the message's own).
    /// `None` when the failing segment has no usable name.
    pub fn location(&self) -> Option<String> {
        let loc = match self {
            ParseError::Empty | ParseError::MissingMsh { .. } => "MSH^1",
            ParseError::BadFieldSeparator { .. } => "MSH^1^1",
            ParseError::BadEncodingCharacters { .. } => "MSH^1^2",
            ParseError::MissingMessageType => "MSH^1^9",
            ParseError::MissingTriggerEvent { .. } => "MSH^1^9^1^2",
            ParseError::MissingControlId => "MSH^1^10",
            ParseError::MissingVersion => "MSH^1^12",
            ParseError::UnexpectedMsh { .. } => "MSH^2",
            ParseError::BadSegmentName { .. } => return None,
        };
        Some(loc.to_owned())
    }

    /// This error as an ACK error (severity `E`), ready for `build_ack`.
    pub fn to_ack_error(&self) -> super::ack::AckError {
        super::ack::AckError {
            code: self.error_code(),
            location: self.location(),
            message: self.to_string(),
            severity: 'E',
        }
    }
}

/// Why `decode_to_utf8` could not produce text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CharsetError {
    #[error(
        "MSH-18 declares character set `{name}`, which is unknown or unsupported, and no fallback encoding is configured"
    )]
    UnknownCharset { name: String },
    #[error(
        "MSH-18 declares ASCII but byte offset {offset} holds 8-bit byte 0x{byte:02X}, and no fallback encoding is configured"
    )]
    NotAscii { offset: usize, byte: u8 },
    #[error("message bytes are invalid in {encoding} (first bad byte at offset {offset}){}", retried.map(|r| format!(" and also invalid in fallback {r}")).unwrap_or_default())]
    Malformed {
        encoding: &'static str,
        offset: usize,
        /// The fallback that was tried as well, if any.
        retried: Option<&'static str>,
    },
}

impl CharsetError {
    /// The HL7 table 0357 code to report in a negative ACK.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            CharsetError::UnknownCharset { .. } => ErrorCode::TableValueNotFound,
            CharsetError::NotAscii { .. } | CharsetError::Malformed { .. } => {
                ErrorCode::DataTypeError
            }
        }
    }

    /// ERL location: always MSH-18, the field that declares the charset.
    pub fn location(&self) -> Option<String> {
        Some("MSH^1^18".to_owned())
    }

    /// This error as an ACK error (severity `E`), ready for `build_ack`.
    pub fn to_ack_error(&self) -> super::ack::AckError {
        super::ack::AckError {
            code: self.error_code(),
            location: self.location(),
            message: self.to_string(),
            severity: 'E',
        }
    }
}

/// Makes a protocol identifier (MSH-9 code, MSH-18 name) safe to quote in an error: printable
/// ASCII only, at most 24 characters. Anything else is replaced so that a mis-framed message
/// (patient text where an identifier should be) cannot leak through an error message.
pub(crate) fn safe_token(s: &str) -> String {
    let ok = !s.is_empty()
        && s.chars().count() <= 24
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | '.' | ' '));
    if ok {
        s.to_owned()
    } else {
        "<unprintable>".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in ALL_CODES {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        assert_eq!(ErrorCode::RequiredFieldMissing.code(), 101);
        assert_eq!(ErrorCode::from_code(999), None);
    }

    #[test]
    fn safe_token_rejects_free_text() {
        assert_eq!(safe_token("ADT"), "ADT");
        assert_eq!(safe_token("8859/1"), "8859/1");
        assert_eq!(safe_token("Müller"), "<unprintable>");
        assert_eq!(
            safe_token("a very long string that could be a note"),
            "<unprintable>"
        );
        assert_eq!(safe_token(""), "<unprintable>");
    }
}
