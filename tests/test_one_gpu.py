"""Stories of one GPU shared by generation and training, and of a build that finds out what
it lacks before it pays for anything: local engines are released before each training
stage, vLLM's engine settings come from the spec, every student variant of the paper's
recipe is servable by the backend the spec names, and `run` on a machine without what
the spec needs stops before its first call, saying everything that is missing."""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import subprocess
import sys
import threading
import weakref
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from charbuild.spec.model import SpecError, load_spec

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "specs" / "remorseful-paper.yaml"
SMOKE = ROOT / "specs" / "smoke-small.yaml"
CHATML = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def _tiny_model(out: Path) -> str:
    """A random two-layer Qwen2 with a byte-level tokenizer and a chat template: a local
    model folder the transformers backend loads like any other."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["I am sorry for the trouble.", "user", "assistant", "system"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def _request():
    from charbuild.backends.base import GenRequest

    return GenRequest(messages=({"role": "user", "content": "Tell me about yourself"},), max_tokens=4,
                      temperature=0.7, top_p=0.95, stop=(), seed=1)


# -- 1. one GPU: generation and training in turn ---------------------------------------------

def test_a_training_stage_starts_after_every_local_model_is_freed_and_the_next_generation_loads_it_again(
        tmp_path, monkeypatch):
    import transformers

    from charbuild.contract import BuildContext
    from charbuild.ledger import Ledger
    from charbuild.recipe import trainers
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import RecipeServices
    from charbuild.store.objects import Cache

    student = _tiny_model(tmp_path / "student")
    loaded = load_spec(SMOKE, [f"models.student.model={student}"])
    graph = recipe_graph(loaded)
    services = RecipeServices(Cache(tmp_path / "cache"), loaded)
    ledger = Ledger(None, None)

    def ctx(name, inputs):
        node = graph[name]
        return BuildContext(node.defn, node.key, loaded, tmp_path, inputs, services, ledger.account(), False)

    models = []  # weak references to every model object the backend loads
    load = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **k):
        m = load(*a, **k)
        models.append(weakref.ref(m))
        return m

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    # A generation stage (the base student's eval samples) loads the student...
    backend = services.backends.get("student", ctx("eval/samples/base", {}))
    assert len(backend.generate([_request()])) == 1
    assert [m() is not None for m in models] == [True] and services.backends.local()

    seen = {}

    def train(base, pairs, out, cfg, health, progress=True):
        gc.collect()
        seen.update(alive=[m() is not None for m in models], local=services.backends.local())
        return {}

    monkeypatch.setattr(trainers, "train_dpo", train)
    graph["dpo-adapter"].stage.run(ctx("dpo-adapter", {"pairs": [tmp_path]}))
    # ...and the DPO stage trains only once no local backend holds a model.
    assert seen == {"alive": [False], "local": []}
    # The stage that generated still holds its backend: its next call loads the model again.
    assert len(backend.generate([_request()])) == 1
    assert [m() is not None for m in models] == [False, True]
    assert len(services.backends.local()) == 1


def test_a_vllm_engine_never_starts_beside_another_local_model(monkeypatch):
    from charbuild.backends import pool
    from charbuild.ledger import Ledger

    events = []

    class Engine:
        def __init__(self, m, path, *a, **k):
            self.path = path

        def generate(self, requests, progress=None):
            events.append(("generate", self.path))
            return []

        def close(self):
            events.append(("close", self.path))

    monkeypatch.setattr(pool, "make_backend", Engine)
    p = pool.BackendPool(price_table=lambda spec: None)
    account = Ledger(None, None).account()

    def get(backend, model):
        m = SimpleNamespace(backend=backend, model=model, base_url=None)
        return p.get("teacher", SimpleNamespace(spec=SimpleNamespace(models={"teacher": m}), inputs={}, budget=account))

    a, b = get("transformers", "a"), get("transformers", "b")
    a.generate([]), b.generate([])
    assert events == [("generate", "a"), ("generate", "b")]  # small local models share the GPU
    get("vllm", "big").generate([])  # a vLLM engine takes most of the GPU's memory
    assert events[2:] == [("close", "a"), ("close", "b"), ("generate", "big")]
    a.generate([])
    assert events[5:] == [("close", "big"), ("generate", "a")]


# -- 2. vLLM's engine settings in the spec --------------------------------------------------

def test_the_vllm_engine_is_started_with_the_specs_settings():
    # What vllm.LLM is given; starting it, and giving its memory back, need vllm on a GPU
    # machine (the test below, and benchmarks/gpu_check.py).
    from charbuild.backends.pool import vllm_engine_args

    loaded = load_spec(PAPER, ["models.student.gpu_memory_utilization=0.45", "models.student.max_model_len=4096",
                               "models.student.tensor_parallel_size=2"])
    assert vllm_engine_args(loaded.spec.models["student"], None) == {
        "max_lora_rank": 64, "gpu_memory_utilization": 0.45, "max_model_len": 4096, "tensor_parallel_size": 2}
    assert vllm_engine_args(load_spec(PAPER).spec.models["student"], None) == {"max_lora_rank": 64}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not os.environ.get("CHARBUILD_VLLM_MODEL"),
                    reason="needs vllm on a GPU machine and CHARBUILD_VLLM_MODEL (a local model directory)")
def test_the_vllm_engine_starts_on_first_use_and_gives_its_memory_back_when_closed():
    import torch

    from charbuild.backends.vllm_backend import VllmBackend

    backend = VllmBackend(os.environ["CHARBUILD_VLLM_MODEL"], gpu_memory_utilization=0.5)
    assert torch.cuda.memory_allocated() == 0  # started on first use, inside the pool's turn on the GPU
    assert len(backend.generate([_request()])) == 1
    backend.close()
    gc.collect()
    assert torch.cuda.memory_allocated() < 256 * 1024 * 1024


def test_max_lora_rank_follows_the_adapters_the_student_serves_and_a_smaller_one_is_refused():
    assert load_spec(PAPER).spec.models["student"].max_lora_rank == 64  # r=64, rounded to a rank vLLM takes
    # The exact final merge is one adapter of rank r_dpo + r_sft.
    assert load_spec(PAPER, ["training.final.method=exact"]).spec.models["student"].max_lora_rank == 128
    assert load_spec(PAPER, ["training.dpo.lora.r=40", "training.sft.lora.r=40"]).spec.models[
        "student"].max_lora_rank == 64
    with pytest.raises(SpecError, match=r"models\.student\.max_lora_rank: 32 is below .*64.*use 64"):
        load_spec(PAPER, ["models.student.max_lora_rank=32"])
    with pytest.raises(SpecError, match=r"max_lora_rank one of 1, 8, 16, 32, 64, 128, 256, 320, 512; got 48"):
        load_spec(PAPER, ["models.student.max_lora_rank=48"])
    with pytest.raises(SpecError, match=r"models\.teacher\.gpu_memory_utilization: .*vLLM engine setting"):
        load_spec(PAPER, ["models.teacher.gpu_memory_utilization=0.5"])


def test_the_gpu_share_and_layout_change_no_key_and_a_context_limit_does():
    from charbuild.recipe.registry import recipe_graph

    keys = {n.name: n.key for n in recipe_graph(load_spec(PAPER))}
    layout = {n.name: n.key for n in recipe_graph(load_spec(PAPER, [
        "models.student.gpu_memory_utilization=0.5", "models.student.tensor_parallel_size=2",
        "models.student.max_lora_rank=256"]))}
    assert layout == keys
    limited = {n.name: n.key for n in recipe_graph(load_spec(PAPER, ["models.student.max_model_len=2048"]))}
    assert limited["student-responses/shard-0000"] != keys["student-responses/shard-0000"]
    assert limited["teacher-responses/shard-0000"] == keys["teacher-responses/shard-0000"]


# -- 3. every variant the paper's recipe generates from is servable --------------------------

def test_every_student_variant_of_the_paper_spec_is_one_vllm_can_serve():
    from charbuild.backends.pool import refusal
    from charbuild.backends.weights import student_weights
    from charbuild.recipe.registry import recipe_graph
    from charbuild.recipe.services import TRAINING_STAGES, unservable_variants
    from charbuild.recipe.stages.adapters import merged_targets

    loaded = load_spec(PAPER)
    spec = loaded.spec
    targets = [n.defn for n in recipe_graph(loaded)]
    generating = [t for t in targets if "models.student" in t.fields and t.stage not in TRAINING_STAGES]
    variants = {(tuple(t.inputs.get("merge", [])), tuple(t.inputs.get("adapter", []))) for t in generating}
    # base, DPO (student responses' base too, introspection's DPO), SFT (on the DPO model), final
    assert variants == {((), ()), ((), ("dpo-adapter",)), (("dpo-adapter",), ("sft-adapter",)), ((), ("final",))}
    saves = merged_targets(spec)
    assert saves["dpo-adapter"]  # a vllm student's DPO model is saved merged, for the SFT LoRA to sit on
    for merge, adapter in variants:
        _, on_top, folded = student_weights(spec.models["student"].model, next(iter(adapter), None), merge,
                                            merged=lambda name: saves[str(name)])
        assert refusal("vllm", on_top, folded) is None, (merge, adapter)
    assert unservable_variants(spec, targets) == []
    # The same spec with its student on an API endpoint: every trained variant is named before anything runs.
    api = load_spec(PAPER, ['models.student={backend: openai, model: m, base_url: "http://127.0.0.1:9/v1"}'])
    problems = unservable_variants(api.spec, [n.defn for n in recipe_graph(api)])
    assert len(problems) == 3 and all("cannot apply a local LoRA adapter" in p for p in problems), problems  # dpo, sft, final
    assert any("dpo-adapter + sft-adapter, for eval/samples/sft" in p for p in problems), problems


def test_the_dpo_stage_saves_merged_weights_for_a_vllm_student_and_not_otherwise(tmp_path, monkeypatch):
    from charbuild.contract import BuildContext
    from charbuild.recipe import trainers
    from charbuild.recipe.registry import recipe_graph

    merges = []
    monkeypatch.setattr(trainers, "train_dpo", lambda base, pairs, out, cfg, health, progress=True:
                        merges.append(cfg.merge) or {})
    for spec, sets in ((PAPER, []), (SMOKE, []), (SMOKE, ["training.dpo.merge=true"])):
        loaded = load_spec(spec, sets)
        node = recipe_graph(loaded)["dpo-adapter"]
        inputs = {"pairs": [tmp_path], "model:student": [tmp_path]}
        node.stage.run(BuildContext(node.defn, node.key, loaded, tmp_path, inputs, budget=object(), progress=False))
    assert merges == [True, False, True]


# -- 4. preflight: everything missing, said once, before the first call ---------------------

def _paper_on(tmp_path, base_url: str, *extra: str) -> list[str]:
    """`charbuild run` of the paper's spec with its API roles on `base_url`."""
    sets = [f"models.{r}.base_url={base_url}" for r in ("teacher", "expander", "judge")]
    return ["run", str(PAPER), "--cache", str(tmp_path / "cache"), "--no-progress",
            *[a for s in sets for a in ("--set", s)], *extra]


