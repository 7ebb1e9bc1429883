"""What charbuild does on one GPU, on a model of a real shape: generation through the
engine vs the backend called directly, one DPO and one SFT step, peak memory, and the
GPU memory a training stage gets back from the generation engines.

The model is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings), randomly initialised in bf16 from a config built
here, with a word-level tokenizer over the whole vocabulary: nothing is downloaded. Its
replies are random tokens that rarely end early, so every request generates close to
max_tokens and throughput compares like with like.

- generation: one teacher-responses shard built as `charbuild run` builds it (spec, graph,
  plan, the pool's metered backend, the call cache, filters, manifest, commit) against the
  same requests sent straight to the backend, same batches; tokens/s and the ratio. The
  transformers backend always; vLLM too where it is installed (`--backends`).
- release: GPU memory held by the loaded generation model, and what is left once the
  pool hands the GPU to a training stage (`RecipeServices.gpu_for_training`).
- training: one DPO and one SFT optimizer step (charbuild.recipe.trainers) with the
  paper's LoRA (r=64, alpha=128), seconds and torch.cuda.max_memory_allocated each.

    python benchmarks/gpu_check.py --quick     # under 5 minutes on an H100
    python benchmarks/gpu_check.py             # more requests, 3 timed runs a side
    python benchmarks/gpu_check.py --cpu       # the same code paths on a CPU, a tiny shape:
                                               # proves the script before GPU time is spent on it

Without a CUDA GPU it says so and exits 0. Writes benchmarks/results/gpu_check.json and
prints the same JSON as its last line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHAPE = QWEN2_05B  # --cpu swaps in a tiny one
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 requests, one timed run a side (under 5 min on an H100)")
    ap.add_argument("--backends", default="auto", help="transformers,vllm or auto (vllm where installed)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu_check.json (gpu_check-cpu.json with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="a rehearsal on the CPU with a tiny shape; its figures mean nothing")
    args = ap.parse_args()
    import torch

    if args.cpu:
        global SHAPE
        SHAPE = dict(QWEN2_05B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=2048)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to measure here; "
              "run it on a GPU machine")
        print(json.dumps({"skipped": True, "reason": "no CUDA GPU"}))
        return 0
    requests, max_tokens, runs = (8, 16, 1) if args.cpu else (64, 128, 1) if args.quick else (256, 256, 3)
    backends = ["transformers"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if args.backends != "auto":
        backends = [b for b in args.backends.split(",") if b]
    work = Path(tempfile.mkdtemp(prefix="cb-gpu-check-"))
    t_all = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    result: dict = {"quick": args.quick, "device": torch.cuda.get_device_name(0) if cuda else "cpu (rehearsal)",
                    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else 0,
                    "model": "Qwen2-0.5B shape, random bf16" if cuda else "tiny shape, random (rehearsal)",
                    "requests": requests, "max_tokens": max_tokens,
                    "runs": runs}
    try:
        model_dir = make_model(work / "model", "cuda" if cuda else "cpu")
        result["params_m"] = round(param_count(model_dir) / 1e6, 1)
        result["generation"] = {}
        for b in backends:
            try:
                result["generation"][b] = generation(b, model_dir, work, requests, max_tokens, runs)
            except Exception as exc:  # report and go on: the other measures still mean something
                result["generation"][b] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        result["release"] = release(model_dir, work)
        result["training"] = {kind: train_step(kind, model_dir, work) for kind in ("dpo", "sft")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                         "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    report(result)
    out = args.out or str(ROOT / "benchmarks" / "results" / ("gpu_check-cpu.json" if args.cpu else "gpu_check.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


def make_model(out: Path, device: str = "cuda") -> str:
    """Qwen2-0.5B's shape, random weights in bf16, a word-level tokenizer ("w0".."wN") over
    the whole vocabulary and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    n = SHAPE["vocab_size"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), n)})
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=wl, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:2])
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = Qwen2Config(**SHAPE, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      torch_dtype="bfloat16")
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model
    _empty_cache()
    return str(out)


