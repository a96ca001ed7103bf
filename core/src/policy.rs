//! What a tracked table syncs and how its conflicts resolve.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which way a table's changes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Direction {
    /// Local writes ship and remote writes apply.
    #[default]
    Both,
    /// Local writes ship; remote writes are never applied (a sensor log).
    UpOnly,
    /// Remote writes apply; local writes are not captured (reference data).
    DownOnly,
}

/// How concurrent writes to one column resolve.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ColumnPolicy {
    /// Last writer wins by hybrid logical clock, node id breaking exact ties.
    #[default]
    Lww,
    /// The write from the highest-ranked source role wins (first in the list ranks highest;
    /// roles not listed rank below all listed ones); last writer wins among equals.
    Authority(Vec<String>),
    /// A provisional last-writer-wins value is shown and a conflict record keeps every
    /// concurrent value until someone resolves it.
    Manual,
    /// A PN-counter: the column shows the exact sum of every node's increments and decrements.
    Counter,
}

/// What happens when a delete races an update of the same row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum DeletePolicy {
    /// The row stays deleted; the concurrent update is kept in the conflict log.
    #[default]
    DeleteWins,
    /// The row comes back with the update; the delete is kept in the conflict log.
    UpdateWins,
}

/// How one table is tracked.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TableSpec {
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub delete_policy: DeletePolicy,
    /// Columns not named here use [`ColumnPolicy::Lww`].
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnPolicy>,
}

impl TableSpec {
    pub fn new() -> TableSpec {
        TableSpec::default()
    }

    pub fn direction(mut self, direction: Direction) -> TableSpec {
        self.direction = direction;
        self
    }

    pub fn delete_policy(mut self, policy: DeletePolicy) -> TableSpec {
        self.delete_policy = policy;
        self
    }

    pub fn column(mut self, name: &str, policy: ColumnPolicy) -> TableSpec {
        self.columns.insert(name.to_owned(), policy);
        self
    }

    /// The policy of `column`, defaulting to last-writer-wins.
    pub fn policy(&self, column: &str) -> &ColumnPolicy {
        static LWW: ColumnPolicy = ColumnPolicy::Lww;
        self.columns.get(column).unwrap_or(&LWW)
    }
}

/// A policy string that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?}: expected lww, manual, counter or authority:ROLE>ROLE>...")]
pub struct ParsePolicyError(pub String);

impl FromStr for ColumnPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lww" => Ok(ColumnPolicy::Lww),
            "manual" => Ok(ColumnPolicy::Manual),
            "counter" => Ok(ColumnPolicy::Counter),
            _ => {
                let roles = s.strip_prefix("authority:").ok_or_else(|| ParsePolicyError(s.to_owned()))?;
                let roles: Vec<String> = roles.split('>').map(|r| r.trim().to_owned()).collect();
                if roles.iter().any(|r| r.is_empty()) {
                    return Err(ParsePolicyError(s.to_owned()));
                }
                Ok(ColumnPolicy::Authority(roles))
            }
        }
    }
}

impl fmt::Display for ColumnPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnPolicy::Lww => f.write_str("lww"),
            ColumnPolicy::Manual => f.write_str("manual"),
            ColumnPolicy::Counter => f.write_str("counter"),
            ColumnPolicy::Authority(roles) => write!(f, "authority:{}", roles.join(">")),
        }
    }
}

macro_rules! keyword_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $($ty::$variant => $text),+ })
            }
        }
        impl FromStr for $ty {
            type Err = ParsePolicyError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($ty::$variant),)+
                    _ => Err(ParsePolicyError(s.to_owned())),
                }
            }
        }
    };
}

keyword_enum!(Direction { Both => "both", UpOnly => "up-only", DownOnly => "down-only" });
keyword_enum!(DeletePolicy { DeleteWins => "delete-wins", UpdateWins => "update-wins" });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_their_text_form() {
        for text in ["lww", "manual", "counter", "authority:crm>erp>marketing"] {
            let policy: ColumnPolicy = text.parse().expect("valid policy");
            assert_eq!(policy.to_string(), text);
        }
        assert!("authority:".parse::<ColumnPolicy>().is_err());
        assert!("newest".parse::<ColumnPolicy>().is_err());
        assert_eq!("up-only".parse::<Direction>(), Ok(Direction::UpOnly));
        assert_eq!("update-wins".parse::<DeletePolicy>(), Ok(DeletePolicy::UpdateWins));
    }
}
