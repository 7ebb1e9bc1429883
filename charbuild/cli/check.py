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
    from charbuild.recipe.stages.common import DataFileError, jsonl_rows

    records = []
    try:
        for lineno, rec in jsonl_rows(Path(path)):
            problem = _unreadable(rec)
            if problem:
                raise DataFileError(f"{path}:{lineno}: {problem}")
            records.append(rec)
    except DataFileError as exc:
        print(f"charbuild: {exc}", file=sys.stderr)
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


def _unreadable(rec: dict) -> str | None:
    """Why a row has no text to check, when that is the file's fault rather than the
    reply's: an empty reply is a finding ("empty"), a row of another shape is an error."""
    from charbuild.recipe.quality import TEXT_FIELDS, text_of

    if text_of(rec) is not None:
        return None
    present = [k for k in (*TEXT_FIELDS, "messages") if k in rec]
    if not present:
        return (f"no text to check: expected one of {', '.join(TEXT_FIELDS)} or messages "
                f"(found: {', '.join(map(str, rec)) or 'no fields'})")
    wrong = [k for k in present if rec[k] is not None and not isinstance(rec[k], (str, list, dict))]
    if wrong:
        return f"{wrong[0]} is {type(rec[wrong[0]]).__name__}, expected text or a list of chat messages"
    return None


def cmd_check(args) -> int:
    return check_file(args.file, args.spec, args.json)
