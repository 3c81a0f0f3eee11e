"""Tests for harness/support.py: the agent model every reply test relies on, and waiting."""

from __future__ import annotations

import pytest

from harness.support import AgentMisread, HarnessError, argo_agent_reads, wait_for


def test_agent_model_rejects_what_the_agent_misreads() -> None:
    bad = [
        (404, b""),
        (202, b"{}"),
        (200, b"not json"),
        (200, b'{"node":{}}'),
        (200, b'{"node":{"phase":"Done"}}'),
        (200, b'{"node":{"phase":"Running"}}'),
        (200, b'{"node":{"phase":"Running"},"requeue":120}'),
        (200, b'{"node":{"phase":"Running"},"requeue":""}'),
        (200, b'{"node":{"phase":"Failed"},"requeue":"5s"}'),
        (200, b'{"node":{"phase":"Succeeded","outputs":{"parameters":[{"name":"a","value":{}}]}}}'),
    ]
    for status, body in bad:
        with pytest.raises(AgentMisread):
            argo_agent_reads(status, body)
    assert argo_agent_reads(200, b"{}").kind == "not_mine"
    assert argo_agent_reads(503, b"later").kind == "retry"
    assert argo_agent_reads(403, b"no").message == "403 Forbidden: no"


def test_wait_for_returns_the_first_truthy_answer_and_says_what_it_waited_for() -> None:
    answers: list[object] = [None, OSError("refused"), {"ready": True}]

    def probe() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_for("the answer", probe, timeout=5, interval=0) == {"ready": True}
    answers[:] = [OSError("refused")] * 2
    with pytest.raises(HarnessError, match=r"timed out after 0s waiting for never \(refused\)"):
        wait_for("never", probe, timeout=0)
