//! VM names: what a user may call a VM. A name becomes a directory under the host's VM
//! storage path, so it must never escape that directory nor break QEMU's option syntax.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest VM name accepted (Hyper-V allows 100; we keep room for " - Test").
pub const MAX_NAME_LEN: usize = 64;

/// Why a VM name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("VM name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("VM name is {0} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    /// The name holds a character that could escape a directory or break QEMU options.
    #[error("VM name contains {0:?}; use letters, digits, spaces, '.', '_' and '-'")]
    BadChar(char),
    /// The name starts or ends with a character that makes it ambiguous on disk.
    #[error("VM name must start with a letter or digit and not end with a space or '.'")]
    BadEdge,
}

/// A validated VM name: letters, digits, spaces, `.`, `_`, `-`; starts with a letter or
/// digit (so never `.` or `..`), never ends with a space or a dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong(len));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, ' ' | '.' | '_' | '-')))
        {
            return Err(NameError::BadChar(c));
        }
        let first = name.chars().next().unwrap_or(' ');
        let last = name.chars().last().unwrap_or(' ');
        if !first.is_ascii_alphanumeric() || last == ' ' || last == '.' {
            return Err(NameError::BadEdge);
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for VmName {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<VmName> for String {
    fn from(value: VmName) -> Self {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in [
            "web01",
            "SQL Server 2",
            "db-1.prod",
            "a",
            "x_y",
            "VM - Test",
        ] {
            assert_eq!(VmName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_names_that_escape_or_break_things() {
        let cases: &[(&str, NameError)] = &[
            ("", NameError::Empty),
            ("..", NameError::BadEdge),
            (".hidden", NameError::BadEdge),
            ("../etc", NameError::BadChar('/')),
            ("a/b", NameError::BadChar('/')),
            ("a,b", NameError::BadChar(',')),
            ("a\0b", NameError::BadChar('\0')),
            ("trailing ", NameError::BadEdge),
            ("dot.", NameError::BadEdge),
            ("-flag", NameError::BadEdge),
            ("naïve", NameError::BadChar('ï')),
        ];
        for (name, want) in cases {
            assert_eq!(VmName::new(name).unwrap_err(), *want, "{name:?}");
        }
        assert_eq!(
            VmName::new(&"a".repeat(65)).unwrap_err(),
            NameError::TooLong(65)
        );
        assert!(VmName::new(&"a".repeat(64)).is_ok());
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<VmName>("\"../x\"").is_err());
        assert_eq!(
            serde_json::from_str::<VmName>("\"ok\"").unwrap().as_str(),
            "ok"
        );
    }
}
