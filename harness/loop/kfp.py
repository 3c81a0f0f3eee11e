"""KFP's own compiled workflows in make loop: which ones, adapted how, and what each must show.

The workflows are the 146 KFP's compiler wrote in plugin mode (pull request #13171's golden
files; ../shared/kfp/README.md says what they are). They are read from where they lie (the
Makefile's KFP_WORKFLOWS), never copied into the repository, and adapted in memory only as an
operator adapts a compiled pipeline to a profile: its namespace and its workflow account.

The driver stand-in runs with --skip-executors: every task that runs is a cache hit
(cached-decision "true"), so Argo skips the executor, which would need KFP's launcher image.
A workflow that runs a container of its own (the importer) therefore cannot finish here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Json = dict[str, Any]

CORPUS_SIZE = 146  # ../shared/kfp/README.md: guard against reading only part of it
DRIVER_TEMPLATES = ("system-dag-driver", "system-container-driver")
# The one task whose driver the stand-in fails (--fail-task): KFP's own failing pipeline.
FAIL_TASK = "fail-pipeline/fail"


@dataclass(frozen=True)
class Expectation:
    """What one compiled workflow must end as, and which of KFP's shapes it must show."""

    file: str
    phase: str = "Succeeded"
    shows: tuple[str, ...] = ()  # names of Observed counters that must be above zero


# At least one of each shape KFP's compiler generates (issue 19): the root and nested DAG
# drivers, ParallelFor (iteration_index, iteration-count), conditions (a condition output
# feeding `when`), exit handlers, caching (every executor skipped on a cache hit) and a driver
# that fails. Every condition in the corpus names an upstream task's output, which the stand-in
# cannot know, so it evaluates them all "true"; loop/workflows/condition-false.yaml is the
# false one.
SELECTION = (
    Expectation("hello_world.yaml", shows=("container drivers", "cache hits")),
    Expectation("pipeline_in_pipeline.yaml", shows=("nested DAGs",)),
    Expectation("pipeline_with_loops.yaml", shows=("loop iterations",)),
    Expectation("pipeline_with_nested_loops.yaml", shows=("loop iterations", "nested DAGs")),
    Expectation("pipeline_with_parallelfor_parallelism.yaml", shows=("loop iterations",)),
    Expectation("pipeline_with_condition.yaml", shows=("conditions",)),
    Expectation("pipeline_with_nested_conditions.yaml", shows=("conditions", "nested DAGs")),
    Expectation("pipeline_with_exit_handler.yaml", shows=("exit handlers",)),
    Expectation("pipeline_with_multiple_exit_handlers.yaml", shows=("exit handlers",)),
    Expectation("run_as_user_cache_disabled.yaml", shows=("container drivers",)),
    Expectation("fail_v2.yaml", phase="Failed", shows=("failed drivers",)),
)


def own_pod(workflow: Json) -> str:
    """The first container template that is not KFP's executor, which no cache hit skips
    (the importer): it needs KFP's launcher image, which cannot be built here. "" if none."""
    for template in workflow.get("spec", {}).get("templates", []):
        if "container" in template and not template["name"].endswith("system-container-impl"):
            return str(template["name"])
    return ""


def corpus(directory: Path) -> list[Path]:
    """The compiled workflows, by name."""
    return sorted(directory.glob("*.yaml"))


def expectation(path: Path) -> Expectation:
    """The selection's expectation for that file; any other must simply succeed."""
    for chosen in SELECTION:
        if chosen.file == path.name:
            return chosen
    return Expectation(path.name)


def adapt(path: Path, namespace: str, account: str) -> Json:
    """The workflow as an operator submits it to a profile: that namespace, that account."""
    workflow: Json = yaml.safe_load(path.read_text())
    workflow["metadata"]["namespace"] = namespace
    workflow["metadata"].setdefault("labels", {})["loop.driver-plugin/kfp"] = path.stem[:63]
    workflow["spec"]["serviceAccountName"] = account
    return workflow


@dataclass
class Observed:
    """What the controller recorded for one run, counted by shape."""

    counts: Counter[str] = field(default_factory=Counter)
    drivers_run: int = 0  # driver nodes that reached the driver server (Succeeded or Failed)

    def show(self) -> str:
        return ", ".join(f"{name} {n}" for name, n in sorted(self.counts.items()) if n)


def observe(workflow: Json) -> Observed:
    seen = Observed()
    for node in workflow.get("status", {}).get("nodes", {}).values():
        template, phase = node.get("templateName", ""), node.get("phase")
        outputs = {p["name"]: p.get("value") for p in node.get("outputs", {}).get("parameters", [])}
        inputs = {p["name"]: p.get("value") for p in node.get("inputs", {}).get("parameters", [])}
        if template.startswith("exit-hook-") and phase == "Succeeded":
            seen.counts["exit handlers"] += 1
        if template.endswith("system-container-executor") and phase == "Succeeded":
            for child in node.get("children", []):
                executor = workflow["status"]["nodes"].get(child, {})
                seen.counts["cache hits"] += executor.get("phase") == "Skipped"
        if template not in DRIVER_TEMPLATES:
            continue
        if phase in ("Succeeded", "Failed"):
            seen.drivers_run += 1
        seen.counts["failed drivers"] += phase == "Failed"
        if template == "system-container-driver":
            seen.counts["container drivers"] += phase == "Succeeded"
        elif inputs.get("driver-type") == "DAG" and phase == "Succeeded":
            seen.counts["nested DAGs"] += 1
        index = inputs.get("iteration-index") or "-1"
        seen.counts["loop iterations"] += index.isdigit()  # "-1" outside a loop
        if outputs.get("condition") in ("true", "false"):
            seen.counts["conditions"] += 1
            seen.counts["conditions false"] += outputs["condition"] == "false"
    return seen


def judge(
    expected: Expectation, workflow: Json, executions: Mapping[str, Any]
) -> tuple[Observed, list[str]]:
    """What the run showed and what is wrong with it: the phase, the shapes it must show, and
    one driver execution per driver node that ran (none twice, none lost)."""
    seen = observe(workflow)
    status = workflow.get("status", {})
    problems = []
    if status.get("phase") != expected.phase:
        problems.append(
            f"{status.get('phase')}, expected {expected.phase}: {status.get('message', '')}"[:300]
        )
    problems += [f"shows no {name}" for name in expected.shows if not seen.counts[name]]
    uid = workflow.get("metadata", {}).get("uid", "?")
    ran = sum(n for key, n in executions.items() if key.startswith(f"{uid}/"))
    if ran != seen.drivers_run:
        problems.append(f"{ran} driver executions for {seen.drivers_run} driver nodes")
    return seen, problems


def why(workflow: Json) -> str:
    """The first reason a failed run gives: a failed node's message, else the workflow's."""
    status = workflow.get("status", {})
    for node in status.get("nodes", {}).values():
        if node.get("phase") in ("Failed", "Error") and node.get("type") in ("Pod", "Plugin"):
            return f"{node.get('templateName')}: {node.get('message', '')}"[:160]
    return str(status.get("message") or status.get("phase") or "never finished")[:160]


def tally(rows: Iterable[tuple[str, bool, str]]) -> tuple[int, int, Counter[str]]:
    """Of (file, as expected, why not) rows: how many as expected, how many in all, and the
    reasons of the others with their counts."""
    listed = list(rows)
    reasons = Counter(reason for _, ok, reason in listed if not ok)
    return sum(ok for _, ok, _ in listed), len(listed), reasons
