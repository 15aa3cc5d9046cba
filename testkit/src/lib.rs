//! What every test crate of the workspace shares: the rule for tests that cannot run on
//! a machine that lacks root, `/dev/fuse`, CRIU, the kernel venv or the notebook users.

#![forbid(unsafe_code)]

/// The variable that forbids skipping (`scripts/test.sh`, and so CI, set it to `1`).
pub const REQUIRE_VAR: &str = "NBAGENT_TEST_REQUIRE";

/// Whether `value` (of [`REQUIRE_VAR`]) forbids skipping.
pub fn skipping_forbidden(value: Option<&str>) -> bool {
    value == Some("1")
}

/// Says why a test cannot run on this machine (the caller then returns); with
/// `NBAGENT_TEST_REQUIRE=1` (CI and `scripts/test.sh`, which install everything) a
/// skip is a failure instead.
///
/// # Panics
///
/// When skipping is forbidden: the test fails with `msg`.
pub fn say_skip(msg: &str) {
    let value = std::env::var(REQUIRE_VAR).ok();
    assert!(
        !skipping_forbidden(value.as_deref()),
        "{msg}; {REQUIRE_VAR}=1 says this machine must run it"
    );
    eprintln!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_forbids_skipping() {
        assert!(skipping_forbidden(Some("1")));
        for v in [None, Some("0"), Some(""), Some("yes")] {
            assert!(!skipping_forbidden(v), "{v:?}");
        }
    }
}
