//! Which event types an endpoint subscribes to.
//!
//! An endpoint lists patterns (`event_types`, checked by [`crate::validation`]): an exact type
//! such as `database.created`, or a prefix ending in `.*` such as `database.*`. An empty list
//! subscribes to everything (spec, "Decisions").

/// Whether an endpoint subscribed with `patterns` receives events of type `event_type`.
///
/// An empty list matches every type; otherwise the type must match at least one pattern (see
/// [`matches_pattern`]). Matching is exact and case-sensitive: `Database.created` is another type.
pub fn matches(patterns: &[String], event_type: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| matches_pattern(p, event_type))
}

/// Whether one pattern matches `event_type`.
///
/// A pattern ending in `.*` matches any type that starts with the part before `.*`, then a dot,
/// then at least one more character: `database.*` matches `database.created` and
/// `database.backup.done`, but not `database` itself nor `databases.created` (the dot keeps
/// segment boundaries, so a prefix never matches half a word). Any other pattern matches only the
/// identical type; a `*` elsewhere is not a wildcard.
pub fn matches_pattern(pattern: &str, event_type: &str) -> bool {
    match pattern.strip_suffix(".*") {
        // A bare ".*" has no prefix; validation refuses it, and it must not match everything.
        Some("") => false,
        Some(prefix) => event_type
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty()),
        None => pattern == event_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> Vec<String> {
        patterns.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn empty_list_matches_everything() {
        for t in ["database.created", "x", "a.b.c.d", ""] {
            assert!(matches(&[], t), "{t}");
        }
    }

    #[test]
    fn exact_patterns_match_only_the_same_type() {
        let patterns = list(&["database.created", "user.deleted"]);
        assert!(matches(&patterns, "database.created"));
        assert!(matches(&patterns, "user.deleted"));
        for t in [
            "database.deleted",
            "database",
            "database.created.late",
            "database.create",
            "user",
            "",
        ] {
            assert!(!matches(&patterns, t), "{t}");
        }
    }

    #[test]
    fn matching_is_case_sensitive() {
        let patterns = list(&["database.created", "user.*"]);
        assert!(!matches(&patterns, "Database.created"));
        assert!(!matches(&patterns, "DATABASE.CREATED"));
        assert!(!matches(&patterns, "User.deleted"));
        assert!(matches(&patterns, "user.Deleted"));
    }

    #[test]
    fn wildcard_matches_one_or_more_segments_after_the_prefix() {
        let patterns = list(&["database.*"]);
        assert!(matches(&patterns, "database.created"));
        assert!(matches(&patterns, "database.backup.done"));
        for t in [
            "database",
            "database.",
            "databases.created",
            "databas.created",
            "xdatabase.created",
            "",
        ] {
            assert!(!matches(&patterns, t), "{t}");
        }
    }

    #[test]
    fn nested_wildcards() {
        assert!(matches_pattern("database.backup.*", "database.backup.done"));
        assert!(!matches_pattern("database.backup.*", "database.backup"));
        assert!(!matches_pattern("database.backup.*", "database.created"));
    }

    #[test]
    fn any_pattern_of_several_suffices() {
        let patterns = list(&["user.created", "database.*"]);
        assert!(matches(&patterns, "user.created"));
        assert!(matches(&patterns, "database.deleted"));
        assert!(!matches(&patterns, "user.deleted"));
    }

    #[test]
    fn stars_elsewhere_are_literal() {
        assert!(!matches_pattern(".*", "database.created"));
        assert!(!matches_pattern("*", "database"));
        assert!(matches_pattern("*", "*"));
        assert!(!matches_pattern("database*", "database.created"));
        assert!(!matches_pattern("*.created", "database.created"));
        assert!(matches_pattern("database.*", "database.*"));
    }
}
