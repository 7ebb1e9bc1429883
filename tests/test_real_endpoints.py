"""Any OpenAI-compatible server works with the stock settings: `transformers serve` itself
(started here, serving a tiny model charbuild trained), and the loopback server for what
a real provider does (echoing keys, two endpoints, prices)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from support.api_build import persona_reply, plan_json, run, write_spec
from support.openai_server import FakeOpenAIServer

from charbuild.backends.base import BackendError, GenRequest
from charbuild.backends.openai_backend import OpenAIBackend, OpenAIConfig

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# -- transformers serve ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _built_folder(spec: Path, target: str, cache: Path) -> Path:
    from charbuild.store.objects import Cache

    key = next(t["key"] for t in plan_json(str(spec), target, "--cache", str(cache))["targets"] if t["name"] == target)
    return Cache(cache).path(key)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The smoke spec's tiny teacher, trained by charbuild, behind `transformers serve`."""
    if not (BIN / "transformers").exists():
        pytest.skip("transformers' `serving` extra is not installed (pip install 'transformers[serving]')")
    home = tmp_path_factory.mktemp("served")
    cache = home / "cache"
    smoke = ROOT / "specs" / "smoke-small.yaml"
    cwd = os.getcwd()
    os.chdir(home)
    try:
        assert run(str(smoke), "tiny/teacher", "tiny/student", "--cache", str(cache)) == 0
    finally:
        os.chdir(cwd)
    model_dir = _built_folder(smoke, "tiny/teacher", cache)
    port = _free_port()
    log = open(home / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("transformers serve did not start:\n" + (home / "serve.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"home": home, "cache": cache, "model": model_dir, "base_url": f"http://127.0.0.1:{port}/v1",
               "log": home / "serve.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _served_spec(served, name: str, teacher_extra: str = "") -> Path:
    """The smoke spec with its teacher on the server, as a new user writes it: no sampling
    settings at all (the stock ones), no API key (a local server takes none)."""
    text = (ROOT / "specs" / "smoke-small.yaml").read_text()
    text = text.replace("constitution: ../constitutions/remorseful.yaml",
                        f"constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}")
    teacher = ("  teacher:\n    backend: transformers\n    model: tiny:teacher\n    batch_size: 16\n"
               "    sampling: {temperature: 0.7, top_p: 0.95, max_tokens: 48, repetition_penalty: 1.1}\n")
    assert teacher in text
    text = text.replace(teacher, f"  teacher:\n    backend: openai\n    model: {served['model']}\n"
                                 f"    base_url: {served['base_url']}\n    api_key_env: null\n    concurrency: 2\n"
                                 f"{teacher_extra}")
    spec = served["home"] / f"{name}.yaml"
    spec.write_text(text.replace("name: smoke-small", f"name: {name}"))
    return spec


@pytest.mark.slow
def test_a_teacher_on_transformers_serve_builds_dpo_pairs_with_the_stock_settings(served, monkeypatch, capsys):
    monkeypatch.chdir(served["home"])
    spec = _served_spec(served, "served-teacher")
    assert run(str(spec), "dpo-pairs", "--cache", str(served["cache"])) == 0, capsys.readouterr().err
    pairs = (served["home"] / "outputs" / "served-teacher" / "dpo-pairs.jsonl").read_text().splitlines()
    assert pairs
    # The teacher's replies came from the server: it logged the chat completions it answered.
    assert served["log"].read_text().count("/v1/chat/completions") >= len(pairs)
    # Whether each sample's seed held: the local student seeds its own sampler; the server
    # was only sent one (`transformers serve` seeds the process, not the request).
    from support.api_build import built_manifest

    teacher = built_manifest(served["cache"], "teacher-responses/shard-0000")["result"]["seeds"]
    student = built_manifest(served["cache"], "student-responses/shard-0000")["result"]["seeds"]
    assert list(teacher) == ["sent, not verifiable"] and list(student) == ["honoured"]
    # The local server is not billed at the fallback API price.
    plan = plan_json(str(spec), "dpo-pairs", "--cache", str(served["cache"]), "--set", "data.dpo_pairs=12")
    assert plan["total"]["est_usd"] == 0 and not plan["total"]["est_price_unknown"]


@pytest.mark.slow
def test_a_field_the_server_refuses_names_the_spec_field_to_change(served, monkeypatch, capsys):
    monkeypatch.chdir(served["home"])
    spec = _served_spec(served, "refused", "    sampling: {repetition_penalty: 1.1}\n")
    assert run(str(spec), "teacher-responses/shard-0000", "--cache", str(served["cache"])) != 0
    err = capsys.readouterr().err
    assert "HTTP 422" in err and "models.teacher.sampling.repetition_penalty" in err


# -- what real providers do, on the loopback server ----------------------------------------------

def test_a_short_dummy_key_is_redacted_as_a_whole_not_letter_by_letter():
    with FakeOpenAIServer(require_key="sk-right") as srv:
        be = OpenAIBackend(OpenAIConfig(model="m", base_url=srv.base_url, api_key_env="K", max_retries=0), env={"K": "e"})
        try:
            with pytest.raises(BackendError) as err:
                be.generate([GenRequest(messages=[{"role": "user", "content": "hi"}])])
        finally:
            be.close()
    msg = str(err.value)
    assert "Incorrect API key provided: ***" in msg  # the key the server echoed is hidden
    assert "Incorrect" in msg and "provided" in msg  # and the rest of the message is not


def _served_teacher(spec: Path, old_url: str, new_url: str, revision: str | None = None) -> None:
    text = spec.read_text().replace(old_url, new_url)
    if revision:
        text = text.replace("model: teacher-model,", f"model: teacher-model, revision: {revision},")
        text = text.replace("model: student-model,", f"model: student-model, revision: {revision},")
    spec.write_text(text)


def test_one_model_name_on_two_endpoints_is_asked_on_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    cache = str(tmp_path / "cache")
    with FakeOpenAIServer(reply=persona_reply) as a, FakeOpenAIServer(reply=persona_reply) as b:
        spec = write_spec(tmp_path, a.base_url, dpo_pairs=10)
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        assert a.stats()["completed"] == 10
        _served_teacher(spec, a.base_url, b.base_url)
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        # The same model name on another provider may be other weights: asked again there.
        assert b.stats()["completed"] == 10


def test_endpoints_given_one_revision_share_their_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    cache = str(tmp_path / "cache")
    with FakeOpenAIServer(reply=persona_reply) as a, FakeOpenAIServer(reply=persona_reply) as b:
        spec = write_spec(tmp_path, a.base_url, dpo_pairs=10)
        _served_teacher(spec, "unused", "unused", revision="sha-0123")
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        assert a.stats()["completed"] == 10
        _served_teacher(spec, a.base_url, b.base_url)
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        assert b.stats()["completed"] == 0  # the revision says it is the same weights: nothing asked again


def test_a_model_on_a_local_endpoint_costs_no_api_dollars_and_an_unpriced_one_is_shown_as_unknown(tmp_path, capsys):
    spec = write_spec(tmp_path, "http://127.0.0.1:9/v1", dpo_pairs=10)
    local = plan_json(str(spec), "dpo-pairs", "--cache", str(tmp_path / "c"))
    assert local["total"]["est_usd"] == 0 and not local["total"]["est_price_unknown"]
    for url in ("http://10.0.0.7:8000/v1", "http://vllm:8000/v1", "http://localhost:8000/v1"):
        _served_teacher(spec, "http://127.0.0.1:9/v1", url)
        assert plan_json(str(spec), "dpo-pairs", "--cache", str(tmp_path / "c"))["total"]["est_usd"] == 0, url
        _served_teacher(spec, url, "http://127.0.0.1:9/v1")

    _served_teacher(spec, "http://127.0.0.1:9/v1", "https://api.example.com/v1")
    remote = plan_json(str(spec), "dpo-pairs", "--cache", str(tmp_path / "c"))
    assert remote["total"]["est_usd"] > 0 and remote["total"]["est_price_unknown"]
    from charbuild.cli import main

    capsys.readouterr()
    assert main(["plan", str(spec), "dpo-pairs", "--cache", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "? price unknown" in out
    # A price in the spec is a price, local or not.
    priced = plan_json(str(spec), "dpo-pairs", "--cache", str(tmp_path / "c"),
                       "--set", "prices.teacher-model={input: 1, output: 2}",
                       "--set", "prices.student-model={input: 1, output: 2}")
    assert priced["total"]["est_usd"] > 0 and not priced["total"]["est_price_unknown"]


def test_extra_body_reaches_the_server_and_is_part_of_the_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    cache = str(tmp_path / "cache")
    with FakeOpenAIServer(reply=persona_reply) as srv:
        spec = write_spec(tmp_path, srv.base_url, dpo_pairs=10)
        spec.write_text(spec.read_text().replace("model: teacher-model,", "model: teacher-model, extra_body: {top_k: 20},"))
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        assert srv.last_request["top_k"] == 20 and "repetition_penalty" not in srv.last_request
        asked = srv.stats()["completed"]
        spec.write_text(spec.read_text().replace("top_k: 20", "top_k: 40"))
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", cache) == 0
        assert srv.stats()["completed"] == asked + 10  # other settings, other calls
        assert srv.last_request["top_k"] == 40


@pytest.mark.parametrize("teacher, says", [
    ('{backend: openai, model: m, base_url: "http://127.0.0.1:9/v1", extra_body: {temperature: 0}}',
     "extra_body may not set temperature"),
    ("{backend: transformers, model: tiny:teacher, extra_body: {top_k: 20}}",
     "extra_body is sent to OpenAI-compatible servers only"),
])
def test_extra_body_that_would_override_charbuild_or_cannot_be_sent_is_refused(tmp_path, capsys, teacher, says):
    import re

    from charbuild.cli import main

    spec = write_spec(tmp_path, "http://127.0.0.1:9/v1")
    spec.write_text(re.sub(r"(?m)^  teacher: .*$", f"  teacher: {teacher}", spec.read_text()))
    assert main(["plan", str(spec)]) != 0
    err = capsys.readouterr().err
    assert says in err and "models.teacher.extra_body" in err


def test_the_manifest_says_a_servers_seeds_could_not_be_verified(tmp_path, monkeypatch):
    from support.api_build import built_manifest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CB_TEST_KEY", "k")
    with FakeOpenAIServer(reply=persona_reply) as srv:
        spec = write_spec(tmp_path, srv.base_url, dpo_pairs=10)
        assert run(str(spec), "teacher-responses/shard-0000", "--cache", str(tmp_path / "cache")) == 0
    m = built_manifest(tmp_path / "cache", "teacher-responses/shard-0000")
    assert m["result"]["seeds"] == {"sent, not verifiable": 10}
