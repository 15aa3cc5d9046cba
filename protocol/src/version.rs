//! Protocol version negotiation: the agent offers a range, the server picks the highest
//! version both speak, or refuses with [`ErrorCode::UnsupportedVersion`](crate::ErrorCode).

use serde::{Deserialize, Serialize};

/// An inclusive range of protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u16,
    /// Newest version spoken.
    pub max: u16,
}

/// The versions this build of the protocol speaks.
pub const SUPPORTED: VersionRange = VersionRange { min: 1, max: 1 };

impl VersionRange {
    /// A range; `min > max` makes an empty range that overlaps nothing.
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    /// Whether `v` is in the range.
    pub fn contains(&self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }
}

impl std::fmt::Display for VersionRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// No version in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no protocol version in common: peer speaks {offered}, we speak {supported}; \
     upgrade the older side"
)]
pub struct VersionError {
    /// What the peer offered.
    pub offered: VersionRange,
    /// What we speak.
    pub supported: VersionRange,
}

/// Picks the highest version in both ranges.
pub fn negotiate(offered: VersionRange, supported: VersionRange) -> Result<u16, VersionError> {
    let hi = offered.max.min(supported.max);
    let lo = offered.min.max(supported.min);
    if lo <= hi && offered.min <= offered.max && supported.min <= supported.max {
        Ok(hi)
    } else {
        Err(VersionError { offered, supported })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // unit tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn picks_highest_common() {
        assert_eq!(
            negotiate(VersionRange::new(1, 5), VersionRange::new(2, 3)),
            Ok(3)
        );
        assert_eq!(
            negotiate(VersionRange::new(3, 3), VersionRange::new(1, 9)),
            Ok(3)
        );
    }

    #[test]
    fn refuses_disjoint_and_empty() {
        let e = negotiate(VersionRange::new(4, 6), VersionRange::new(1, 3)).unwrap_err();
        assert!(e.to_string().contains("peer speaks 4..=6"), "{e}");
        assert!(negotiate(VersionRange::new(3, 1), VersionRange::new(1, 3)).is_err());
    }
}
