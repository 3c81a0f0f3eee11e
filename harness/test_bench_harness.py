"""Fast, hermetic checks of the pure parts of `make bench` (no wrk, no nginx, no sockets)."""

from __future__ import annotations

import json
import math
import re

import pytest

from harness.bench import harness
from harness.bench.harness import WrkRun

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-8[0-9a-f]{3}-[0-9a-f]{12}$")


def run(p50_us: float, rps: float = 1000.0, p99_us: float | None = None, **kw: int) -> WrkRun:
    requests = int(rps * 3)
    return WrkRun(
        requests=requests,
        duration_us=3_000_000,
        p50_us=p50_us,
        p90_us=p50_us * 1.2,
        p99_us=p99_us if p99_us is not None else p50_us * 1.5,
        mean_us=p50_us,
        max_us=p50_us * 3,
        bad=kw.get("bad", 0),
        checked=kw.get("checked", requests),
        errors={"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": kw.get("timeout", 0)},
    )


# -- the body ---------------------------------------------------------------------------------


def test_body_template_is_an_8kb_kfp_container_driver_call() -> None:
    template, _ = harness.body_template()
    parts = harness.split_template(template)
    body = harness.render_body(parts, 0x1234ABCD, 2, 77)
    assert 7_000 <= len(body.encode()) <= 10_000
    doc = json.loads(body)
    uid = harness.call_id(0x1234ABCD, 2, 77)
    assert doc["workflow"]["metadata"] == {
        "name": doc["workflow"]["metadata"]["name"],
        "namespace": doc["workflow"]["metadata"]["namespace"],
        "uid": uid,
    }
    template_doc = doc["template"]
    assert template_doc["name"] == "system-container-driver"
    assert {"inputs", "outputs", "metadata", "plugin"} <= set(template_doc)
    args = template_doc["plugin"]["driver-plugin"]["args"]
    assert args["run_id"] == uid
    assert args["type"] == "CONTAINER"
    for key in ("component", "task", "container"):
        json.loads(args[key])  # JSON text inside a JSON string, as KFP sends it
    assert "\n" not in body and harness.PLACEHOLDER not in body


def test_bodies_are_distinct_valid_json_of_one_length() -> None:
    parts = harness.split_template(harness.body_template()[0])
    seen: set[str] = set()
    lengths: set[int] = set()
    for nonce in (0, 0xFFFFFFFF):
        for thread in (1, 2, 16):
            for counter in (0, 1, 2, 15, 16, 99_999, 2**40):
                body = harness.render_body(parts, nonce, thread, counter)
                uid = json.loads(body)["workflow"]["metadata"]["uid"]
                assert UUID.match(uid), uid
                seen.add(body)
                lengths.add(len(body))
    assert len(seen) == 2 * 3 * 7
    assert len(lengths) == 1  # one Content-Length for every request of a run
    assert len(harness.call_id(0, 1, 1)) == harness.ID_LENGTH


def test_split_template_needs_a_placeholder() -> None:
    with pytest.raises(ValueError, match="RUN_UID"):
        harness.split_template('{"a":1}')


# -- the Lua script ---------------------------------------------------------------------------


def lua_long_strings(script: str) -> dict[str, str]:
    """``local Pn = [=*[...]=*]`` assignments of a generated script."""
    found = {}
    for match in re.finditer(r"local (P\d+) = \[(=*)\[(.*?)\]\2\]", script, re.S):
        found[match.group(1)] = match.group(3)
    return found


