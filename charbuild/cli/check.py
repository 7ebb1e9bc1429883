"""`charbuild check FILE.jsonl`: the online filters, run on any existing data."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def check_file(path: str, spec_path: str | None, as_json: bool) -> int:
    from charbuild.recipe.quality import FilterConfig, check_records

    cfg = FilterConfig()
    if spec_path:
        from charbuild.recipe.constitution_file import load_constitution
        from charbuild.spec.model import load_spec
        from charbuild.recipe.stages.generate import filter_config

        loaded = load_spec(spec_path)
        c = load_constitution(loaded.constitution_path)
        cfg = filter_config(loaded.spec.filters, c.language, c.system_prompt())
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                print(f"{path}:{lineno}: not JSON ({exc.msg})", file=sys.stderr)
                return 2
    res = check_records(records, cfg)
    if as_json:
        print(json.dumps(res, indent=1))
    else:
        for s in res["samples"]:
            print(f"{s['index']:6d}  {'ok  ' if s['ok'] else 'DROP'}  {', '.join(s['reasons'])}")
        c = res["counts"]
        print(f"{Path(path).name}: {c.get('ok', 0)} of {c.get('total', 0)} ok; " +
              ", ".join(f"{k} {v}" for k, v in c.items() if k not in ("ok", "total") and v))
    return 0


def cmd_check(args) -> int:
    return check_file(args.file, args.spec, args.json)
