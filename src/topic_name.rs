//! The one check of a Kafka topic name, used by every builder that takes one.

/// Checks `topic` against Kafka's rules (1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`);
/// the error says what is wrong, for a [`ConfigError`](crate::ConfigError).
pub(crate) fn check(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() {
        return Err("the topic name is empty".into());
    }
    if topic.len() > 249 {
        return Err(format!("`{topic}` is longer than 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("`{topic}` is not a valid topic name"));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{topic}` contains {c:?}; topic names use ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn kafkas_rules() {
        assert!(check("notify.v1.dlt").is_ok());
        assert!(check(&"a".repeat(249)).is_ok());
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/topic",
            "ü",
            &"a".repeat(250),
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
    }
}
