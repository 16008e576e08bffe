//! The `mail_notifier` example's ops assets (`examples/mail_notifier/ops/`): the Grafana
//! dashboard and the Prometheus alert rules name only metrics kourier registers
//! (`kourier::metrics::METRIC_NAMES`), the dashboard shows every one of them, the rules cover
//! the conditions operators page on, and both files are well formed.
//!
//! Needs no services. The YAML check is structural (indentation, the keys each rule needs,
//! balanced brackets in expressions), written here to avoid a YAML dev-dependency; the
//! expressions were also checked with Prometheus' own PromQL parser when they were written.

use std::collections::{BTreeMap, BTreeSet};

use kourier::metrics::{self, METRIC_NAMES};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../examples/mail_notifier/ops/grafana-dashboard.json");
const RULES: &str = include_str!("../examples/mail_notifier/ops/prometheus-alerts.yml");
const METRICS_SOURCE: &str = include_str!("../src/metrics.rs");

/// Series suffixes a Prometheus exporter adds to a histogram's name.
const HISTOGRAM_SUFFIXES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Every `kourier_[a-z_]+` word in `text`.
fn kourier_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("kourier_") {
        let start = from + at;
        let boundary = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_')
        };
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            names.insert(text[start..end].to_owned());
        }
        from = end.max(start + 1);
    }
    names
}

/// The library metric a series name refers to: the name itself, or a histogram's base name
/// without its exporter suffix.
fn library_metric(series: &str) -> Option<&'static str> {
    let known = |name: &str| METRIC_NAMES.iter().copied().find(|m| *m == name);
    known(series).or_else(|| {
        HISTOGRAM_SUFFIXES
            .iter()
            .find_map(|suffix| series.strip_suffix(suffix).and_then(known))
    })
}

/// The library metrics `text` uses; fails naming any series that is not kourier's.
fn library_metrics_in(file: &str, text: &str) -> BTreeSet<&'static str> {
    let names = kourier_names(text);
    let unknown: Vec<&String> = names
        .iter()
        .filter(|n| library_metric(n).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "{file} uses metric names kourier does not register: {unknown:?}\n\
         known (kourier::metrics::METRIC_NAMES, histograms also with {HISTOGRAM_SUFFIXES:?}): \
         {METRIC_NAMES:?}"
    );
    assert!(!names.is_empty(), "{file} names no kourier metric at all");
    names.iter().filter_map(|n| library_metric(n)).collect()
}

#[test]
fn metric_names_are_the_documented_ones() {
    // The table in `kourier::metrics`' docs lists one metric per row.
    let documented: BTreeSet<String> = METRICS_SOURCE
        .lines()
        .filter_map(|line| line.strip_prefix("//! | `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|name| name.starts_with("kourier_"))
        .map(str::to_owned)
        .collect();
    let listed: BTreeSet<String> = METRIC_NAMES.iter().map(|n| (*n).to_owned()).collect();
    assert_eq!(
        listed, documented,
        "METRIC_NAMES and the table in src/metrics.rs differ"
    );
    assert_eq!(listed.len(), METRIC_NAMES.len(), "a name is listed twice");
    for name in METRIC_NAMES {
        let valid = name.starts_with("kourier_")
            && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        assert!(valid, "{name} is not a plain Prometheus metric name");
    }
}

#[test]
fn dashboard_and_alert_rules_name_only_kourier_metrics() {
    library_metrics_in("grafana-dashboard.json", DASHBOARD);
    library_metrics_in("prometheus-alerts.yml", RULES);
}

#[test]
fn dashboard_shows_every_metric() {
    let used = library_metrics_in("grafana-dashboard.json", DASHBOARD);
    let missing: Vec<&&str> = METRIC_NAMES.iter().filter(|m| !used.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard has no panel for {missing:?}"
    );
}

#[test]
fn alert_rules_cover_what_operators_page_on() {
    let used = library_metrics_in("prometheus-alerts.yml", RULES);
    for needed in [
        metrics::CONSUMER_LAG,
        metrics::RECORDS_DEAD_LETTERED,
        metrics::DEAD_LETTER_WRITE_FAILURES,
        metrics::COMMIT_FAILURES,
        metrics::STORE_ERRORS,
        metrics::PARTITION_PAUSED,
        metrics::RECORDS_IN_FLIGHT,
    ] {
        assert!(used.contains(needed), "no alert rule uses {needed}");
    }
    let rules = parse_rules(RULES);
    assert!(
        rules.iter().any(|r| r.name.contains("Stalled")),
        "a rule alerts on a consumer that makes no progress"
    );
}

#[test]
fn dashboard_is_well_formed_grafana_json() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON");
    for key in ["title", "uid"] {
        assert!(
            dashboard[key].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard {key} is missing"
        );
    }
    assert!(dashboard["schemaVersion"].is_u64(), "schemaVersion");

    let variables: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for variable in ["datasource", "group", "topic"] {
        assert!(variables.contains(variable), "no ${variable} variable");
    }

    let panels = dashboard["panels"].as_array().expect("panels is an array");
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} is used twice ({title})");
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        assert!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24)
                && grid["y"].is_u64()
                && grid["h"].as_u64().is_some_and(|h| h > 0),
            "panel {title:?} has a bad gridPos: {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        assert!(!targets.is_empty(), "panel {title:?} has no targets");
        let mut ref_ids = BTreeSet::new();
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of {title:?} has no expr"));
            assert!(
                !kourier_names(expr).is_empty(),
                "{title:?}: {expr} names no kourier metric"
            );
            assert!(
                expr.contains("group=~\"$group\""),
                "{title:?}: {expr} ignores the $group selection"
            );
            assert_balanced(expr);
            let ref_id = target["refId"].as_str().expect("refId");
            assert!(ref_ids.insert(ref_id), "{title:?}: refId {ref_id} twice");
            queries += 1;
        }
    }
    assert!(queries >= METRIC_NAMES.len(), "only {queries} queries");
}

