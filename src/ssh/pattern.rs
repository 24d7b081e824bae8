//! OpenSSH pattern matching, shared by ssh_config `Host` lines, known_hosts host fields and
//! host certificate principals: `*` matches any run of characters, `?` exactly one, and a
//! pattern list is comma- or space-separated with `!` excluding (OpenSSH's `match.c`).

/// Matches `text` against a glob with `*` (any run, also empty) and `?` (one character).
/// The comparison is exact; callers lowercase host names first.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            backtrack = Some((p, t));
            p += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Matches a host name against a list of patterns, ignoring ASCII case. The host matches
/// when at least one plain pattern matches and no `!pattern` does: a matching negation
/// rejects the host whatever else matches, as in ssh_config(5) and sshd(8).
pub fn host_matches_list<'a>(patterns: impl IntoIterator<Item = &'a str>, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let mut matched = false;
    for pattern in patterns {
        let pattern = pattern.to_ascii_lowercase();
        if let Some(negated) = pattern.strip_prefix('!') {
            if glob_matches(negated, &host) {
                return false;
            }
        } else if glob_matches(&pattern, &host) {
            matched = true;
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matching() {
        assert!(glob_matches("a*c", "abbbc"));
        assert!(glob_matches("a?c", "abc"));
        assert!(!glob_matches("a?c", "abbc"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("*.lan", "edge1.lan"));
        assert!(!glob_matches("*.lan", "edge1.lan.example"));
    }

    #[test]
    fn negation_rejects_whatever_else_matches() {
        let patterns = ["*.plant-a.lan", "!bad.plant-a.lan"];
        assert!(host_matches_list(patterns, "e1.plant-a.lan"));
        assert!(!host_matches_list(patterns, "bad.plant-a.lan"));
        assert!(
            !host_matches_list(["!bad"], "good"),
            "negation alone matches nothing"
        );
    }

    #[test]
    fn case_is_ignored() {
        assert!(host_matches_list(["EDGE-*"], "edge-01"));
        assert!(host_matches_list(["edge-*"], "EDGE-01"));
    }
}
