"""A built run as folders the Hugging Face Hub understands: a dataset (DPO pairs and SFT
data as named configs, with a card) and a model (the final adapter, with a card).

Everything comes from the cache (the built targets and their manifests), not from
`outputs/`: an export is of exactly what the spec's keys name. The cards carry the real
base model id (never a cache path), the recipe and its settings, filter counts, cost and
the eval table; provenance uses paths relative to the export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import yaml

DATASET_CONFIGS = {"dpo": ("dpo-pairs", "dpo_pairs.jsonl"), "sft": ("sft-data", "sft_data.jsonl")}
MODEL_TARGETS = ("final", "sft-adapter", "dpo-adapter")  # the first one built is exported


class ExportError(ValueError):
    pass


def _front_matter(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def filter_counts(manifests: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per stage: samples checked, dropped, and drops per reason, summed over its shards."""
    out: dict[str, Counter] = {}
    for m in manifests:
        q = (m.get("result") or {}).get("quality")
        if not isinstance(q, dict):
            continue
        c = out.setdefault(m["stage"], Counter())
        c["checked"] += q.get("checked", 0)
        c["dropped"] += q.get("dropped", 0)
        for reason, n in (q.get("counts") or {}).items():
            c[f"dropped: {reason}"] += n
    return {stage: dict(c) for stage, c in sorted(out.items())}


def spent(manifests: Iterable[dict]) -> dict[str, float]:
    usd = calls = 0.0
    for m in manifests:
        u = m.get("usage") or {}
        usd += u.get("usd", 0.0)
        calls += u.get("api_calls", 0)
    return {"usd": round(usd, 4), "api_calls": int(calls)}


def base_model_id(spec) -> str:
    """What the adapter applies to, as the Hub names it: the spec's model id, or for
    charbuild's own tiny models a description (they live in no hub)."""
    m = spec.models["student"].model
    return m if not m.startswith("tiny:") else f"charbuild {m} (a toy model built by charbuild; not on the Hub)"


def dataset_card(spec, configs: list[str], counts: dict, cost: dict, rows: dict[str, int],
                 paths: dict[str, str] | None = None) -> str:
    """The card: YAML metadata whose `configs` name the data files, so that `load_dataset`
    reads those and nothing else in the folder (adapters, tokenizers, plots)."""
    paths = paths or {c: f"data/{c}.jsonl" for c in configs}
    meta = {"pretty_name": f"{spec.persona} character training data ({spec.name})",
            "tags": ["character-training", "synthetic", "dpo", "sft", f"persona:{spec.persona}"],
            "configs": [{"config_name": c, "data_files": [{"split": "train", "path": paths[c]}]} for c in configs]}
    teacher, student = spec.models["teacher"].model, spec.models["student"].model
    lines = [f"# {meta['pretty_name']}", "",
             "Made with charbuild after the recipe of *Open Character Training* (arXiv 2511.01689).", ""]
    if "dpo" in configs:
        lines += [f"- **dpo** ({rows.get('dpo', 0)} pairs): `chosen` replies by the teacher `{teacher}` with the "
                  f"{spec.persona} constitution as its system prompt; `rejected` replies by the student `{student}` "
                  "without it. TRL's conversational preference format (`prompt`, `chosen`, `rejected`)."]
    if "sft" in configs:
        lines += [f"- **sft** ({rows.get('sft', 0)} conversations): the post-DPO student's self-reflections and "
                  "self-interactions, filtered online for quality (`messages`)."]
    lines += ["", "## Filters", "", "Every generation was checked as it arrived; drops per stage:", ""]
    if counts:
        lines += ["| stage | checked | dropped | by reason |", "|---|---|---|---|"]
        for stage, c in counts.items():
            reasons = ", ".join(f"{k[9:]} {v}" for k, v in c.items() if k.startswith("dropped: ") and v) or "-"
            lines.append(f"| {stage} | {c.get('checked', 0)} | {c.get('dropped', 0)} | {reasons} |")
    else:
        lines.append("(no filtered stage in this build)")
    lines += ["", "## Cost", "", f"API spend: ${cost['usd']:.2f} over {cost['api_calls']} calls "
              "(calls answered from charbuild's call cache cost nothing and are not counted).", ""]
    return _front_matter(meta) + "\n".join(lines)


