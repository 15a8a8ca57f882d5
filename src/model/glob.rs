//! Key globs (`*`, `?`).
//!
//! A [`KeyGlob`] selects desired-state keys for `[[desired.rule]]`, `[[desired.conflict]]`
//! and `[[desired.handler]]`: `*` matches any run of characters (also none), `?` exactly one
//! character, every other character matches itself. Keys are `[A-Za-z0-9_.-]`, so there is
//! nothing to escape, and a pattern holds only those characters and the two wildcards.
//!
//! Matching never backtracks exponentially: it is the classic two-pointer wildcard algorithm,
//! which remembers only the last `*` seen. Its worst case is O(pattern × key) steps, and a
//! pattern is at most 128 characters, so matching is linear in the key's length whatever the
//! pattern (`*a*a*a*a*b` against a long run of `a` included).

use crate::model::text::shorten;
use std::fmt;

/// A key glob: `*` matches any run of characters (also none), `?` exactly one; every other
/// character matches itself. Keys are `[A-Za-z0-9_.-]`, so there is nothing to escape.
/// Serialized as its pattern.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyGlob(pub String);

/// Longest pattern, in characters (the longest key is 128 characters too).
pub const MAX_PATTERN_CHARS: usize = 128;

fn is_pattern_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '*' | '?')
}

impl KeyGlob {
    /// Check and wrap a pattern: 1-128 characters of `[A-Za-z0-9_.-]`, `*` and `?`.
    pub fn new(pattern: &str) -> Result<KeyGlob, String> {
        const EXPECTED: &str =
            "expected a key glob of 1-128 characters of [A-Za-z0-9_.-] and the wildcards * and ?";
        if pattern.is_empty() {
            return Err(format!("{EXPECTED}, found an empty string"));
        }
        if let Some((at, c)) = pattern.char_indices().find(|&(_, c)| !is_pattern_char(c)) {
            return Err(format!(
                "{EXPECTED}, found {:?} ({c:?} at byte {at} is not allowed)",
                shorten(pattern)
            ));
        }
        // Only ASCII from here on: bytes are characters.
        if pattern.len() > MAX_PATTERN_CHARS {
            return Err(format!(
                "{EXPECTED}, found {} characters: {:?}",
                pattern.len(),
                shorten(pattern)
            ));
        }
        Ok(KeyGlob(pattern.to_owned()))
    }