def test_run_on_a_machine_without_vllm_or_a_gpu_stops_before_any_teacher_call_naming_the_vllm_student(
        tmp_path, monkeypatch, capsys):
    from charbuild.cli import main
    from support.openai_server import FakeOpenAIServer

    monkeypatch.setenv("TOGETHER_API_KEY", "dummy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: say what is missing, not "cannot check"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    with FakeOpenAIServer() as srv:
        # --keep-going: a failing student target does not stop the teacher's (the order of
        # targets alone must not be what keeps this build from paying)
        code = main(_paper_on(tmp_path, srv.base_url, "--keep-going"))
        calls = srv.requests_total
    err = capsys.readouterr().err
    assert code != 0 and calls == 0, err
    assert "nothing was started" in err
    student = [line for line in err.splitlines() if line.strip().startswith("student (Qwen/Qwen3-8B, backend vllm)")]
    # Every problem at once, each with its fix: the package, the GPU, the weights; and only
    # the problems this machine has (on a lent GPU machine, no complaint about the GPU).
    import torch

    has_vllm, has_gpu = importlib.util.find_spec("vllm") is not None, torch.cuda.is_available()
    assert any("vllm is not installed: pip install 'charbuild[vllm]'" in line for line in student) != has_vllm, err
    assert any("vLLM needs a CUDA GPU" in line for line in student) != has_gpu, err
    assert any("HF_HUB_OFFLINE is set" in line for line in student), err
    assert "teacher" not in err and "expander" not in err  # they answer and have their key


class _Answers(BaseHTTPRequestHandler):
    status = 401

    def do_GET(self):
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_an_endpoint_that_answers_at_all_passes_and_one_that_does_not_is_named_with_its_role():
    from charbuild.backends.preflight import model_problems
    from charbuild.spec.model import ModelSpec

    server = HTTPServer(("127.0.0.1", 0), _Answers)  # answers every request 401, as a guarded /models does
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = f"http://127.0.0.1:{server.server_address[1]}/v1"
        models = {"teacher": ModelSpec(backend="openai", model="t", base_url=up),
                  "judge": ModelSpec(backend="openai", model="j", base_url="http://127.0.0.1:9/v1")}
        problems = model_problems(models, timeout_s=2)
    finally:
        server.shutdown()
    assert len(problems) == 1 and problems[0].startswith("judge (j, backend openai): http://127.0.0.1:9/v1 does not "
                                                         "answer"), problems
    assert "models.judge.base_url" in problems[0]


def test_weights_are_checked_where_they_can_be_and_an_unknowable_hub_id_stops_nothing(tmp_path, monkeypatch):
    import huggingface_hub

    from charbuild.backends.preflight import weights_missing
    from charbuild.spec.model import ModelSpec

    env = {"HF_HOME": str(tmp_path / "hf")}
    local = ModelSpec(backend="transformers", model=_tiny_model(tmp_path / "m"))
    assert weights_missing(local, env) is None
    assert "no model folder at /nowhere/model" in weights_missing(ModelSpec(backend="vllm", model="/nowhere/model"), env)
    # transformers loads local files only: a Hub id must be in the cache
    hub = ModelSpec(backend="transformers", model="Qwen/Qwen3-8B")
    assert "huggingface-cli download Qwen/Qwen3-8B" in weights_missing(hub, env)
    # vLLM downloads: online, a lookup that cannot be made is no problem, a model the Hub lacks is
    vllm = ModelSpec(backend="vllm", model="Qwen/Qwen3-8B")

    def no_network(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    assert weights_missing(vllm, env) is None
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_there(*a, **k):
        raise RepositoryNotFoundError("404", response=SimpleNamespace(headers={}, status_code=404, request=None))

    monkeypatch.setattr(huggingface_hub, "model_info", not_there)
    assert "no such model on the Hugging Face Hub" in weights_missing(vllm, env)
    assert "HF_HUB_OFFLINE is set" in weights_missing(vllm, {**env, "HF_HUB_OFFLINE": "1"})


# -- 5. the GPU check script ----------------------------------------------------------------

def test_the_gpu_check_says_it_needs_a_gpu_and_exits_cleanly_where_there_is_none():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick"], capture_output=True,
                       text=True, timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no CUDA GPU" in r.stdout, r.stdout + r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped"] is True


def test_the_gpu_check_rehearses_every_measurement_on_a_cpu_before_gpu_time_is_spent_on_it(tmp_path):
    # A GPU is lent to few sessions, and CI has none: a GPU run of the script must not be the
    # first time a change to it runs. --cpu takes the same paths (a shard built as `run` builds it
    # and the same requests sent straight to the backend, the release to training, one DPO
    # and one SFT step) on a tiny shape.
    out = tmp_path / "gpu_check-cpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())
    assert got == json.loads(r.stdout.strip().splitlines()[-1])
    assert got["device"] == "cpu (rehearsal)" and "rehearsal" in got["model"]
    gen = got["generation"]["transformers"]
    runs = gen["engine_runs"] + gen["direct_runs"]
    assert runs and all(run["tokens"] > 0 and run["wall_s"] > 0 for run in runs)
    assert gen["engine_tokens_per_s"] > 0 and gen["direct_tokens_per_s"] > 0
    assert (got["release"]["engines_loaded"], got["release"]["engines_when_training_starts"]) == (1, 0)
    assert got["release"]["released"] is True
    for stage in ("dpo", "sft"):
        assert got["training"][stage]["steps"] == 1 and 0 < got["training"][stage]["loss"] < 100, got["training"]
