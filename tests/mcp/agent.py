"""An agent's session with Athanor's MCP server, through the official Python MCP SDK.

    agent.py http      <gateway base URL> <token>
    agent.py stdio     <athanor binary> <gateway base URL> <token>
    agent.py protected <gateway base URL> <token>   (a gateway with protect_reads)

Over streamable HTTP it connects to <base>/mcp (with and without the bearer token);
over stdio it launches `athanor mcp --url <base> [--token <token>]`. The gateway has
`api_token` = <token>, so writes need it. Every check is an assert with exact values;
any failure exits non-zero with the traceback. Prints one line per step.
"""

import asyncio
import json
import sys

import httpx2
import jsonschema
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

TOOLS = {
    "list_experiments", "get_config_schema", "validate_config",
    "list_instances", "get_instance", "create_instance", "update_instance", "delete_instance",
    "list_runs", "get_run", "start_run", "cancel_run",
    "get_run_logs", "tail_run_logs", "list_results", "get_result",
    "list_metrics", "get_metric_series", "wait_for_run",
}
DESTRUCTIVE = {"update_instance", "delete_instance", "cancel_run"}
WRITES = DESTRUCTIVE | {"create_instance", "start_run"}


def step(text):
    print(text, flush=True)


def connect(mode, args, token):
    """A Client over `mode`, sending `token` (None: none)."""
    if mode == "http":
        base = args[0]
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return Client(streamable_http_client(f"{base}/mcp", http_client=create_mcp_http_client(headers=headers)))
    binary, base = args
    command = ["mcp", "--url", base] + (["--token", token] if token else [])
    return Client(StdioServerParameters(command=binary, args=command, env={"RUST_LOG": "warn"}))


async def call(client, name, arguments, **kw):
    result = await client.call_tool(name, arguments, **kw)
    return result.is_error, result.structured_content, result


async def tools_are_described(client):
    listed = (await client.list_tools()).tools
    names = {t.name for t in listed}
    assert names == TOOLS, names ^ TOOLS
    for tool in listed:
        schema = tool.input_schema
        assert tool.description and len(tool.description) > 40, tool.name
        assert schema["additionalProperties"] is False, tool.name
        examples = schema.get("examples") or []
        assert examples, f"{tool.name} has no examples"
        for example in examples:
            jsonschema.validate(example, schema)
        jsonschema.Draft202012Validator.check_schema(schema)
        hints = tool.annotations
        assert hints.read_only_hint is (tool.name not in WRITES), tool.name
        if tool.name in WRITES:
            assert hints.destructive_hint is (tool.name in DESTRUCTIVE), tool.name
    step(f"{len(listed)} tools, each schema valid and validating its {sum(len(t.input_schema['examples']) for t in listed)} examples")
    error, _, raw = await call(client, "get_run", {"id": "x", "bogus": 1})
    assert error and "unknown field `bogus`" in raw.content[0].text, raw
    step("an unknown argument is refused: " + raw.content[0].text)


async def refused_without_token(client):
    for name, arguments in [
        ("delete_instance", {"id": "whatever"}),
        ("cancel_run", {"id": "whatever"}),
        ("start_run", {"experiment": "sweep"}),
        ("create_instance", {"name": "n", "experiment": "sweep"}),
    ]:
        error, body, _ = await call(client, name, arguments)
        assert error and body["status"] == 401, (name, body)
    error, body, _ = await call(client, "list_experiments", {})
    assert not error, body
    error, body, _ = await call(client, "validate_config", {"experiment": "sweep", "config": {"iterations": 2}})
    assert not error and body["config"] == {"iterations": 2, "delay_ms": 100}, body
    step("without the token: delete_instance, cancel_run, start_run, create_instance refused (401); reads and validation answer")


