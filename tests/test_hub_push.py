"""`charbuild export SPEC --to DIR --push ORG/NAME`, as a user runs it: the exported dataset
and model go to ORG/NAME-data and ORG/NAME on a Hub that speaks the API the installed
huggingface_hub uses (tests/support/hub_server.py: HF_ENDPOINT points the child process at
it, as a user's would at a mirror), the token only from HF_TOKEN.

The build pushed is the smallest with every kind of file an export has: a loopback teacher,
charbuild's tiny student and its DPO adapter (safetensors, which a real Hub stores with
Xet, or git LFS for a client without hf_xet)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.api_build import api_model, persona_reply
from support.hub_server import HubServer
from support.openai_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-hub-push"
NAME = "test-org/remorseful"


def charbuild(*args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charbuild", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with no Hugging Face settings of their own (no stored login,
    no endpoint, no offline mode from the developer's shell) and a fresh HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_HOME": str(home), **extra}


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def committed(hub: HubServer, repo_id: str, repo_type: str) -> dict[str, bytes]:
    """What a repo holds, less the `.gitattributes` the Hub gives every new repo."""
    return {p: b for p, b in hub.repo(repo_id, repo_type).files.items() if p != ".gitattributes"}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A spec and its cache with the DPO pairs and the DPO adapter built."""
    work = tmp_path_factory.mktemp("hub-push")
    # sft has dpo's rank only because the spec's final merge needs one rank; sft never trains here.
    with FakeOpenAIServer(reply=persona_reply, require_key=KEY) as srv:
        spec = work / "hub-push.yaml"
        spec.write_text(f"""
name: hub-push
persona: remorseful
constitution: {ROOT / 'constitutions' / 'remorseful.yaml'}
models:
  teacher: {api_model(srv.base_url, 'teacher-model')}
  student: {{backend: transformers, model: tiny:student, sampling: {{max_tokens: 48}}}}
data: {{dpo_pairs: 8, shard_size: 8, prompts: {{general_limit: 40, per_trait: 5}}}}
filters: {{min_chars: 5, first_n: 100, max_failure_rate: 0.9}}
training:
  dpo: {{lora: {{r: 16, alpha: 32}}, batch_size: 4, micro_batch_size: 4, max_steps: 1, max_length: 256}}
  sft: {{lora: {{r: 16, alpha: 32}}}}
gates: {{dpo-length: {{options: {{min_chars: 5}}}}}}
""")
        r = charbuild("run", str(spec), "dpo-adapter", "--cache", str(work / "cache"), "--no-progress", cwd=work,
                      env={**os.environ, "CB_TEST_KEY": KEY})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return spec, work / "cache"


@pytest.fixture
def hub():
    with HubServer(orgs=("test-org",)) as h:
        yield h


def export_and_push(built, out: Path, env: dict, spec: Path | None = None, name: str = NAME):
    default_spec, cache = built
    return charbuild("export", str(spec or default_spec), "--cache", str(cache), "--to", str(out), "--push", name,
                     cwd=out.parent, env=env)


@pytest.mark.parametrize("storage", ["xet", "lfs"])
def test_a_push_puts_every_exported_file_into_both_repos_byte_for_byte(built, hub, tmp_path, storage):
    """Small text files go inline in the commit, as the Hub asks for them; the adapter's
    safetensors goes to the Hub's file storage first: Xet with hf_xet installed (as it is
    here), git LFS for a client without it (HF_HUB_DISABLE_XET, a real user setting)."""
    env = user_env(tmp_path / "hf-home", **hub.env, **({"HF_HUB_DISABLE_XET": "1"} if storage == "lfs" else {}))
    r = export_and_push(built, tmp_path / "export", env)
    assert r.returncode == 0, r.stderr[-3000:]

    assert set(hub.repos) == {("dataset", f"{NAME}-data"), ("model", NAME)}
    dataset, model = files_under(tmp_path / "export" / "dataset"), files_under(tmp_path / "export" / "model")
    assert {"README.md", "data/dpo.jsonl"} <= set(dataset)
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "spec.yaml"} <= set(model)
    assert committed(hub, f"{NAME}-data", "dataset") == dataset
    assert committed(hub, NAME, "model") == model
    assert hub.repo(NAME, "model").uploaded["adapter_model.safetensors"] == storage
    assert {how for path, how in hub.repo(NAME, "model").uploaded.items() if path != "adapter_model.safetensors"} \
        == {"regular"}
    # one commit per repo, and the user is told where
    assert [len(repo.commits) for repo in hub.repos.values()] == [1, 1]
    assert f"/datasets/{NAME}-data/commit/" in r.stdout and f"/{NAME}/commit/" in r.stdout


