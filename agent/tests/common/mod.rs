//! Shared by the agent's integration tests.

/// Says why a test cannot run on this machine; with `NBAGENT_TEST_REQUIRE=1` (CI and
/// `scripts/test.sh`, which install everything) a skip is a failure instead.
pub fn say_skip(msg: &str) {
    let required = std::env::var("NBAGENT_TEST_REQUIRE").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{msg}; NBAGENT_TEST_REQUIRE=1 says this machine must run it"
    );
    eprintln!("{msg}");
}