def test_wrk_script_embeds_the_body_pieces_verbatim_and_the_id_format() -> None:
    parts = harness.split_template(harness.body_template()[0])
    script = harness.wrk_script(
        parts, {"Authorization": "Bearer t0k", "Content-Type": "application/json"}
    )
    pieces = lua_long_strings(script)
    assert [pieces[f"P{i}"] for i in range(len(parts))] == parts
    joined = " .. id .. ".join(f"P{i}" for i in range(len(parts)))
    assert f"return head .. {joined}" in script  # one distinct id per request
    assert f'local ID_FORMAT = "{harness.ID_FORMAT}"' in script
    assert 'wrk.headers["Authorization"] = "Bearer t0k"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert "wrk.format(" in script  # Content-Length computed by wrk from the real body size
    assert "function done(summary, latency, requests)" in script
    for q in (50, 90, 99):
        assert f"latency:percentile({q})" in script
    # the printf format in Lua is the Python one, so the mirror in render_body is exact
    assert harness.ID_FORMAT % (1, 2, 3) == "00000001-0002-4000-8000-000000000003"


def test_lua_long_string_picks_a_level_the_text_does_not_close() -> None:
    assert harness.lua_long_string("abc") == "[[abc]]"
    assert harness.lua_long_string("a]]b") == "[=[a]]b]=]"
    assert harness.lua_long_string("a]]b]=]c") == "[==[a]]b]=]c]==]"
    assert harness.lua_long_string("ends with ]") == "[=[ends with ]]=]"
    with pytest.raises(ValueError):
        harness.lua_long_string("\nleading newline would be dropped by Lua")