    /// Whether `key` matches the whole pattern.
    ///
    /// Also well-defined for a `KeyGlob` built directly rather than through [`KeyGlob::new`]
    /// and for keys outside `[A-Za-z0-9_.-]`: `?` always stands for one character (not one
    /// byte).
    pub fn matches(&self, key: &str) -> bool {
        let pattern = self.0.as_str();
        if pattern.is_ascii() && key.is_ascii() {
            wildcard_match(pattern.as_bytes(), key.as_bytes(), b'*', b'?')
        } else {
            let pattern: Vec<char> = pattern.chars().collect();
            let key: Vec<char> = key.chars().collect();
            wildcard_match(&pattern, &key, '*', '?')
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The two-pointer wildcard match: walk the key once; on a mismatch after a `*`, let that
/// `*` swallow one more character and resume just after it. Only the last `*` matters (an
/// earlier one could only swallow less, which the later one covers), so there is no
/// backtracking tree.
fn wildcard_match<T: Copy + Eq>(pattern: &[T], key: &[T], star: T, any: T) -> bool {
    let (mut p, mut k) = (0, 0);
    // Position of the last `*` in the pattern, and the key position it was matched at.
    let mut resume: Option<(usize, usize)> = None;
    while k < key.len() {
        match pattern.get(p) {
            Some(&c) if c == star => {
                p += 1;
                resume = Some((p, k));
            }
            Some(&c) if c == any || c == key[k] => {
                p += 1;
                k += 1;
            }
            _ => match resume {
                Some((after_star, matched_at)) => {
                    p = after_star;
                    k = matched_at + 1;
                    resume = Some((after_star, k));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(pattern: &str) -> KeyGlob {
        KeyGlob::new(pattern).unwrap_or_else(|err| panic!("{pattern:?}: {err}"))
    }

    #[test]
    fn literal_patterns_match_only_themselves() {
        let g = glob("led.mode");
        assert!(g.matches("led.mode"));
        for key in ["led.mod", "led.modes", "led-mode", "LED.mode", ""] {
            assert!(!g.matches(key), "{key:?}");
        }
    }

    #[test]
    fn star_matches_any_run_including_none() {
        let g = glob("led.*");
        for key in ["led.", "led.mode", "led.a.b.c"] {
            assert!(g.matches(key), "{key:?}");
        }
        for key in ["led", "le.mode", "xled.mode"] {
            assert!(!g.matches(key), "{key:?}");
        }
        assert!(glob("*").matches(""));
        assert!(glob("*").matches("anything.at-all_9"));
        assert!(glob("**").matches("x"));
        assert!(glob("*.mode").matches(".mode"));
        assert!(glob("*.mode").matches("fan.mode"));
        assert!(!glob("*.mode").matches("fan.modes"));
        assert!(glob("a*b*c").matches("abc"));
        assert!(glob("a*b*c").matches("aXXbYYc"));
        assert!(!glob("a*b*c").matches("aXXbYY"));
        assert!(glob("*b*").matches("abba"));
        assert!(!glob("*b*").matches("aaaa"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        let g = glob("zone?.setpoint");
        assert!(g.matches("zone1.setpoint"));
        assert!(g.matches("zoneA.setpoint"));
        assert!(!g.matches("zone.setpoint"));
        assert!(!g.matches("zone12.setpoint"));
        assert!(glob("???").matches("abc"));
        assert!(!glob("???").matches("ab"));
        assert!(!glob("???").matches("abcd"));
        assert!(glob("?*").matches("a"));
        assert!(!glob("?*").matches(""));
        assert!(glob("*?").matches("ab"));
        assert!(glob("a?*?b").matches("aXYb"));
        assert!(!glob("a?*?b").matches("aXb"));
    }

    #[test]
    fn matching_needs_the_last_star_to_retry() {
        // The first "b" after the star is not the one that completes the match.
        assert!(glob("*bc").matches("abbc"));
        assert!(glob("a*ab").matches("aaab"));
        assert!(glob("*a?c").matches("xxabcxabc"));
        assert!(!glob("*a?c").matches("xxabcxab"));
        assert!(glob("*.*.x").matches("a.b.c.x"));
    }

    #[test]
    fn pathological_patterns_run_in_linear_time() {
        let long_a = "a".repeat(100_000);
        let start = std::time::Instant::now();
        assert!(!glob("*a*a*a*a*b").matches(&long_a));
        assert!(glob("*a*a*a*a*a").matches(&long_a));
        let many_stars = "*a".repeat(60) + "b";
        assert!(!glob(&many_stars).matches(&long_a));
        let with_b = format!("{long_a}b");
        assert!(glob(&many_stars).matches(&with_b));
        assert!(!glob(&"?".repeat(128)).matches(&long_a));
        // Exponential backtracking would take ages; the two-pointer walk takes milliseconds
        // (a generous bound, for slow CI machines and debug builds).
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn non_ascii_keys_count_characters_not_bytes() {
        // Keys are ASCII by contract; matching stays well-defined if one is not.
        assert!(glob("?").matches("ü"));
        assert!(glob("a?c").matches("aüc"));
        assert!(!glob("a??c").matches("aüc"));
        assert!(glob("*").matches("ü"));
        assert!(!glob("u").matches("ü"));
        let direct = KeyGlob("ü*".to_owned());
        assert!(direct.matches("über"));
        assert!(!direct.matches("uber"));
    }

    #[test]
    fn new_accepts_the_allowed_characters() {
        let max = "Z".repeat(128);
        for pattern in [
            "a",
            "*",
            "?",
            "A.b_C-9",
            "sensor.*.unit",
            "zone?-*",
            max.as_str(),
        ] {
            let g = glob(pattern);
            assert_eq!(g.as_str(), pattern);
            assert_eq!(g.to_string(), pattern);
            assert_eq!(g, KeyGlob(pattern.to_owned()));
        }
    }

    #[test]
    fn new_rejects_empty_long_and_foreign_characters() {
        let err = KeyGlob::new("").unwrap_err();
        assert!(err.ends_with("found an empty string"), "{err}");
        let err = KeyGlob::new(&"a".repeat(129)).unwrap_err();
        assert!(err.contains("found 129 characters"), "{err}");
        for (pattern, bad) in [
            ("led mode", "' ' at byte 3"),
            ("led/*", "'/' at byte 3"),
            ("[ab]", "'[' at byte 0"),
            ("a\\*", "'\\\\' at byte 1"),
            ("über", "'ü' at byte 0"),
            ("a{b}", "'{' at byte 1"),
        ] {
            let err = KeyGlob::new(pattern).unwrap_err();
            assert!(
                err.starts_with("expected a key glob of 1-128 characters"),
                "{pattern:?}: {err}"
            );
            assert!(err.contains(bad), "{pattern:?}: {err}");
        }
    }
}