def _allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def param_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def generation(backend: str, model_dir: str, work: Path, requests: int, max_tokens: int, runs: int) -> dict:
    """One teacher-responses shard through the engine vs its requests sent to the backend
    directly (same batches), alternating which goes first; tokens/s medians."""
    from charbuild.backends.pool import make_backend
    from charbuild.engine.executor import run_build
    from charbuild.engine.planner import make_plan
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import RecipeServices
    from charbuild.recipe.stages.common import read_jsonl
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    cls = _backend_class(backend)
    sent: list = []  # the engine's requests, chunk by chunk, replayed on the direct side
    in_model = [0.0]
    generate = cls.generate

    def spy(self, reqs, *a, **kw):
        sent.append(list(reqs))
        t = time.perf_counter()
        try:
            return generate(self, reqs, *a, **kw)
        finally:
            in_model[0] += time.perf_counter() - t

    cls.generate = spy
    cache = Cache(work / f"cache-{backend}")
    sets = [f"models.teacher.model={model_dir}", f"models.teacher.backend={backend}",
            f"models.teacher.sampling.max_tokens={max_tokens}", "models.teacher.batch_size=32",
            "models.teacher.sampling.stop=[]",  # the word-level vocabulary has no tokens to spell "\nUser:" with
            f"data.dpo_pairs={requests}", f"data.shard_size={requests}", "data.prompts.general_limit=null",
            "filters.max_failure_rate=1.0"]  # random tokens fail every filter: measure, do not stop
    spec_path = ROOT / "specs" / "smoke-small.yaml"
    target = "teacher-responses/shard-0000"

    def engine(i: int) -> dict:
        shutil.rmtree(cache.root / "calls", ignore_errors=True)  # every call really generates
        sent.clear()
        in_model[0] = 0.0
        t0 = time.perf_counter()
        loaded = load_spec(spec_path, sets + [f"filters.max_chars={20000 + i}"])  # fresh keys, same answers
        graph = recipe_graph(loaded)
        services = RecipeServices(cache, loaded)
        plan = make_plan(loaded, graph, cache, [target], services)
        rep = run_build(loaded, graph, plan, cache, progress=False, log=lambda s: None, outputs_root=None,
                        services=services)
        wall = time.perf_counter() - t0
        if target not in rep.built:
            raise RuntimeError(f"the shard did not build: {rep.failed or rep}")
        rows = list(read_jsonl(cache.path(graph[target].key) / "responses.jsonl"))
        return {"wall_s": wall, "in_model_s": in_model[0], "tokens": sum(r["completion_tokens"] for r in rows)}

    def direct(chunks: list) -> dict:
        in_model[0] = 0.0
        t0 = time.perf_counter()
        m = load_spec(spec_path, sets).spec.models["teacher"]
        b = make_backend(m, model_dir, None)
        tokens = sum(r.completion_tokens for c in chunks for r in b.generate(c))
        b.close()
        return {"wall_s": time.perf_counter() - t0, "in_model_s": in_model[0], "tokens": tokens}

    try:
        engine(-1)  # warm-up, and the requests the direct side replays
        chunks = [list(c) for c in sent]
        direct(chunks)
        e_runs, d_runs = [], []
        for i in range(runs):
            if i % 2:
                d_runs.append(direct(chunks))
                e_runs.append(engine(i))
            else:
                e_runs.append(engine(i))
                d_runs.append(direct(chunks))
    finally:
        cls.generate = generate
    e = statistics.median(r["tokens"] / r["wall_s"] for r in e_runs)
    d = statistics.median(r["tokens"] / r["wall_s"] for r in d_runs)
    return {"engine_tokens_per_s": round(e, 1), "direct_tokens_per_s": round(d, 1), "engine_over_direct": round(e / d, 3),
            "engine_outside_model_s": round(statistics.median(r["wall_s"] - r["in_model_s"] for r in e_runs), 3),
            "direct_outside_model_s": round(statistics.median(r["wall_s"] - r["in_model_s"] for r in d_runs), 3),
            "engine_runs": e_runs, "direct_runs": d_runs, "requests_per_run": sum(len(c) for c in chunks)}


def _backend_class(backend: str):
    if backend == "vllm":
        from charbuild.backends.vllm_backend import VllmBackend

        return VllmBackend
    from charbuild.backends.transformers_backend import TransformersBackend

    return TransformersBackend