async def experiments_and_configs(client):
    error, body, _ = await call(client, "list_experiments", {})
    assert not error
    names = [e["name"] for e in body["experiments"]]
    assert names == ["echo", "flaky", "log_storm", "metric_storm", "sleepy", "sweep"], names
    error, body, _ = await call(client, "get_config_schema", {"experiment": "sweep"})
    assert not error and set(body["config_schema"]["properties"]) == {"iterations", "delay_ms"}, body
    error, body, _ = await call(client, "get_config_schema", {"experiment": "nope"})
    assert error and body["error"].startswith('unknown experiment "nope"'), body
    error, body, _ = await call(client, "validate_config", {"experiment": "sweep", "config": {"iterations": 0}})
    assert error and body["field"] == "iterations" and body["reason"] == "must be at least 1, got 0", body
    assert body["status"] == 422
    error, body, _ = await call(client, "validate_config", {"experiment": "sweep", "config": {"iterations": 4}})
    assert not error and body == {"experiment": "sweep", "config": {"iterations": 4, "delay_ms": 100}}, body
    step("experiments listed; a bad config names its field (iterations), a good one gets its defaults")


async def a_sweep_end_to_end(client):
    error, run, _ = await call(client, "start_run", {"experiment": "sweep", "config": {"iterations": 3, "delay_ms": 200}})
    assert not error and run["status"] == "pending", run
    progress = []

    async def on_progress(current, total, message):
        progress.append((current, total, message))

    error, done, _ = await call(client, "wait_for_run", {"id": run["id"], "timeout_seconds": 120}, progress_callback=on_progress)
    assert not error, done
    assert done["ended"] is True and done["timed_out"] is False and done["status"] == "completed", done
    assert done["total_lines"] == 3
    assert [line["seq"] for line in done["tail"]] == [0, 1, 2], done["tail"]
    assert done["tail"][0]["message"].startswith("iteration 0: "), done["tail"]
    keys = [r["key"] for r in done["results"]]
    assert keys == ["best_score", "iteration_0", "iteration_1", "iteration_2"], keys
    assert progress and progress[-1][:2] == (3.0, 3.0), progress
    step(f"sweep {run['id']}: wait_for_run → completed, 3 lines, 4 results, {len(progress)} progress notifications")

    error, page, _ = await call(client, "get_run_logs", {"id": run["id"], "limit": 2})
    assert not error and [l["seq"] for l in page["lines"]] == [0, 1] and page["more"] is True and page["total"] == 3, page
    error, page, _ = await call(client, "get_run_logs", {"id": run["id"], "after": 1})
    assert [l["seq"] for l in page["lines"]] == [2] and page["more"] is False, page
    error, page, _ = await call(client, "get_run_logs", {"id": run["id"], "search": "ITERATION 1:"})
    assert [l["seq"] for l in page["lines"]] == [1], page
    error, page, _ = await call(client, "get_run_logs", {"id": run["id"], "level": "error"})
    assert page["lines"] == [], page
    error, page, _ = await call(client, "tail_run_logs", {"id": run["id"], "lines": 2})
    assert [l["seq"] for l in page["lines"]] == [1, 2] and page["status"] == "completed", page
    step("logs paged (2 + 1), searched, filtered by level, tailed")

    error, body, _ = await call(client, "get_result", {"id": run["id"], "key": "iteration_2"})
    assert not error and body["value"]["iteration"] == 2 and body["key"] == "iteration_2", body
    error, body, _ = await call(client, "get_result", {"id": run["id"], "key": "nope"})
    assert error and "no result" in body["error"], body
    error, body, _ = await call(client, "list_metrics", {"id": run["id"]})
    assert not error and sorted(m["name"] for m in body["metrics"]) == ["loss", "lr", "score"], body
    error, series, _ = await call(client, "get_metric_series", {"id": run["id"], "name": "loss"})
    assert not error and series["exact"] is True, series
    assert [b["step"] for b in series["buckets"]] == [0, 1, 2], series
    assert series["buckets"][0]["value"] == 1.0, series
    step("results read whole; metrics loss, lr, score; loss exact at steps 0, 1, 2")
    return run["id"]


async def cancel_a_sleepy(client):
    error, run, _ = await call(client, "start_run", {"experiment": "sleepy", "config": {"duration_ms": 600000}})
    assert not error, run
    error, waited, _ = await call(client, "wait_for_run", {"id": run["id"], "timeout_seconds": 2, "tail": 0})
    assert not error and waited["ended"] is False and waited["timed_out"] is True, waited
    assert waited["status"] in ("pending", "running") and waited["tail"] == [], waited
    error, body, _ = await call(client, "cancel_run", {"id": run["id"]})
    assert not error and body["cancel"] == "requested", body
    error, done, _ = await call(client, "wait_for_run", {"id": run["id"], "timeout_seconds": 60})
    assert done["ended"] and done["status"] == "cancelled" and done["error"] == "cancelled on request", done
    error, body, _ = await call(client, "cancel_run", {"id": run["id"]})
    assert error and body["status"] == 409, body
    step(f"sleepy {run['id']}: a 2 s wait timed out, cancel_run → cancelled; cancelling again refused (409)")


