"""`charbuild sample` and `charbuild chat`: talk to any built model of a spec."""

from __future__ import annotations

import sys

from charbuild.recipe.stages.evals import VARIANTS

TARGET_VARIANT = {"final": "final", "sft-adapter": "sft", "dpo-adapter": "dpo", "base": "base", "student": "base"}


def open_model(loaded, graph, cache, target: str):
    """A backend for the student with the adapters that make `target`, which must be built."""
    from charbuild.backends.pool import make_backend
    from charbuild.backends.weights import student_weights
    from charbuild.recipe.stages.common import model_inputs

    if target not in TARGET_VARIANT:
        raise ValueError(f"--target must be one of {', '.join(TARGET_VARIANT)}")
    variant = TARGET_VARIANT[target]
    needed = {slot: names for slot, names in VARIANTS[variant].items()} | model_inputs(loaded.spec, "student")
    paths = {}
    for slot, names in needed.items():
        for n in names:
            if not cache.has(graph[n].key):
                raise ValueError(f"{n} is not built yet: run `charbuild run {loaded.path} {n}` first")
        paths[slot] = [cache.path(graph[n].key) for n in names]
    m = loaded.spec.models["student"]
    model_path = str(paths["model:student"][0]) if "model:student" in paths else m.model
    # As the pool does in a build: merged weights a target saved are loaded instead of its adapters.
    model_path, adapter, merged = student_weights(model_path, paths["adapter"][0] if "adapter" in paths else None,
                                                  paths.get("merge", []))
    return make_backend(m, model_path, adapter, merged)


def _request(loaded, messages, seed):
    from charbuild.recipe.stages.generate import request

    return request(loaded.spec.models["student"], messages, seed)


def sample(loaded, graph, cache, prompt: str, target: str, system: bool, n: int, seed: int) -> list[str]:
    from charbuild.recipe.constitution_file import load_constitution

    backend = open_model(loaded, graph, cache, target)
    msgs = [{"role": "user", "content": prompt}]
    if system:
        msgs.insert(0, {"role": "system", "content": load_constitution(loaded.constitution_path).system_prompt()})
    try:
        return [r.text for r in backend.generate([_request(loaded, msgs, seed + i) for i in range(n)])]
    finally:
        backend.close()


def chat(loaded, graph, cache, target: str, system: bool, inp=sys.stdin, out=sys.stdout) -> None:
    from charbuild.recipe.constitution_file import load_constitution

    backend = open_model(loaded, graph, cache, target)
    history = []
    if system:
        history.append({"role": "system", "content": load_constitution(loaded.constitution_path).system_prompt()})
    out.write(f"chatting with {target} of {loaded.spec.name} (empty line or Ctrl-D to stop)\n")
    turn = 0
    try:
        while True:
            out.write("you> ")
            out.flush()
            line = inp.readline()
            if not line or not line.strip():
                break
            history.append({"role": "user", "content": line.strip()})
            text = backend.generate([_request(loaded, history, turn)])[0].text
            history.append({"role": "assistant", "content": text})
            out.write(f"{target}> {text}\n")
            turn += 1
    finally:
        backend.close()


def cmd_sample(args) -> int:
    from charbuild.cli.common import load, open_cache

    loaded, graph = load(args)
    for i, text in enumerate(sample(loaded, graph, open_cache(args), args.prompt, args.target, args.system, args.n, args.seed)):
        print(f"--- {args.target} sample {i + 1}\n{text}")
    return 0


def cmd_chat(args) -> int:
    from charbuild.cli.common import load, open_cache

    loaded, graph = load(args)
    chat(loaded, graph, open_cache(args), args.target, args.system)
    return 0