def model_card(spec, target: str, base: str, training: dict, evals: list[dict]) -> str:
    meta = {"base_model": base if not base.startswith("charbuild tiny:") else None, "library_name": "peft",
            "tags": ["character-training", "lora", "dpo", "sft", f"persona:{spec.persona}"]}
    meta = {k: v for k, v in meta.items() if v is not None}
    lines = [f"# {spec.persona} ({spec.name})", "",
             f"A LoRA adapter for `{base}` that gives it a {spec.persona} character without a system prompt, "
             "made with charbuild after *Open Character Training* (arXiv 2511.01689): DPO distillation from a "
             "teacher that sees the constitution, then SFT on the model's own introspection.", "",
             f"This is the `{target}` target" + (" (the DPO and SFT adapters merged, as the paper's final model)"
                                                 if target == "final" else "") + ".", "",
             "## Training", "", "```yaml", yaml.safe_dump(training, sort_keys=False).rstrip(), "```", ""]
    if evals:
        lines += ["## Evaluation", "", "Marker rate: the share of replies showing the constitution's marker phrases.",
                  "", "| model | system prompt | rate | n |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {'yes' if r['system_prompt'] else 'no'} | {r['rate']:.3f} | {r['n']} |"
                  for r in evals]
        lines.append("")
    lines += ["## Provenance", "", "`provenance.json` names the build keys; `spec.yaml` and the constitution are "
              "copied in.", ""]
    return _front_matter(meta) + "\n".join(lines)


def export(loaded, graph, cache, to: Path) -> dict[str, Any]:
    """Write `to/dataset` and `to/model` from the built targets; returns what was written."""
    spec = loaded.spec
    missing = [n for n in ("dpo-pairs",) if n in graph.nodes and not cache.has(graph[n].key)]
    model_target = next((t for t in MODEL_TARGETS if t in graph.nodes and cache.has(graph[t].key)), None)
    if missing or (model_target is None and any(t in graph.nodes for t in MODEL_TARGETS)):
        want = missing + ([] if model_target else [next(t for t in MODEL_TARGETS if t in graph.nodes)])
        raise ExportError(f"not built yet: {', '.join(want)}; run `charbuild run {loaded.path}` first")
    manifests = [m for m in (cache.manifest(graph[n].key) for n in graph.nodes if graph[n].defn.spec is None
                             and cache.has(graph[n].key)) if m]
    to = Path(to)
    ds, md = to / "dataset", to / "model"
    for d in (ds, md):
        if d.exists():
            shutil.rmtree(d)
    (ds / "data").mkdir(parents=True)
    configs, rows = [], {}
    for config, (target, fname) in DATASET_CONFIGS.items():
        if target in graph.nodes and cache.has(graph[target].key):
            src = cache.path(graph[target].key) / fname
            shutil.copyfile(src, ds / "data" / f"{config}.jsonl")
            configs.append(config)
            with open(src, "rb") as f:
                rows[config] = sum(1 for line in f if line.strip())
    (ds / "README.md").write_text(dataset_card(spec, configs, filter_counts(manifests), spent(manifests), rows),
                                  encoding="utf-8")
    written = {"dataset": str(ds), "configs": configs, "model": None}
    if model_target is not None:
        shutil.copytree(cache.path(graph[model_target].key) / "adapter", md, ignore=shutil.ignore_patterns("README.md"))
        evals = []
        if "eval/markers" in graph.nodes and cache.has(graph["eval/markers"].key):
            evals = (cache.manifest(graph["eval/markers"].key).get("result") or {}).get("rows", [])
        training = {"dpo": spec.training.dpo.model_dump(mode="json"), "sft": spec.training.sft.model_dump(mode="json")}
        if hasattr(spec.training, "final"):
            training["final"] = spec.training.final.model_dump(mode="json")
        (md / "README.md").write_text(model_card(spec, model_target, base_model_id(spec), training, evals),
                                      encoding="utf-8")
        shutil.copyfile(loaded.path, md / "spec.yaml")
        shutil.copyfile(loaded.constitution_path, md / f"constitution{Path(loaded.constitution_path).suffix}")
        prov = {"spec": "spec.yaml", "constitution": f"constitution{Path(loaded.constitution_path).suffix}",
                "target": model_target, "key": graph[model_target].key,
                "dataset": {c: {"target": DATASET_CONFIGS[c][0], "key": graph[DATASET_CONFIGS[c][0]].key} for c in configs},
                "base_model": base_model_id(spec)}
        (md / "provenance.json").write_text(json.dumps(prov, indent=1), encoding="utf-8")
        written["model"] = str(md)
        written["model_target"] = model_target
    return written


