"""Small plug-in stages for engine tests: they exercise keys, shards, locks and crashes
without models. Real stages are exercised by the smoke builds."""

from __future__ import annotations

import json
import os
import time

from charbuild.contract import Estimate, Stage, TargetDef, shard_name, shard_ranges


def _log(event: str, name: str) -> None:
    path = os.environ.get("CB_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {name} {os.getpid()}\n")


class Source(Stage):
    name = "t-source"
    version = 1
    reads = ("persona",)

    def targets(self, view):
        fields = {}
        view.read("persona", fields)
        return [TargetDef("source", self.name, fields)]

    def run(self, ctx):
        _log("build", ctx.target.name)
        (ctx.out_dir / "source.txt").write_text(ctx.spec.persona)


class Items(Stage):
    name = "t-items"
    version = 1
    reads = ("models.teacher", "data.dpo_pairs", "data.scale", "data.shard_size")

    def targets(self, view):
        fields = {}
        view.read("models.teacher", fields)
        spec = view.spec
        return [TargetDef(shard_name("items", i), self.name, fields, {"start": s, "count": n}, {"source": ["source"]}, (s, n))
                for i, s, n in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]

    def estimate(self, target, ctx):
        return Estimate(tokens_in=10 * target.params["count"], tokens_out=5 * target.params["count"], calls=target.params["count"])

    def run(self, ctx):
        _log("build", ctx.target.name)
        crash_at = os.environ.get("CB_CRASH_AT")
        if crash_at and ctx.target.name == crash_at:
            raise RuntimeError("simulated crash")
        time.sleep(float(os.environ.get("CB_SLEEP", "0")))
        if os.environ.get("CB_SLOW_ONCE") == ctx.target.name:  # a straggler: slow on its first attempt only
            try:
                fd = os.open(os.environ["CB_SLOW_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                # When the slow attempt began (wall clock, shared by every process here): a
                # story tells "ended before the slow attempt would have" from that, not from
                # its own seconds, which a loaded machine stretches.
                os.write(fd, repr(time.time()).encode())
                os.close(fd)
                # In short steps, as real work returns to Python between calls: a Ray cancel
                # (Ctrl-C) lands between two steps, never inside one blocking call.
                until = time.monotonic() + float(os.environ.get("CB_SLOW_S", "60"))
                while time.monotonic() < until:
                    time.sleep(0.1)
        spin_until = time.thread_time() + float(os.environ.get("CB_SPIN", "0"))  # CPU-bound work (benchmarks)
        while time.thread_time() < spin_until:
            pass
        if os.environ.get("CB_NOISE"):  # what libraries do during a build: bars, dicts, warnings
            import logging
            import sys

            print(f"{{'loss': 0.69, 'step': 1}} from {ctx.target.name}")
            sys.stderr.write(f"\rMap: 100%|##########| 4/4 [00:00] {ctx.target.name}\n")
            # A library's own handler on stderr, as transformers and datasets install theirs.
            lg = logging.getLogger("some.library")
            handler = logging.StreamHandler()
            lg.addHandler(handler)
            lg.propagate = False
            lg.warning("library warning from %s", ctx.target.name)
            lg.removeHandler(handler)
            if crash_at == "noisy-crash":
                raise RuntimeError("simulated crash after noise")
        p = ctx.target.params
        rows = [{"item": j, "text": f"{ctx.input('source').joinpath('source.txt').read_text()}-{j}"} for j in range(p["start"], p["start"] + p["count"])]
        (ctx.out_dir / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = os.environ.get("CB_DONE_LOG")  # which attempts got to the end of a shard
        if done:
            with open(done, "a") as f:
                f.write(f"{ctx.target.name} {os.getpid()}\n")
        return {"items": len(rows)}


class Merge(Stage):
    name = "t-merge"
    version = 1
    reads = ("data.dpo_pairs", "data.scale", "data.shard_size")

    def targets(self, view):
        spec = view.spec
        shards = [shard_name("items", i) for i, _, _ in shard_ranges(spec.data.count("dpo_pairs"), spec.data.shard_size)]
        return [TargetDef("merged", self.name, {}, {}, {"shards": shards})]

    def run(self, ctx):
        _log("build", ctx.target.name)
        text = "".join((d / "items.jsonl").read_text() for d in ctx.inputs["shards"])
        (ctx.out_dir / "merged.jsonl").write_text(text)


class ReadsUnkeyed(Stage):
    """Keys the persona, then reads filters.min_chars in run(): a stale result waiting to
    happen, which the guarded spec refuses (UndeclaredRead)."""

    name = "t-reads-unkeyed"
    version = 1
    reads = ("persona", "filters")

    def targets(self, view):
        fields = {}
        view.read("persona", fields)
        return [TargetDef("unkeyed", self.name, fields)]

    def run(self, ctx):
        (ctx.out_dir / "out.txt").write_text(f"{ctx.spec.persona} {ctx.spec.filters.min_chars}")


def stages():
    return [Source(), Items(), Merge()]


def build(spec_path, cache_dir, sets=(), **kw):
    """Plan and build a spec with these plug-in stages; returns (plan, report)."""
    from charbuild.engine.executor import run_build
    from charbuild.engine.graph import build_graph
    from charbuild.engine.planner import make_plan
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    loaded = load_spec(spec_path, list(sets))
    graph = build_graph(loaded, stages())
    cache = Cache(cache_dir)
    try:
        plan = make_plan(loaded, graph, cache)
        report = run_build(loaded, graph, plan, cache, progress=False, log=lambda s: None, outputs_root=None, **kw)
    finally:
        cache.close()  # as the CLI does: what the run held from gc (here and in a bucket) is let go
    return plan, report


if __name__ == "__main__":  # a second process building the same spec (concurrency test)
    import sys

    from charbuild.store.objects import Cache
    from charbuild.engine.executor import run_build
    from charbuild.engine.graph import build_graph
    from charbuild.engine.planner import make_plan
    from charbuild.spec.model import load_spec

    loaded = load_spec(sys.argv[1])
    graph = build_graph(loaded, stages())
    cache = Cache(sys.argv[2])
    report = run_build(loaded, graph, make_plan(loaded, graph, cache), cache, progress=False, log=lambda s: None, outputs_root=None)
    print(json.dumps({"built": report.built, "waited": report.waited, "cached": report.cached}))
