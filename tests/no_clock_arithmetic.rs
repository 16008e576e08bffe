//! Delivery rule 17 in the crate docs: the crate adds durations to clocks only through its one
//! checked helper (`src/clock.rs`), which caps the duration and never panics. `Instant +
//! Duration` and `SystemTime + Duration` panic when the sum does not fit, and a setting or a
//! handler's hint of `Duration::MAX` is enough for that.
//!
//! This scans `src/` for the usual shapes of that arithmetic, so that new code does not bring
//! it back. It cannot see types, so it looks for what such code looks like in this crate: a
//! clock read (`Instant::now()`, `SystemTime::now()`, `.elapsed()`) followed by `+` or `+=`,
//! and a named instant plus a duration setting (`started + self.…`, `… + PROBE_GRACE`). No
//! services needed.

use std::path::{Path, PathBuf};

/// Shapes of clock arithmetic, each a fragment that must not appear in a line of code.
const FORBIDDEN: &[&str] = &[
    "Instant::now() +",
    "Instant::now()+",
    "SystemTime::now() +",
    "SystemTime::now()+",
    ".elapsed() +",
    "UNIX_EPOCH.elapsed() +",
    "+ PROBE_GRACE",
    "started + self.",
    "_since + settings.",
    "+ open_for",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code part of a line: without a `//` comment (doc comments included).
fn code_of(line: &str) -> &str {
    match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    }
}

#[test]
fn durations_meet_clocks_only_through_the_clock_helper() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(files.len() > 20, "src/ not found at {}", src.display());
    let mut found = Vec::new();
    for file in &files {
        // The helper itself, and its tests, add to clocks by design.
        if file.ends_with("clock.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            if let Some(shape) = FORBIDDEN.iter().find(|s| code.contains(*s)) {
                found.push(format!(
                    "{}:{}: `{shape}` in `{}`",
                    file.strip_prefix(&src).unwrap_or(file).display(),
                    n + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "add durations to clocks with crate::clock::after / clock::deadline_in (capped, never \
         panics), not with `+`:\n{}",
        found.join("\n")
    );
}

/// The scan finds what it looks for (a scan that matches nothing would always pass).
#[test]
fn the_scan_recognises_clock_arithmetic() {
    for line in [
        "    let deadline = Instant::now() + timeout;",
        "        let due = SystemTime::now() + self.delay(target);",
        "sleep_until(started + self.stall_threshold)",
        "let remaining = (unreachable_since + settings.timeout)",
        "until: Instant::now() + open_for,",
    ] {
        assert!(
            FORBIDDEN.iter().any(|s| code_of(line).contains(s)),
            "{line}"
        );
    }
    assert!(
        !FORBIDDEN
            .iter()
            .any(|s| code_of("/// no `Instant::now() + d` here").contains(s))
    );
}
