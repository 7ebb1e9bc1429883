"""The smoke build on a 2-node Ray cluster with its cache on S3 (CI's `make smoke-cluster`).

Everything stays on loopback: a real S3 API (moto's server) and a real Ray cluster
(`ray.cluster_utils.Cluster`) inside a fresh network namespace, where Ray's nodes use
127.0.0.1. It checks what a user relies on: the cluster build finishes, its targets have
the keys a local plan gives (so a laptop and the cluster share one cache), and a second
run builds nothing.

    python tests/support/cluster_smoke.py        # re-executes itself under `unshare -n`
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
SPEC = ROOT / "specs" / "smoke-small.yaml"
MB = 1024 * 1024


def charbuild(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "charbuild", *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=3000)
    print(r.stdout[-4000:], flush=True)
    if r.returncode != 0:
        print(r.stderr[-4000:], file=sys.stderr, flush=True)
    return r


def main() -> int:
    import ray
    from ray.cluster_utils import Cluster

    sys.path[:0] = [str(TESTS)]
    from support.s3_server import S3Server

    t0 = time.monotonic()
    with S3Server(own_process=True) as s3, tempfile.TemporaryDirectory() as d:
        work = Path(d)
        # A working cache of its own, for the driver and (set before the nodes start, whose
        # workers inherit it) every worker: objects an earlier run left on this machine would
        # be uploaded rather than built, and the smoke would build nothing.
        os.environ["CHARBUILD_LOCAL_CACHE"] = str(work / "working-cache")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "object_store_memory": 100 * MB})
        cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
        cluster.wait_for_nodes()
        print(f"cluster up at {cluster.address} in {time.monotonic() - t0:.0f}s", flush=True)
        env = {**os.environ, **s3.env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        cache = s3.url("smoke")
        try:
            first = charbuild("run", str(SPEC), "--executor", "ray", "--address", cluster.address, "--cache", cache,
                              "--no-progress", env=env, cwd=work)
            assert first.returncode == 0, "the cluster build failed"
            second = charbuild("run", str(SPEC), "--executor", "ray", "--address", cluster.address, "--cache", cache,
                               "--no-progress", env=env, cwd=work)
            assert second.returncode == 0 and "nothing to build" in second.stdout, "a second run built something"
            on_s3 = json.loads(charbuild("plan", str(SPEC), "--cache", cache, "--json", env=env, cwd=work).stdout)
            local = json.loads(charbuild("plan", str(SPEC), "--cache", str(work / "local"), "--json", env=env,
                                         cwd=work).stdout)
        finally:
            ray.shutdown()
            cluster.shutdown()
    keys_s3 = {t["name"]: t["key"] for t in on_s3["targets"]}
    keys_local = {t["name"]: t["key"] for t in local["targets"]}
    assert keys_s3 == keys_local, "the cluster's keys differ from a local plan's"
    assert all(t["state"] == "cached" for t in on_s3["targets"])
    print(f"cluster smoke: {len(keys_s3)} targets built on 2 Ray nodes into {cache}, same keys as a local plan, "
          f"second run built nothing ({time.monotonic() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    if os.environ.get("CHARBUILD_IN_NETNS") != "1":
        # Outside a fresh network namespace Ray would advertise the machine's interface address.
        cmd = f"ip link set lo up && CHARBUILD_IN_NETNS=1 exec {sys.executable} {Path(__file__).resolve()}"
        sys.exit(subprocess.run(["unshare", "-n", "sh", "-c", cmd]).returncode)
    sys.exit(main())