def release(model_dir: str, work: Path) -> dict:
    """GPU memory with the pool's generation model loaded, and once a training stage has the GPU."""
    import torch

    from charbuild.backends.base import GenRequest
    from charbuild.contract import BuildContext
    from charbuild.ledger import Ledger
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import RecipeServices
    from charbuild.spec.model import load_spec
    from charbuild.store.objects import Cache

    _empty_cache()
    before = _allocated()
    loaded = load_spec(ROOT / "specs" / "smoke-small.yaml", [f"models.student.model={model_dir}"])
    node = recipe_graph(loaded)["eval/samples/base"]
    services = RecipeServices(Cache(work / "cache-release"), loaded)
    ctx = BuildContext(node.defn, node.key, loaded, work, {}, services, Ledger(None, None).account(), False)
    backend = services.backends.get("student", ctx)
    backend.generate([GenRequest(messages=({"role": "user", "content": "w5 w6 w7"},), max_tokens=8, temperature=0.7,
                                 top_p=0.95, stop=(), seed=1)])
    loaded_b, engines_loaded = _allocated(), len(services.backends.local())
    with services.gpu_for_training():
        training_b, engines_training = _allocated(), len(services.backends.local())
    services.close()
    gib = 2**30
    # the engine count says it where memory cannot (a CPU rehearsal allocates no GPU memory)
    return {"before_gib": round(before / gib, 3), "generation_model_loaded_gib": round(loaded_b / gib, 3),
            "when_training_starts_gib": round(training_b / gib, 3), "engines_loaded": engines_loaded,
            "engines_when_training_starts": engines_training,
            "released": training_b <= before + 64 * 2**20 and engines_loaded > 0 and engines_training == 0}


def train_step(kind: str, model_dir: str, work: Path) -> dict:
    """One optimizer step of the recipe's trainer with the paper's LoRA, at a real length."""
    import random

    import torch

    from charbuild.recipe.trainers import TrainConfig, train_dpo, train_sft

    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(3, SHAPE['vocab_size'])}" for _ in range(n))

    data = work / f"{kind}.jsonl"
    with open(data, "w") as f:
        for _ in range(8):
            if kind == "dpo":
                row = {"prompt": [{"role": "user", "content": words(64)}],
                       "chosen": [{"role": "assistant", "content": words(300)}],
                       "rejected": [{"role": "assistant", "content": words(300)}]}
            else:
                row = {"messages": [{"role": "user", "content": words(64)},
                                    {"role": "assistant", "content": words(600)}]}
            f.write(json.dumps(row) + "\n")
    cfg = TrainConfig(lora_r=64, lora_alpha=128, batch_size=8, micro_batch_size=4, max_steps=1,
                      max_length=1024, warmup_ratio=0.0)
    _empty_cache()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = (train_dpo if kind == "dpo" else train_sft)(model_dir, str(data), str(work / f"out-{kind}"), cfg,
                                                      progress=False)
    return {"seconds": round(time.perf_counter() - t0, 2),
            "peak_memory_gib": round((torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0) / 2**30, 2),
            "steps": res["steps"], "loss": res["final_loss"], "trainer_seconds": res["seconds"]}


def report(r: dict) -> None:
    print(f"gpu_check on {r['device']} ({r['gpu_memory_gib']} GiB), {r['model']} ({r.get('params_m')}M parameters), "
          f"{r['requests']} requests x {r['max_tokens']} tokens, {r['runs']} timed run(s) a side")
    for b, g in r.get("generation", {}).items():
        if "error" in g:
            print(f"  {b:12s} generation failed: {g['error']}")
            continue
        print(f"  {b:12s} engine {g['engine_tokens_per_s']:,.0f} tok/s vs direct {g['direct_tokens_per_s']:,.0f} tok/s "
              f"({g['engine_over_direct']:.3f}x); outside the model {g['engine_outside_model_s']:.2f} s vs "
              f"{g['direct_outside_model_s']:.2f} s")
    rel = r.get("release", {})
    print(f"  release      {rel.get('generation_model_loaded_gib')} GiB with the generation model loaded, "
          f"{rel.get('when_training_starts_gib')} GiB when training starts (before: {rel.get('before_gib')} GiB); "
          f"local engines {rel.get('engines_loaded')} then {rel.get('engines_when_training_starts')}")
    for kind, t in r.get("training", {}).items():
        print(f"  {kind} step     {t['seconds']} s, peak {t['peak_memory_gib']} GiB (loss {t['loss']})")
    print(f"  total        {r['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
