//! Fuzzing on stable Rust: property-based targets (proptest) over what strangers' bytes reach —
//! the frame reader, the config loader, query and token extraction, handshake admission, the
//! request path's dot segments and the replay cursor. Each target checks the code against a
//! plain model or an invariant, not only that it does not panic.
//!
//! The test command runs a bounded number of cases per target; `scripts/fuzz.sh` runs millions
//! (through `PROPTEST_CASES`). A failure found there becomes a named regression test next to
//! the code it broke; nothing is persisted into the source tree.

mod admission;
mod config;
mod frames;
mod path;
mod query;
mod replay;

use proptest::test_runner::Config;

/// Cases per target in the test command, when `PROPTEST_CASES` does not say.
const TEST_COMMAND_CASES: u32 = 1000;

pub(super) fn cases() -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = TEST_COMMAND_CASES;
    }
    config.failure_persistence = None;
    config
}
