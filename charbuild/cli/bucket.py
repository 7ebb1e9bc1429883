"""`status` and `gc` on a cache in an object store (`--cache s3://bucket/prefix`): what they
look at and collect is the store, the truth every worker shares, not this machine's working
copy of it. How a gc keeps out of the way of runs on other machines is in store/remote.py."""

from __future__ import annotations

import sys
import time

from charbuild.cli.common import EXIT_BUILD

# A folder without a manifest is what a killed upload or an interrupted removal left, or a
# publish under way (files first, manifest last) by a worker whose lease gc cannot see: a
# Ray worker's upload of an early-cutoff object is under no run lease. Young ones stay.
DEBRIS_AGE_S = 3600.0


def stored_targets(cache) -> tuple[list[tuple[str, dict, int]], list[str]]:
    """(key, manifest, bytes) of each target the store holds whole (a valid manifest, and
    every file it names there at its size), and the keys of folders that hold none."""
    store = cache.remote
    objs = store.objects()
    keys = sorted(objs.published())
    manifests = store.manifests(keys)
    whole = [(k, manifests[k], objs.size(k)) for k in keys if objs.complete(k, manifests[k])]
    return whole, sorted(set(objs.folders) - {k for k, _, _ in whole})


def gc_store(args, cache, live: set[str]) -> int:
    """`gc` on a store. With --yes it holds the store's gc lease while it decides and removes:
    a run that starts holding keys meanwhile waits for it, then looks them up afresh."""
    from charbuild.store.remote import GC_LEASE

    store = cache.remote
    lease = None
    if args.yes:
        lease = store.try_lease(GC_LEASE, "charbuild gc")
        if lease is None:
            who = store.holder(GC_LEASE) or {}
            print(f"charbuild: another gc of {store.url} is running ({who.get('owner', '?')}); "
                  "nothing was removed", file=sys.stderr)
            return EXIT_BUILD
    try:
        code = _collect(store, live, args.yes)
    finally:
        if lease is not None:
            lease.release(done=True)
    if cache.root.is_dir():
        print(f"this machine's working copy {cache.root} is a cache of its own: "
              f"`charbuild gc SPEC... --cache {cache.root}` collects it")
    return code


def _collect(store, live: set[str], yes: bool) -> int:
    from charbuild.store.remote import MANIFEST, RUNS, StoredObjects

    t0 = time.monotonic()
    verb = "removed" if yes else "would remove"
    objs = store.objects()
    targets = store.alias_targets(objs.aliases)
    live = live | {targets[k] for k in live if targets.get(k)}
    runs = store.run_leases()
    held: dict[str, str] = {}
    for _, body, alive in runs:
        if alive:
            who = f"{body.get('what') or 'a charbuild run'} ({body.get('owner', '?')})"
            for k in body["keys"]:
                held.setdefault(str(k), who)
    for k, who in list(held.items()):
        if targets.get(k):
            held.setdefault(targets[k], who)
    published = objs.published()
    dead = sorted(published - live)
    stale = sorted((a, t) for a, t in targets.items() if a not in live or t not in published)
    debris = sorted(set(objs.folders) - published)
    in_use = {**store.building([*dead, *debris]), **held}
    manifests = store.manifests([*dead, *{t for _, t in stale if t in published}])

    def what(k: str) -> str:
        m = manifests.get(k) or {}
        return f"{k[:12]} {m.get('target', '?')} ({m.get('spec', '?')})"

    kept = young = 0
    aliases, gone, folders = [], [], []
    for a, t in stale:  # aliases first: none is ever left pointing at a removed object
        line = f"alias {a[:12]} -> {(t or '?')[:12]} {(manifests.get(t) or {}).get('target', '(nothing)')}"
        if a in in_use and t in published:
            kept += 1
            print(f"kept {line}: in use by {in_use[a]}")
            continue
        aliases.append(a)
        print(f"{verb} {line}")
    for k in dead:
        if k in in_use:
            kept += 1
            print(f"kept {what(k)}: in use by {in_use[k]}")
            continue
        gone.append(k)
        print(f"{verb} {what(k)}")
    now = store.now()  # the store's clock, as the times it lists
    for k in debris:
        line = f"{store.url}/{store.object_dir(k)}/ ({len(objs.folders[k])} files, no manifest: not an object)"
        newest = objs.newest(k)
        if k in in_use:
            kept += 1
            print(f"kept {line}: in use by {in_use[k]}")
        elif newest is None or now - newest < DEBRIS_AGE_S:
            young += 1
            print(f"kept {line}: written in the last hour (an upload under way?)")
        else:
            folders.append(k)
            print(f"{verb} {line}")
    expired = [rel for rel, _, alive in runs if not alive]

    failed = 0
    if yes:
        store.delete([f"objects/{a[:2]}/{a}.alias" for a in aliases])
        # Manifests first, and files only of objects whose manifest is seen gone: whatever
        # stops us, what is left is absent (a folder without a manifest), never a manifest
        # naming files that are not there.
        store.delete([f"{store.object_dir(k)}/{MANIFEST}" for k in gone])
        after = store.objects()
        unpublished = [k for k in gone if MANIFEST not in after.folders.get(k, {})]
        store.delete([f"{store.object_dir(k)}/{rel}" for k in unpublished + folders
                      for rel in after.folders.get(k, {})])
        final = store.objects()
        store.delete(expired)
        left = set(store.listing(RUNS)) & set(expired)
    else:
        final = StoredObjects()  # what removing all it would remove leaves
        unpublished, left = gone, set()

    # Counted from what the store lists afterwards: only what really went.
    freed = files = 0
    removed, n_folders = [], 0
    for k in [*gone, *folders]:
        was, now_there = objs.folders[k], set(final.folders.get(k, {}))
        freed += sum(size for rel, (size, _) in was.items() if rel not in now_there) if k in gone else 0
        files += len(set(was) - now_there)
        if now_there and k in gone and k in unpublished:
            failed += 1
            print(f"partly removed {what(k)}: its manifest is gone (the target is absent), "
                  f"{len(now_there)} files stayed; a later gc removes them")
        elif now_there and k in gone:
            failed += 1
            print(f"could not remove {what(k)}; kept")
        elif now_there:
            failed += 1
            print(f"could not remove {store.url}/{store.object_dir(k)}/; {len(now_there)} files stayed")
        elif k in gone:
            removed.append(k)
        else:
            n_folders += 1
    n_alias = 0
    for a in aliases:
        if a in final.aliases:
            failed += 1
            print(f"could not remove alias {a[:12]}; kept")
        else:
            n_alias += 1
            files += 1
    summary = f"{len(removed)} unreachable targets ({freed / 1e6:.1f} MB), {n_alias} stale aliases"
    summary += f", {n_folders} folders without a manifest" if n_folders else ""
    summary += f" ({kept} kept: in use by a running build)" if kept else ""
    summary += f" ({young} folders without a manifest kept: written in the last hour)" if young else ""
    summary += f"; {files} stored files in {store.url}"
    if not yes:
        n_expired = f"; {len(expired)} expired run leases" if expired else ""
        print(f"{summary}{n_expired} (dry run: --yes to remove)")
        return 0
    cleaned = len(expired) - len(left)
    print(f"removed {summary}" + (f"; cleaned {cleaned} expired run leases" if cleaned else "")
          + (f"; {failed} could not be removed (kept)" if failed else "")
          + f" in {time.monotonic() - t0:.1f}s")
    return EXIT_BUILD if failed else 0
