//! The MCP server with a real MCP client nobody here wrote: the official Python SDK
//! (PyPI `mcp`, pinned in scripts/setup-test-tools) runs `tests/mcp/agent.py` against
//! `athanor up` (with an API token) over streamable HTTP at `/mcp`, and over stdio by
//! launching `athanor mcp`. The script lists the tools and checks each input schema
//! against its examples, is refused destructive calls without the token, validates a
//! bad config (the field named), runs a `sweep` to its end with `wait_for_run` and
//! reads its logs, results and metrics, cancels a `sleepy`, and creates, updates, runs
//! and deletes an instance — asserting exact values throughout.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stop, up_with, wait_for_worker};

const TOKEN: &str = "agent-token";

fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/mcp/bin/python3");
    assert!(
        python.exists(),
        "{} not found: run scripts/setup-test-tools",
        python.display()
    );
    python
}

/// Runs the agent script with `args`; panics with its output unless every check passed.
fn agent(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/agent.py");
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .expect("run the agent script");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.trim_end().ends_with("all checks passed"),
        "the agent failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
}

#[test]
fn an_agent_drives_athanor_over_streamable_http_and_over_stdio() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url) = up_with(data.path(), &[("ATHANOR__GATEWAY__API_TOKEN", TOKEN)]);
    wait_for_worker(&url);
    agent(&["http", &url, TOKEN]);
    agent(&["stdio", env!("CARGO_BIN_EXE_athanor"), &url, TOKEN]);
    stop(&mut child);
}

#[test]
fn with_protected_reads_the_mcp_endpoint_needs_the_token() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, url) = up_with(
        data.path(),
        &[
            ("ATHANOR__GATEWAY__API_TOKEN", TOKEN),
            ("ATHANOR__GATEWAY__PROTECT_READS", "true"),
        ],
    );
    agent(&["protected", &url, TOKEN]);
    stop(&mut child);
}
