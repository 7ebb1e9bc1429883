"""The vllm backend runs where vllm imports (GPU machines, `charbuild[vllm]`) and is
skipped cleanly elsewhere; without vllm it fails with an install hint, not an ImportError."""

import importlib.util

import pytest

from charbuild.backends.base import BackendError, GenRequest

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_without_vllm_the_backend_says_how_to_install_it():
    from charbuild.backends.vllm_backend import VllmBackend

    with pytest.raises(BackendError, match=r"charbuild\[vllm\]"):
        VllmBackend("any-model")


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (GPU machines: pip install 'charbuild[vllm]')")
def test_vllm_answers_each_request_in_order_and_honours_stops():
    import os

    model = os.environ.get("CHARBUILD_VLLM_MODEL")
    if not model:
        pytest.skip("set CHARBUILD_VLLM_MODEL to a local model directory")
    from charbuild.backends.vllm_backend import VllmBackend

    b = VllmBackend(model, gpu_memory_utilization=0.5)
    reqs = [GenRequest([{"role": "user", "content": f"Count from {i} to {i + 5}."}], max_tokens=32, seed=i,
                       stop=("\nUser:",)) for i in range(3)]
    res = b.generate(reqs)
    assert len(res) == 3 and all(r.completion_tokens > 0 for r in res)
    assert all("\nUser:" not in r.text for r in res)
