"""The matrix summary: matrix.md (a table), matrix.json, matrix.junit.xml (one test case per build)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pipeline.build.manifest import write_json_atomic, write_text_atomic
from pipeline.matrix.jobs import JobResult
from pipeline.matrix.spec import Matrix

SUMMARY_FILES = ("matrix.md", "matrix.json", "matrix.junit.xml")


def summary_data(matrix: Matrix, results: list[JobResult], executor: str, wall_time_s: float) -> dict[str, Any]:
    labels = {job.name: job.labels for job in matrix.jobs}
    return {
        "matrix": str(matrix.path),
        "executor": executor,
        "wall_time_s": round(wall_time_s, 3),
        "jobs": len(results),
        "passed": sum(result.ok for result in results),
        "failed": [result.name for result in results if not result.ok],
        "builds": [{**result.to_dict(), "labels": labels[result.name]} for result in results],
    }


def render_markdown(data: dict[str, Any]) -> str:
    lines = [f"# Build matrix: {data['passed']}/{data['jobs']} passed ({data['executor']}, {data['wall_time_s']:.1f}s)",
             "", "| build | status | exit | attempts | reused stages | time (s) | host | message |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for build in data["builds"]:
        message = build["message"].replace("|", "\\|")
        lines.append(f"| {build['name']} | {build['status']} | {build['exit_code']} | {build['attempts']} | "
                     f"{', '.join(build['reused']) or '-'} | {build['wall_time_s']:.1f} | {build['host']} | {message} |")
    return "\n".join(lines) + "\n"


def render_junit(data: dict[str, Any]) -> str:
    failed = [build for build in data["builds"] if build["status"] != "passed"]
    suites = ET.Element("testsuites", name="quantpipe matrix", tests=str(data["jobs"]), failures=str(len(failed)))
    suite = ET.SubElement(suites, "testsuite", name="matrix", tests=str(data["jobs"]), failures=str(len(failed)),
                          errors="0", skipped="0", time=f"{data['wall_time_s']:.3f}")
    for build in data["builds"]:
        case = ET.SubElement(suite, "testcase", classname="matrix", name=build["name"],
                             time=f"{build['wall_time_s']:.3f}")
        if build["status"] != "passed":
            ET.SubElement(case, "failure", type=build["status"], message=build["message"] or build["status"])
        ET.SubElement(case, "system-out").text = (f"exit {build['exit_code']}, attempts {build['attempts']}, "
                                                  f"reused: {', '.join(build['reused']) or 'none'}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_summary(out: Path, data: dict[str, Any]) -> None:
    write_text_atomic(out / "matrix.md", render_markdown(data))
    write_json_atomic(out / "matrix.json", data)
    write_text_atomic(out / "matrix.junit.xml", render_junit(data))
