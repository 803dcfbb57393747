//! The config loader on damaged configs: the reference `proxy.toml` with lines deleted, doubled,
//! swapped, values replaced by hostile ones, junk inserted, or the text cut anywhere. Whatever
//! the text, loading ends in a config or in errors that each name `file:line:col`.

use std::path::Path;

use proptest::prelude::*;

use crate::config::Config;

const REFERENCE: &str = include_str!("../../proxy.toml");

const VALUES: &[&str] = &[
    "\"x\"",
    "\"\"",
    "0",
    "-1",
    "18446744073709551616",
    "1e300",
    "nan",
    "true",
    "[]",
    "{}",
    "[[]]",
    "\"10s\"",
    "\"-5s\"",
    "\"0s\"",
    "\"99999999999999h\"",
    "\"1KiB\"",
    "\"99999999999999999TiB\"",
    "\"off\"",
    "{ per_second = 0, burst = 0 }",
    "{ per_second = 1e308, burst = 1 }",
    "\"ws://127.0.0.1:1/\"",
    "\"http://127.0.0.1:1/\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:0\"",
    "\"\\u0000\"",
    "\"é\"",
    "'''a\nb'''",
    "\"{user}\"",
    "\"{claim.}\"",
    "\"{\"",
    "\"}{\"",
    "\"/\"",
    "\"/a/../b\"",
    "[\"/a\", \"/a\"]",
    "\"prefix\"",
    "\"none\"",
    "\"HS256\"",
    "\"RS256\"",
    "\"env:WSEDGE_FUZZ_UNSET\"",
    "\"file:missing.key\"",
];

const LINES: &[&str] = &[
    "[server]",
    "[admin]",
    "[log]",
    "[[route]]",
    "[policy.other]",
    "[route]",
    "unknown = 1",
    "path = \"/x\"",
    "match = \"prefix\"",
    "auth = \"nope\"",
    "upstream = \"ws://127.0.0.1:9/\"",
    "]",
    "=",
    "\"",
    "a.b.c = 1",
    "[policy.default.x]",
    "listen = [\"127.0.0.1:0\", \"127.0.0.1:0\"]",
];

#[derive(Debug, Clone)]
enum Damage {
    Delete(prop::sample::Index),
    Double(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    Value(prop::sample::Index, prop::sample::Index),
    Insert(prop::sample::Index, prop::sample::Index),
    Junk(prop::sample::Index, String),
    Cut(prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    use prop::sample::Index;
    prop_oneof![
        2 => any::<Index>().prop_map(Damage::Delete),
        1 => any::<Index>().prop_map(Damage::Double),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::Swap(a, b)),
        6 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::Value(a, b)),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Damage::Insert(a, b)),
        1 => (any::<Index>(), ".{0,12}").prop_map(|(a, s)| Damage::Junk(a, s)),
        1 => any::<Index>().prop_map(Damage::Cut),
    ]
}

/// The reference without its comments: every line left is a key or a table.
fn reference_lines() -> Vec<String> {
    REFERENCE
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

fn apply(lines: &mut Vec<String>, damage: &Damage) -> Option<usize> {
    let at = |i: &prop::sample::Index, len: usize| i.index(len.max(1));
    match damage {
        Damage::Delete(i) if !lines.is_empty() => {
            lines.remove(at(i, lines.len()));
        }
        Damage::Double(i) if !lines.is_empty() => {
            let line = lines[at(i, lines.len())].clone();
            lines.insert(at(i, lines.len()), line);
        }
        Damage::Swap(a, b) if !lines.is_empty() => {
            let (a, b) = (at(a, lines.len()), at(b, lines.len()));
            lines.swap(a, b);
        }
        Damage::Value(i, v) if !lines.is_empty() => {
            let len = lines.len();
            let line = &mut lines[at(i, len)];
            if let Some((key, _)) = line.split_once(" = ") {
                *line = format!("{key} = {}", VALUES[v.index(VALUES.len())]);
            }
        }
        Damage::Insert(i, l) => {
            let position = at(i, lines.len() + 1).min(lines.len());
            lines.insert(position, LINES[l.index(LINES.len())].to_owned());
        }
        Damage::Junk(i, junk) => {
            let position = at(i, lines.len() + 1).min(lines.len());
            lines.insert(position, junk.clone());
        }
        Damage::Cut(i) => return Some(i.index(usize::MAX)),
        _ => {}
    }
    None
}

proptest! {
    #![proptest_config(super::cases())]

    #[test]
    fn a_damaged_config_loads_or_every_error_has_a_location(
        damages in prop::collection::vec(damage(), 1..6)
    ) {
        let mut lines = reference_lines();
        let mut cut = None;
        for damage in &damages {
            cut = cut.or(apply(&mut lines, damage));
        }
        let mut text = lines.join("\n");
        if let Some(cut) = cut {
            let mut at = cut % (text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text.truncate(at);
        }
        let line_count = text.lines().count().max(1);
        if let Err(error) = Config::from_toml(&text, "proxy.toml", Path::new("/nonexistent")) {
            prop_assert!(!error.diagnostics.is_empty());
            for diagnostic in &error.diagnostics {
                let mut parts = diagnostic.splitn(4, ':');
                let (file, line, col) = (parts.next(), parts.next(), parts.next());
                prop_assert_eq!(file, Some("proxy.toml"), "{}", diagnostic);
                let line: usize = line.and_then(|l| l.parse().ok()).unwrap_or(0);
                let col: usize = col.and_then(|c| c.parse().ok()).unwrap_or(0);
                prop_assert!(
                    (1..=line_count + 1).contains(&line) && col >= 1,
                    "{} in:\n{}", diagnostic, text
                );
            }
        }
    }
}
