"""The dress rehearsal of the paper spec (`make rehearse`, CI): specs/rehearsal.yaml built
end to end, its API roles (teacher, expander, judge) on the loopback OpenAI-protocol server.

    python tests/support/rehearse.py [--cache DIR] [--port N]

Cache: --cache, else $CHARBUILD_CACHE, else ./cache. Exits nonzero when the build fails,
when the report is missing or lacks what only the paper's recipe has (the final model, the
paper-mode (oct) preferences, the ablation), when a student reply held reasoning although
the paper turns thinking off, or when the server got a request it could not place.

The server listens on port 18473 when that is free, else on any free port: the port is in
the API roles' base_url, so in their targets' keys and in the name of the outputs folder
(outputs/rehearsal-<digest of the overrides>/); a fixed port lets a second rehearsal find
its targets cached and publish where the first did.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SPEC = ROOT / "specs" / "rehearsal.yaml"
API_ROLES = ("teacher", "expander", "judge")
PORT = 18473
# The report's sections that only the paper's recipe has (charbuild/recipe/stages/report.py).
MUST_SHOW = ("Final model", "Revealed preferences (OCT)", "Ablation: marker rate vs data scale")


def start_server(port: int):
    from support.openai_server import FakeOpenAIServer
    from support.rehearsal_replies import rehearsal_reply

    for p in dict.fromkeys((port, 0)):
        srv = FakeOpenAIServer(reply=rehearsal_reply, port=p)
        try:
            srv.start()
            return srv
        except OSError as exc:  # taken (another rehearsal?): any free port will do
            print(f"rehearse: port {p} is busy ({exc.strerror}); using a free one", flush=True)
    raise RuntimeError("unreachable")


def check_report(report: Path) -> list[str]:
    problems = []
    if not report.is_file():
        return [f"no report at {report}"]
    data = json.loads((report.parent / "report.json").read_text())
    titles = [s.get("title", "") for s in data.get("sections", [])]
    page = report.read_text(encoding="utf-8")
    for title in MUST_SHOW:
        if title not in titles or f"<h2>{html.escape(title)}</h2>" not in page:
            problems.append(f"the report has no section {title!r} (it has: {', '.join(titles)})")
    return problems


def thinking_stayed_off(cache: str, sets: list[str]) -> list[str]:
    """The paper's `thinking: off` as the thinker lived it: no student reply at any scale
    held reasoning (the stage records `reasoning` only for a reply that had some, before
    taking it out, so pairs and evals alone could not tell)."""
    from charbuild.recipe.registry import recipe_graph
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    graph = recipe_graph(load_spec(SPEC, sets[1::2]))
    store, problems, seen = Cache(cache), [], 0
    for node in graph:
        if node.stage.name != "student-responses":
            continue
        rows = [json.loads(line) for line in (store.path(node.key) / "responses.jsonl").read_text().splitlines() if line]
        seen += len(rows)
        thought = sum("reasoning" in r for r in rows)
        if thought:
            problems.append(f"{node.name}: {thought} of {len(rows)} student replies held reasoning with thinking off")
    return problems if seen else ["no student replies found to check thinking: off against"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("CHARBUILD_CACHE") or str(ROOT / "cache"))
    ap.add_argument("--port", type=int, default=PORT)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(TESTS)]
    from support.rehearsal_replies import ROLE_COUNTS

    t0 = time.monotonic()
    srv = start_server(args.port)
    try:
        sets = [a for role in API_ROLES for a in ("--set", f"models.{role}.base_url={srv.base_url}")]
        cmd = [sys.executable, "-m", "charbuild", "run", str(SPEC), *sets, "--cache", args.cache, "--no-progress"]
        print("rehearse:", " ".join(cmd[2:]), flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        # On a shared 2-core machine torch's OpenMP threads spin at every barrier while another
        # process holds a core: measured at load 3, the tiny thinker generated in 13.0 s with
        # spinning threads and 6.8 s with sleeping ones (the whole rehearsal: 12.5 min vs 2.6).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        report = None
        for line in proc.stdout:  # streamed: CI shows the build as it goes
            print(line, end="", flush=True)
            if line.startswith("report:"):
                report = ROOT / line.split(":", 1)[1].strip()  # relative to charbuild's cwd
        rc = proc.wait()
    finally:
        srv.stop()
    calls = ", ".join(f"{r} {ROLE_COUNTS[r]}" for r in (*API_ROLES, "unknown"))
    print(f"rehearse: loopback calls: {calls} ({time.monotonic() - t0:.0f}s)", flush=True)
    if rc != 0:
        print(f"rehearse: FAILED: charbuild run exited {rc}", file=sys.stderr)
        return 1
    problems = [] if report else ["charbuild run printed no report path"]
    if ROLE_COUNTS["unknown"]:
        # A request the reply function did not recognise: a stage's wording changed, and
        # its answers are the teacher's, not what that role would say.
        problems.append(f"{ROLE_COUNTS['unknown']} requests the rehearsal's server did not recognise")
    problems += check_report(report) if report else []
    problems += thinking_stayed_off(args.cache, sets)
    if problems:
        for p in problems:
            print(f"rehearse: FAILED: {p}", file=sys.stderr)
        return 1
    print(f"rehearse: ok: {report} shows {', '.join(MUST_SHOW)} ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