#[test]
fn alert_rules_are_well_formed_yaml() {
    for (n, line) in RULES.lines().enumerate() {
        let n = n + 1;
        assert!(
            !line.contains('\t'),
            "line {n}: a tab (YAML indents with spaces)"
        );
        assert_eq!(line, line.trim_end(), "line {n}: trailing whitespace");
        let indent = line.len() - line.trim_start().len();
        assert!(
            line.trim().is_empty() || indent % 2 == 0,
            "line {n}: odd indentation"
        );
    }
    let first_key = RULES
        .lines()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    assert_eq!(first_key, Some("groups:"), "the file starts with `groups:`");
    assert!(
        RULES.contains("\n  - name: "),
        "`groups` is a list of named groups"
    );
    assert!(RULES.contains("\n    rules:\n"), "a group has `rules`");

    let rules = parse_rules(RULES);
    assert!(rules.len() >= 7, "only {} rules", rules.len());
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = &rule.name;
        assert!(names.insert(name.clone()), "alert {name} is defined twice");
        assert!(
            name.starts_with("Kourier") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "alert name {name:?}"
        );
        for key in ["expr", "for", "labels", "annotations"] {
            assert!(rule.keys.contains_key(key), "alert {name} has no `{key}`");
        }
        let severity = rule.keys.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "alert {name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            let text = rule.keys.get(key).map(String::as_str).unwrap_or_default();
            assert!(
                text.len() > 2 && text.starts_with('"') && text.ends_with('"'),
                "alert {name}: `{key}` is a quoted string"
            );
            assert!(
                !text[1..text.len() - 1].contains('"'),
                "alert {name}: `{key}` has an unescaped quote"
            );
        }
        let duration = &rule.keys["for"];
        let (digits, unit) = duration.split_at(duration.len() - 1);
        assert!(
            !digits.is_empty()
                && digits.chars().all(|c| c.is_ascii_digit())
                && matches!(unit, "s" | "m" | "h"),
            "alert {name}: `for: {duration}` is not a duration"
        );
        assert!(
            !kourier_names(&rule.expr).is_empty(),
            "alert {name}: the expression names no kourier metric"
        );
        assert_balanced(&rule.expr);
    }
}

/// One alerting rule: its name, its `expr` (block scalar or inline) and the scalar values
/// of its other keys, nested ones (`severity`, `summary`, ...) included.
#[derive(Debug)]
struct Rule {
    name: String,
    expr: String,
    keys: BTreeMap<String, String>,
}

/// Reads the rules of the constrained YAML this file uses: `- alert: Name` items, keys one
/// level deeper, `expr: |` block scalars.
fn parse_rules(yaml: &str) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_indent = 0;
    let mut block: Option<usize> = None; // indentation of the `expr: |` key while inside it
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if let Some(key_indent) = block {
            if text.is_empty() || indent > key_indent {
                let rule = rules.last_mut().expect("inside a rule");
                rule.expr.push_str(text);
                rule.expr.push('\n');
                continue;
            }
            block = None;
        }
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if let Some(name) = text.strip_prefix("- alert: ") {
            rule_indent = indent;
            rules.push(Rule {
                name: name.to_owned(),
                expr: String::new(),
                keys: BTreeMap::new(),
            });
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if indent <= rule_indent {
            continue; // a new group, or the end of the rules
        }
        let (key, value) = text
            .split_once(':')
            .unwrap_or_else(|| panic!("alert {}: `{text}` is not `key: value`", rule.name));
        let value = value.trim();
        if key == "expr" && value == "|" {
            block = Some(indent);
        } else if key == "expr" {
            rule.expr = value.to_owned();
        }
        rule.keys.insert(key.to_owned(), value.to_owned());
    }
    rules
}

/// Parentheses, brackets and braces in a PromQL expression pair up (outside strings).
fn assert_balanced(expr: &str) {
    let mut open = Vec::new();
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let expected = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                assert_eq!(open.pop(), Some(expected), "unbalanced `{c}` in: {expr}");
            }
            _ => {}
        }
    }
    assert!(!in_string, "unterminated string in: {expr}");
    assert!(open.is_empty(), "unclosed {open:?} in: {expr}");
}