def test_lua_quote_escapes() -> None:
    assert harness.lua_quote('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'


# -- wrk output -------------------------------------------------------------------------------


def test_parse_wrk_output_and_problems() -> None:
    stdout = (
        "Running 3s test @ http://127.0.0.1:1/api/v1/template.execute\n"
        'WRK_RESULT {"requests":3000,"duration_us":3000000,"bytes":1,"p50_us":120.0,'
        '"p90_us":150.5,"p99_us":200.0,"mean_us":125.0,"max_us":900.0,"bad":2,"checked":3000,'
        '"errors":{"connect":0,"read":0,"write":0,"status":2,"timeout":0}}\n'
        "WRK_BAD 503 upstream unavailable\n"
    )
    result = harness.parse_wrk_output(stdout)
    assert result.requests == 3000
    assert result.rps == pytest.approx(1000.0)
    assert result.p90_us == 150.5
    assert result.bad_sample == "503 upstream unavailable"
    problems = " ".join(result.problems())
    assert "2 replies were not 200" in problems and "status" in problems
    assert run(100).problems() == []
    assert "checked" in " ".join(run(100, checked=5).problems())
    with pytest.raises(ValueError):
        harness.parse_wrk_output("wrk: connection refused\n")


# -- statistics -------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    assert harness.percentile([4, 1, 3, 2], 50) == 2.5
    assert harness.percentile([1, 2, 3, 4], 0) == 1
    assert harness.percentile([1, 2, 3, 4], 100) == 4
    assert harness.percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert harness.percentile([7], 99) == 7
    assert harness.median([5, 1, 3]) == 3
    with pytest.raises(ValueError):
        harness.percentile([], 50)
    with pytest.raises(ValueError):
        harness.percentile([1], 101)


def test_summarise_takes_medians_and_compare_pairs_rounds() -> None:
    direct = [run(100, 9000), run(110, 8000), run(300, 1000)]
    through = [run(250, 3000), run(240, 4000), run(900, 500)]
    s = harness.summarise(through)
    assert s.p50_ms == pytest.approx(0.250)
    assert s.rps == pytest.approx(3000)
    assert s.rounds == 3
    r = harness.compare(through, direct)
    assert r.p50 == pytest.approx(250 / 110)
    assert r.rps == pytest.approx(3000 / 8000)
    assert r.p50_round_min == pytest.approx(240 / 110)
    assert r.p50_round_max == pytest.approx(3.0)
    assert r.added_p50_ms == pytest.approx(0.140)
    assert math.isnan(harness.ratio(1, 0))


# -- targets ----------------------------------------------------------------------------------


def by_name(targets: list[harness.Target]) -> dict[str, harness.Target]:
    return {t.name: t for t in targets}


def test_targets_from_measurements() -> None:
    m = harness.Measurements(
        rows={
            "direct": {1: [run(100)] * 3, 16: [run(1000, 10_000)] * 3},
            "plugin": {1: [run(240, p99_us=500)] * 3, 16: [run(3000, 3000, p99_us=12_000)] * 3},
            "naive": {1: [run(600)] * 3},
            "floor": {1: [run(160)] * 3, 16: [run(2500, 5500)] * 3},
        },
        rss_kib_at_50k=20_000,
        rss_kib_at_100k=20_500,
        startup_ms=[60, 70, 500],
    )
    t = by_name(harness.evaluate_targets(m))
    p50 = t["p50 through/direct, 1 client"]
    assert p50.measured == pytest.approx(2.4)
    assert p50.met is True and p50.stretch_met is False
    rps = t["throughput through/direct, 16 clients"]
    assert rps.measured == pytest.approx(0.3) and rps.met is False
    added = t["added p50 plugin/naive, 1 client"]
    assert added.measured == pytest.approx(140 / 500) and added.met is True
    floor_p50 = t["p50 plugin/floor, 1 client"]
    assert floor_p50.measured == pytest.approx(1.5)
    assert floor_p50.met is True and floor_p50.stretch_met is False
    floor_rps = t["throughput plugin/floor, 16 clients"]
    assert floor_rps.measured == pytest.approx(3000 / 5500) and floor_rps.met is False
    assert t["plugin p99/p50, 1 client"].measured == pytest.approx(500 / 240)
    assert t["plugin p99/p50, 16 clients"].met is False
    assert t["RSS after 100k calls"].measured == pytest.approx(20_500 / 1024)
    assert t["RSS growth 50k->100k calls"].measured == pytest.approx(2.5)
    assert t["RSS growth 50k->100k calls"].met is True
    start = t["start-up to /healthz 200 (median)"]
    assert start.measured == 70 and start.met is True
    text = harness.format_targets(list(t.values()))
    assert "MISSED" in text and "stretch missed" in text


def test_targets_not_measured_are_not_applicable() -> None:
    targets = harness.evaluate_targets(harness.Measurements(rss_calls=2000))
    assert all(t.met is None for t in targets)
    assert "RSS after 2k calls" in by_name(targets)
    assert "n/a" in harness.format_targets(targets)
    assert all(t.to_json()["measured"] is None for t in targets)


def test_growth_target_is_strict() -> None:
    assert harness.Target("g", 5.0, 5.0, "below").met is False
    assert harness.Target("g", 5.0, 5.0, "max").met is True
    assert harness.Target("g", 0.4, 0.4, "min").met is True


def test_table_lists_every_row_with_ratios_to_direct() -> None:
    rows = {
        "direct": {1: [run(100)], 16: [run(1000, 10_000)]},
        "plugin": {1: [run(200)], 16: [run(2000, 5000)]},
        "nginx": {1: [run(120)]},
    }
    table = harness.format_table(rows, ("direct", "plugin", "naive", "nginx")).splitlines()
    assert len(table) == 2 + 5
    plugin_1 = next(line for line in table if line.startswith("plugin") and " 1 " in line)
    assert "2.00" in plugin_1 and "0.100" in plugin_1  # p50 x2, +0.1 ms
    plugin_16 = next(line for line in table if line.startswith("plugin") and " 16 " in line)
    assert "0.50" in plugin_16  # half the direct throughput


def test_upstream_reply_is_an_argo_succeeded_node() -> None:
    from harness.bench import upstream

    reply = json.loads(upstream.REPLY)
    assert reply["node"]["phase"] == "Succeeded"
    assert all(isinstance(p["value"], str) for p in reply["node"]["outputs"]["parameters"])
    head, _, body = upstream.OK_EXECUTE.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head and body == upstream.REPLY
