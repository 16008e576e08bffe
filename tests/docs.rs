//! The docs say what the code does, and keep saying it: the README's and the crate docs'
//! metrics tables are `kourier::metrics::METRIC_NAMES` with the labels the code registers
//! (`src/metrics.rs` checks its own table against the registered metrics), and every
//! delivery rule a comment or doc cites exists, numbered, in the crate docs.
//!
//! Needs no services. Files are read at run time from the crate's directory; those that a
//! packaged copy does not ship (`scripts/`, `fuzz/`) are skipped when absent.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use kourier::metrics::METRIC_NAMES;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// One row of a metrics table: `| name | type | labels | meaning |`.
#[derive(Debug)]
struct Row {
    kind: String,
    /// Label names, `group` left out (every metric carries it).
    labels: BTreeSet<String>,
    meaning: String,
}

/// The rows of the metrics table in `text` whose lines start with `prefix` (`"| "` in
/// Markdown, `"//! | "` in Rust docs), by metric name; fails on a name listed twice.
fn metrics_table(file: &str, text: &str, prefix: &str) -> BTreeMap<String, Row> {
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let Some(row) = line.strip_prefix(prefix) else {
            continue;
        };
        if !row.starts_with("`kourier_") {
            continue;
        }
        let cells: Vec<&str> = row
            .trim_end_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        assert!(
            cells.len() >= 4,
            "{file}: a metrics row needs name, type, labels and meaning: {line}"
        );
        let name = cells[0].trim_matches('`').to_owned();
        let labels = cells[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "group")
            .collect();
        let row = Row {
            kind: cells[1].to_owned(),
            labels,
            meaning: cells[3].to_owned(),
        };
        assert!(
            rows.insert(name.clone(), row).is_none(),
            "{file}: {name} is listed twice"
        );
    }
    rows
}

/// The backticked words of `text`.
fn backticked(text: &str) -> BTreeSet<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// `table` lists every metric of `METRIC_NAMES` and no other, each with the type and labels
/// of the reference table (`kourier::metrics`' docs, which `src/metrics.rs` checks against
/// the registered metrics), and names every value of a label with a closed set of values.
fn assert_same_as_the_reference(file: &str, table: &BTreeMap<String, Row>) {
    let names: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = METRIC_NAMES.iter().copied().collect();
    let missing: Vec<&&str> = expected.difference(&names).collect();
    let unknown: Vec<&&str> = names.difference(&expected).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "{file}'s metrics table differs from kourier::metrics::METRIC_NAMES: \
         missing {missing:?}, not a kourier metric {unknown:?}"
    );
    let reference = metrics_table("src/metrics.rs", &read("src/metrics.rs"), "//! | ");
    for (name, row) in table {
        let want = &reference[name];
        assert_eq!(row.kind, want.kind, "{file}: the type of {name}");
        assert_eq!(row.labels, want.labels, "{file}: the labels of {name}");
        if ["kind", "operation", "state"]
            .iter()
            .any(|l| want.labels.contains(*l))
        {
            let mut values = backticked(&want.meaning);
            values.retain(|v| !want.labels.contains(*v) && *v != "group");
            let named = backticked(&row.meaning);
            let left_out: Vec<&&str> = values.difference(&named).collect();
            assert!(
                left_out.is_empty(),
                "{file}: the row of {name} leaves out the values {left_out:?}"
            );
        }
    }
}

#[test]
fn the_readme_metrics_table_is_metric_names() {
    let table = metrics_table("README.md", &read("README.md"), "| ");
    assert_same_as_the_reference("README.md", &table);
}

#[test]
fn the_crate_docs_metrics_table_is_metric_names() {
    let table = metrics_table("src/lib.rs", &read("src/lib.rs"), "//! | ");
    assert_same_as_the_reference("src/lib.rs", &table);
}

/// The numbers of the delivery rules in the crate docs (`//! N. **...`).
fn delivery_rules() -> BTreeSet<u32> {
    let lib = read("src/lib.rs");
    let section = lib
        .split("//! ## Delivery semantics")
        .nth(1)
        .and_then(|rest| rest.split("//! ## ").next())
        .expect("src/lib.rs has a \"Delivery semantics\" section");
    let rules: BTreeSet<u32> = section
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter_map(|l| l.split_once(". **"))
        .filter_map(|(n, _)| n.parse().ok())
        .collect();
    let expected: BTreeSet<u32> = (1..=rules.len() as u32).collect();
    assert_eq!(
        rules, expected,
        "the delivery rules are numbered 1, 2, … in order"
    );
    rules
}

/// Every text file under `path` (a file or a directory), skipping build output.
fn files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if matches!(name, "target" | "corpus" | "artifacts" | ".git") {
            return;
        }
        let mut entries: Vec<_> = fs::read_dir(path)
            .unwrap_or_else(|e| panic!("listing {}: {e}", path.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            files(&entry, out);
        }
    } else if path.is_file() {
        out.push(path.to_owned());
    }
}

/// The rule numbers cited in `line`: `rule 17`, `rules 13 and 14`, `Rules 8, 9 and 10`.
fn cited_rules(line: &str) -> Vec<u32> {
    let mut cited = Vec::new();
    let lower = line.to_lowercase();
    for (at, _) in lower.match_indices("rule") {
        let mut rest = lower[at + 4..]
            .strip_prefix('s')
            .unwrap_or(&lower[at + 4..]);
        while let Some(after_space) = rest.strip_prefix(' ') {
            let digits: String = after_space
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.is_empty() {
                break;
            }
            cited.push(digits.parse().expect("digits"));
            rest = &after_space[digits.len()..];
            rest = rest
                .strip_prefix(" and")
                .or_else(|| rest.strip_prefix(','))
                .unwrap_or("");
        }
    }
    cited
}

#[test]
fn cited_rules_exist_in_the_crate_docs() {
    let rules = delivery_rules();
    assert!(
        rules.len() >= 18,
        "the crate docs number the delivery rules"
    );
    // Built at run time so that this file does not match itself.
    let design = ["DESIGN", " rule"].concat();
    let design_md = ["DESIGN", ".md"].concat();
    let mut paths = Vec::new();
    for top in [
        "src",
        "examples",
        "tests",
        "benches",
        "scripts",
        "fuzz",
        "README.md",
        "CHANGELOG.md",
        "Cargo.toml",
    ] {
        files(&root().join(top), &mut paths);
    }
    let mut wrong = Vec::new();
    let mut citations = 0;
    for path in &paths {
        let Ok(text) = fs::read_to_string(path) else {
            continue; // not text
        };
        let shown = path.strip_prefix(root()).unwrap_or(path).display();
        for (i, line) in text.lines().enumerate() {
            if line.contains(&design) || line.contains(&design_md) {
                wrong.push(format!(
                    "{shown}:{}: cites a design document the crate does not ship: {line}",
                    i + 1
                ));
            }
            for n in cited_rules(line) {
                citations += 1;
                if !rules.contains(&n) {
                    wrong.push(format!(
                        "{shown}:{}: cites rule {n}, the crate docs have 1..={}: {line}",
                        i + 1,
                        rules.len()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        citations > 50,
        "only {citations} rule citations found: is the scan broken?"
    );
}

#[test]
fn cited_rules_are_parsed() {
    assert_eq!(cited_rules("(delivery rule 17 in the crate docs)"), [17]);
    assert_eq!(cited_rules("delivery rules 13 and 14 in"), [13, 14]);
    assert_eq!(cited_rules("Rules 8, 9 and 10."), [8, 9, 10]);
    assert_eq!(cited_rules("rule_files: and ruler 3"), Vec::<u32>::new());
}