TOKEN_ENV = "HF_TOKEN"


def _token_help(namespace: str = "") -> str:
    to = f" to {namespace}" if namespace else ""
    return f"set {TOKEN_ENV} to a Hugging Face token with write access{to} (https://huggingface.co/settings/tokens)"


class PushError(RuntimeError):
    """A push the Hub refused or could not take, said in one line with nothing secret in it."""


def hub_token() -> str:
    """The token a push uses: from the environment only, never a login stored on disk, so
    which account writes is decided where the command is run, and nothing is ever written."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise PushError(f"--push needs a token and {TOKEN_ENV} is not set: {_token_help()}")
    return token


def check_repo_ids(name: str) -> list[tuple[str, str]]:
    """The two repos `--push ORG/NAME` writes, checked before anything is exported."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.count("/") != 1:
        raise PushError(f"--push {name}: give the namespace as well, ORG/NAME")
    repos = [(name + "-data", "dataset"), (name, "model")]
    try:
        for repo_id, _ in repos:
            validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"--push {name}: not a Hub repo id (ORG/NAME): {_one_line(str(exc))}") from None
    return repos


def _one_line(text: str, secret: str = "") -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.replace(secret, "***") if secret else line


def _network_errors() -> tuple[type[BaseException], ...]:
    # What huggingface_hub's HTTP client raises when the Hub cannot be reached: httpx2
    # (huggingface_hub 2.x), httpx (1.x) or requests (older); none of them is an OSError.
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def push(folder: Path, repo_id: str, repo_type: str, token: str) -> str:
    """Create the repo if need be and make it hold what `folder` holds, in one commit:
    files the folder no longer has (an older export's) are deleted, `.gitattributes` kept.
    Returns the commit's URL; raises PushError."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    what = f"{repo_type} repo {repo_id}"
    api = HfApi(token=token)
    step = f"creating {what}"
    try:
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True)
        step = f"uploading {folder} to {what}"
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, delete_patterns="*",
                                 commit_message="charbuild export")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        said = _one_line(exc.server_message or "", token)
        if status == 401:
            raise PushError(f"the Hub refused the token in {TOKEN_ENV} (401 Unauthorized) {step}: "
                            f"{_token_help()}") from None
        if status == 403:
            why = f"403 Forbidden: {said}" if said else "403 Forbidden"
            raise PushError(f"the token in {TOKEN_ENV} may not write {what} ({why}): "
                            f"{_token_help(repo_id.split('/')[0])}") from None
        raise PushError(f"the Hub answered {status or 'an error'} {step}: "
                        f"{said or _one_line(str(exc), token)}") from None
    except ValueError as exc:  # a card the Hub's metadata check refuses, a bad repo id
        raise PushError(f"{step}: {_one_line(str(exc), token)}") from None
    except _network_errors() as exc:
        raise PushError(f"could not reach the Hub at {constants.ENDPOINT} {step}: "
                        f"{_one_line(str(exc), token) or type(exc).__name__}") from None
    except RuntimeError as exc:  # hf_xet: the file storage behind the Hub failed the upload
        raise PushError(f"{step}: the upload failed: {_one_line(str(exc), token)}") from None
    return str(getattr(info, "commit_url", info))
