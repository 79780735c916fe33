//! The layering rule of `shared/design.md` section 1, as a test: no component module (`api`,
//! `controller`, `dispatcher`, `ingest`) imports another. What two of them share moves below
//! both (`signing_secret`, `backoff`, `work`, `delivery_log`, ...). Reads the sources; no IO
//! beyond that.

use std::path::{Path, PathBuf};

const COMPONENTS: [&str; 4] = ["api", "controller", "dispatcher", "ingest"];

/// Every `.rs` file of a component: `src/<c>.rs` and everything under `src/<c>/`.
fn files_of(component: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let single = src.join(format!("{component}.rs"));
    if single.exists() {
        files.push(single);
    }
    let mut dirs = vec![src.join(component)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The top-level modules a line reaches through `crate::`, grouped imports included.
fn crate_paths(line: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(name);
            }
        } else {
            found.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    found
}

/// Offending lines: `(file:line, text, imported component)`.
fn violations() -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for component in COMPONENTS {
        for file in files_of(component) {
            let text = std::fs::read_to_string(&file).unwrap();
            // A multi-line `use crate::{...}` is joined so its items are seen.
            let mut statement = String::new();
            let mut start = 0;
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                if statement.is_empty() {
                    start = n + 1;
                }
                statement.push_str(code);
                if code.contains("crate::{") && !code.contains('}') {
                    continue;
                }
                for module in crate_paths(&statement) {
                    if module != component && COMPONENTS.contains(&module.as_str()) {
                        found.push((
                            format!("{}:{start}", file.display()),
                            statement.trim().to_string(),
                            module,
                        ));
                    }
                }
                statement.clear();
            }
        }
    }
    found
}

#[test]
fn no_component_imports_another() {
    let found = violations();
    let report: Vec<String> = found
        .iter()
        .map(|(at, text, module)| format!("{at}: imports component `{module}`: {text}"))
        .collect();
    assert!(
        report.is_empty(),
        "components import each other:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_check_sees_every_form_of_import() {
    assert_eq!(
        crate_paths("use crate::dispatcher::{Dispatcher, SubmitError};"),
        ["dispatcher"]
    );
    assert_eq!(
        crate_paths("use crate::{api, delivery_log::DeliveryLog};"),
        ["api", "delivery_log"]
    );
    assert_eq!(
        crate_paths("let b = crate::controller::retry_delay(1);"),
        ["controller"]
    );
    assert_eq!(
        crate_paths("use crate::work::WorkHandle; // not crate::api"),
        ["work", "api"]
    );
    assert!(
        files_of("dispatcher")
            .iter()
            .any(|f| f.ends_with("dispatcher/worker.rs"))
    );
    assert!(files_of("ingest").iter().any(|f| f.ends_with("src/ingest.rs")));
}
