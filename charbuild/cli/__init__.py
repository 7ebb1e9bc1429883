"""The command line: thin verbs over spec -> graph -> plan -> build, one module per verb group.

Imports are inside the verbs so a null `plan` loads only what it needs.
"""

from __future__ import annotations

import argparse
import sys

from charbuild.cli.common import EXIT_BUILD, EXIT_SPEC  # noqa: F401  (exit codes of every verb)

# verb -> (module in charbuild.cli, function): one module per verb group, imported on use.
VERBS = {"plan": ("build", "cmd_plan"), "run": ("build", "cmd_run"), "explain": ("inspect", "cmd_explain"),
         "dag": ("inspect", "cmd_dag"), "show": ("inspect", "cmd_show"), "status": ("inspect", "cmd_status"),
         "gc": ("inspect", "cmd_gc"), "check": ("check", "cmd_check"), "sample": ("talk", "cmd_sample"),
         "chat": ("talk", "cmd_chat"), "export": ("export", "cmd_export")}


def _common(p: argparse.ArgumentParser, targets: bool = True) -> None:
    p.add_argument("spec", help="spec YAML file")
    if targets:
        p.add_argument("targets", nargs="*", help="only these targets and what they need")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. --set data.dpo_pairs=300 (repeatable)")
    p.add_argument("--scale", type=float, default=None, help="scale every data size (0.25 for a 25%% ablation)")
    p.add_argument("--cache", default=None, help="cache root (default: $CHARBUILD_CACHE or ./cache)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="charbuild", description="Declarative, cached builds for character training.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="dry run: every target, cached or to build, why, and what it costs")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="one line per shard (default: one line per sharded target)")
    p = sub.add_parser("run", help="build what is stale, reuse the rest")
    _common(p)
    p.add_argument("--keep-going", action="store_true", help="build what does not depend on a failed target")
    p.add_argument("--jobs", type=int, default=1, help="targets built at once (API-bound shards)")
    p.add_argument("--executor", choices=["local", "ray"], default=None,
                   help="where targets build: local (this process, default) or ray (each target a Ray task); "
                        "default: the spec's execution.executor")
    p.add_argument("--address", default=None, metavar="auto|ray://HOST:10001",
                   help="the Ray cluster (default: the spec's execution.address, else RAY_ADDRESS or this machine's)")
    p.add_argument("--no-progress", action="store_true", help="plain lines, no live status line")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="library output (progress bars, training logs) on the console instead of the cache's logs/")
    p.add_argument("--force-gate", action="append", default=[], metavar="NAME",
                   help="go on past this failed gate, knowingly (repeatable)")
    p = sub.add_parser("explain", help="why a target is (not) stale")
    _common(p, targets=False)
    p.add_argument("target")
    p = sub.add_parser("dag", help="the build graph")
    _common(p, targets=False)
    p.add_argument("--format", choices=["text", "mermaid", "dot"], default="text")
    p = sub.add_parser("show", help="a built target's manifest and files")
    _common(p, targets=False)
    p.add_argument("target")
    p = sub.add_parser("status", help="what the cache holds, spend per spec")
    p.add_argument("--cache", default=None)
    p = sub.add_parser("gc", help="remove cached targets no listed spec reaches (dry run unless --yes)")
    p.add_argument("specs", nargs="+")
    p.add_argument("--cache", default=None)
    p.add_argument("--yes", action="store_true")
    p = sub.add_parser("sample", help="sample replies from a built model")
    _common(p, targets=False)
    p.add_argument("prompt")
    p.add_argument("--target", default="final", help="final (default: the paper's model, training.final), "
                                                    "sft-adapter, dpo-adapter or base")
    p.add_argument("--system", action="store_true", help="with the constitution as system prompt")
    p.add_argument("-n", type=int, default=1, help="how many samples")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("chat", help="talk to a built model")
    _common(p, targets=False)
    p.add_argument("--target", default="final", help="as for sample")
    p.add_argument("--system", action="store_true")
    p = sub.add_parser("export", help="the built data and final adapter as Hub folders with cards")
    _common(p, targets=False)
    p.add_argument("--to", required=True, help="folder to write dataset/ and model/ into")
    p.add_argument("--push", metavar="ORG/NAME", default=None,
                   help="upload to the Hub as ORG/NAME-data (dataset) and ORG/NAME (model), each made to hold "
                        "what was exported; the token from $HF_TOKEN")
    p = sub.add_parser("check", help="run the quality filters on a JSONL file")
    p.add_argument("file")
    p.add_argument("--spec", default=None, help="take filter settings and the constitution from this spec")
    p.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    # Before torch starts its OpenMP threads: idle ones sleep instead of spinning, which on a
    # small CPU machine shared with other work halved the tiny models' generation time.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parser().parse_args(argv)
    from charbuild.errors import CacheWriteError, SpecError

    try:
        import importlib

        module, fn = VERBS[args.cmd]
        return getattr(importlib.import_module(f"charbuild.cli.{module}"), fn)(args)
    except SpecError as exc:
        print(f"charbuild: invalid spec\n{exc.format()}", file=sys.stderr)
        return EXIT_SPEC
    except CacheWriteError as exc:  # a read-only cache, a full disk
        print(f"charbuild: {exc}", file=sys.stderr)
        return EXIT_BUILD
    except BrokenPipeError:  # `charbuild plan ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ncharbuild: interrupted; every finished target and every answered call is kept in the cache",
              file=sys.stderr)
        return 130
    except Exception as exc:
        from charbuild.engine.graph import GraphError
        from charbuild.recipe.constitution_file import ConstitutionError

        if isinstance(exc, (GraphError, ConstitutionError, FileNotFoundError, ValueError)):
            print(f"charbuild: {exc}", file=sys.stderr)
            return EXIT_SPEC
        raise


if __name__ == "__main__":
    sys.exit(main())