async def instances(client):
    error, made, _ = await call(client, "create_instance", {"name": "agent sweep", "experiment": "sweep", "config": {"iterations": 2, "delay_ms": 0}})
    assert not error and made["runs"] == 0 and made["last_run"] is None, made
    error, body, _ = await call(client, "create_instance", {"name": "bad", "experiment": "sweep", "config": {"iterations": -1}})
    assert error and body["field"] == "iterations", body
    error, changed, _ = await call(client, "update_instance", {"id": made["id"], "name": "agent sweep 2", "config": {"iterations": 1, "delay_ms": 0}})
    assert not error and changed["name"] == "agent sweep 2" and changed["config"] == {"iterations": 1, "delay_ms": 0}, changed
    error, run, _ = await call(client, "start_run", {"instance_id": made["id"], "config": {"iterations": 2}})
    assert not error and run["instance_id"] == made["id"] and run["config"] == {"iterations": 2, "delay_ms": 0}, run
    error, done, _ = await call(client, "wait_for_run", {"id": run["id"]})
    assert done["status"] == "completed" and done["total_lines"] == 2, done
    error, listed, _ = await call(client, "list_instances", {"experiment": "sweep"})
    mine = [i for i in listed["instances"] if i["id"] == made["id"]]
    assert len(mine) == 1 and mine[0]["runs"] == 1 and mine[0]["last_run"]["id"] == run["id"], listed
    assert mine[0]["last_run"]["status"] == "completed"
    error, got, _ = await call(client, "get_instance", {"id": made["id"]})
    assert got["runs"] == 1, got
    error, body, _ = await call(client, "start_run", {"experiment": "sweep", "instance_id": made["id"]})
    assert error and "either" in body["error"], body
    error, body, _ = await call(client, "delete_instance", {"id": made["id"]})
    assert not error and body == {"deleted": made["id"]}, body
    error, body, _ = await call(client, "get_instance", {"id": made["id"]})
    assert error and body["status"] == 404, body
    error, runs, _ = await call(client, "list_runs", {"experiment": "sweep", "status": "completed"})
    assert any(r["id"] == run["id"] for r in runs["runs"]), runs
    step("instance created, refused a bad config, updated, run (runs 1, last run completed), deleted; its run stays")


async def protected(base, token):
    """A gateway with `protect_reads`: /mcp itself needs the token."""
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "agent", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream"}
    response = httpx2.post(f"{base}/mcp", json=hello, headers=headers)
    assert response.status_code == 401, response
    assert response.json()["error"].startswith("this gateway requires"), response.text
    async with connect("http", [base], token) as client:
        error, body, _ = await call(client, "list_runs", {"limit": 1})
        assert not error and body["total"] >= 0, body
    step("protected reads: /mcp without the token 401, with it the tools answer")
    step("all checks passed")


async def main():
    if sys.argv[1] == "protected":
        return await protected(sys.argv[2], sys.argv[3])
    mode, args, token = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
    async with connect(mode, args, None) as client:
        await tools_are_described(client)
        await refused_without_token(client)
    async with connect(mode, args, token) as client:
        await experiments_and_configs(client)
        await a_sweep_end_to_end(client)
        await cancel_a_sleepy(client)
        await instances(client)
    if mode == "http":
        base = args[0]
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "page", "version": "1"}}}
        headers = {"Origin": "http://evil.example", "Accept": "application/json, text/event-stream"}
        response = httpx2.post(f"{base}/mcp", json=hello, headers=headers)
        assert response.status_code == 403, response
        assert response.json()["error"]["message"] == "Forbidden: Origin header is not allowed", response.text
        step("a request from a web page's origin: 403 " + response.text)
    step("all checks passed")


asyncio.run(main())