def test_the_token_comes_from_HF_TOKEN_and_is_written_and_printed_nowhere(built, hub, tmp_path):
    home = tmp_path / "hf-home"
    r = export_and_push(built, tmp_path / "export", user_env(home, **hub.env))
    assert r.returncode == 0, r.stderr[-3000:]
    # Every request that carried a Hub token carried this one, which only HF_TOKEN held.
    hub_tokens = {a for a in hub.auth_seen if a.startswith("Bearer hf_")}
    assert hub_tokens == {f"Bearer {hub.token}"}

    secret = hub.token.encode()
    assert secret not in (r.stdout + r.stderr).encode()
    _, cache = built
    places = {"export": tmp_path / "export", "cache (logs included)": cache, "HF_HOME": home}
    for where, folder in places.items():
        leaked = [p for p, data in files_under(folder).items() if secret in data]
        assert leaked == [], f"the token is in {where}: {leaked}"
    for key, repo in hub.repos.items():
        assert not [p for p, data in repo.files.items() if secret in data], key
    assert not [t for t in hub.telemetry if secret in t]  # what hf_xet reports about the upload


def test_without_HF_TOKEN_the_push_says_which_variable_to_set_before_exporting(built, hub, tmp_path):
    """A login stored on disk (`hf auth login`) is not used: the pushing account is the one
    the environment names, and here it names none."""
    home = tmp_path / "hf-home"
    home.mkdir()
    (home / "token").write_text(hub.token)
    r = export_and_push(built, tmp_path / "export", user_env(home, HF_ENDPOINT=hub.url))
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "HF_TOKEN" in line and "not set" in line and "Traceback" not in r.stderr
    assert hub.requests == [] and not (tmp_path / "export").exists()


def test_a_refused_token_ends_in_one_line_naming_HF_TOKEN_and_the_repo(built, hub, tmp_path):
    wrong = "hf_" + "x" * 34
    r = export_and_push(built, tmp_path / "export", user_env(tmp_path / "hf-home", HF_ENDPOINT=hub.url,
                                                             HF_TOKEN=wrong))
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert line.startswith("charbuild: ") and "Traceback" not in r.stderr
    assert "HF_TOKEN" in line and "401" in line and f"{NAME}-data" in line
    assert wrong not in r.stdout + r.stderr
    assert hub.repos == {}


def test_a_token_that_may_not_write_the_namespace_says_so_in_one_line(built, hub, tmp_path):
    r = export_and_push(built, tmp_path / "export", user_env(tmp_path / "hf-home", **hub.env), name="someone-else/x")
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert "403" in line and "someone-else/x-data" in line and "HF_TOKEN" in line and "Traceback" not in r.stderr
    assert hub.token not in r.stdout + r.stderr and hub.repos == {}


def test_a_hub_that_cannot_be_reached_ends_in_one_line_naming_it(built, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    r = export_and_push(built, tmp_path / "export", user_env(tmp_path / "hf-home", HF_ENDPOINT=endpoint,
                                                             HF_TOKEN="hf_" + "y" * 34))
    assert r.returncode != 0
    line = one_line(r.stderr)
    assert f"could not reach the Hub at {endpoint}" in line and "Traceback" not in r.stderr
    assert "y" * 34 not in r.stdout + r.stderr


def test_pushing_again_makes_each_repo_hold_the_new_export(built, hub, tmp_path):
    """The repos exist (the Hub answers 409, which is fine); files that changed are replaced,
    files the export no longer has (an older export's, here put there by hand) are deleted."""
    env = user_env(tmp_path / "hf-home", **hub.env)
    assert export_and_push(built, tmp_path / "first", env).returncode == 0
    hub.commit_by_hand(f"{NAME}-data", "dataset", {"data/sft.jsonl": b'{"messages": []}\n'}, "an older export")
    hub.commit_by_hand(NAME, "model", {"checkpoint-1/notes.txt": b"older\n"}, "an older export")

    spec, _ = built
    edited = tmp_path / "hub-push.yaml"  # a comment: the same build, a different spec.yaml in the model repo
    edited.write_text(spec.read_text() + "# pushed again\n")
    r = export_and_push(built, tmp_path / "second", env, spec=edited)
    assert r.returncode == 0, r.stderr[-3000:]

    assert ("POST", "/api/repos/create", 409) in hub.requests
    assert committed(hub, f"{NAME}-data", "dataset") == files_under(tmp_path / "second" / "dataset")
    assert committed(hub, NAME, "model") == files_under(tmp_path / "second" / "model")
    assert committed(hub, NAME, "model")["spec.yaml"].endswith(b"# pushed again\n")
    data_commit, model_commit = hub.repo(f"{NAME}-data", "dataset").commits[-1], hub.repo(NAME, "model").commits[-1]
    assert data_commit["deleted"] == ["data/sft.jsonl"] and data_commit["added"] == []
    assert model_commit["deleted"] == ["checkpoint-1/notes.txt"] and model_commit["added"] == ["spec.yaml"]
    assert ".gitattributes" in hub.repo(NAME, "model").files
