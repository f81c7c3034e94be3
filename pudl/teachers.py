"""Teachers: the black-box that gives one anchor answer per prompt.

Backends: `openai` (any OpenAI-compatible HTTP server, stdlib only), `llamacpp` (a local GGUF),
`jsonl` (anchors already on disk) and `tasks` (the task suite's reference answers).

`reply(prompt)` gives the answer with what it cost (a `Reply`: tokens from the server's `usage` field or the
local model's own tokenizer, HTTP requests sent, wall time): the run's ledger (`pudl.ledger`) sums them.
`openai` and `llamacpp` teachers also `complete(messages)` any chat (the judge, `pudl.judge`).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, runtime_checkable

from pudl.errors import TeacherError, UserError
from pudl.prompts import Prompt, chat_messages, jsonl_rows
from pudl.recipe import TeacherConfig

BACKENDS = ("openai", "llamacpp", "jsonl", "tasks")


@dataclass(frozen=True)
class Reply:
    """One answer and what getting it cost: tokens (0 where the backend counts none), requests sent, seconds."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 1
    seconds: float = 0.0


class TeacherFailure(TeacherError):
    """A prompt the teacher failed, with the requests it took (each counts in the ledger)."""

    def __init__(self, message: str, requests: int = 1, seconds: float = 0.0):
        super().__init__(message)
        self.requests = requests
        self.seconds = seconds


def with_system(messages: list[dict], system: str) -> list[dict]:
    """`messages` with the teacher's own system text first (merged with the prompt's system message, if any)."""
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def reply_of(teacher, prompt: Prompt) -> Reply:
    """`teacher.reply(prompt)`, or a Reply around `answer()` for a teacher that only has that (one call)."""
    if hasattr(teacher, "reply"):
        return teacher.reply(prompt)
    t0 = time.perf_counter()
    try:
        text = teacher.answer(prompt)
    except TeacherFailure:
        raise
    except TeacherError as e:
        raise TeacherFailure(str(e), 1, time.perf_counter() - t0) from None
    return Reply(text, seconds=time.perf_counter() - t0)


def ask_all(ask, items: list, workers: int):
    """Yield (item, Reply or TeacherFailure) as answers arrive, with at most `workers` calls of `ask` in flight.

    The caller commits each one in its own thread (SQLite connections stay in their thread). A UserError (e.g.
    a rejected key) stops the phase: queued items are cancelled, answers already committed stay."""
    def one(item):
        t0 = time.perf_counter()
        try:
            return ask(item)
        except TeacherFailure as e:
            return e
        except TeacherError as e:
            return TeacherFailure(str(e), 1, time.perf_counter() - t0)

    if workers == 1:
        for item in items:
            yield item, one(item)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="teacher")
    try:
        futures = {pool.submit(one, item): item for item in items}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@runtime_checkable
class Teacher(Protocol):
    """Gives one anchor per prompt: TeacherError for that prompt, UserError for bad configuration."""

    name: str

    def answer(self, prompt: Prompt) -> str:
        """The teacher's anchor answer for `prompt`."""
        ...


def make_teacher(cfg: TeacherConfig) -> Teacher:
    """The teacher of a recipe's [teacher] section; a missing or wrong setting is a UserError."""
    if cfg.backend == "openai":
        if not cfg.base_url:
            raise UserError("teacher 'openai' needs a base_url (e.g. http://127.0.0.1:8000/v1)")
        if not cfg.model:
            raise UserError("teacher 'openai' needs a model")
        return OpenAITeacher(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env or None,
                             max_tokens=cfg.max_tokens, temperature=cfg.temperature, timeout_s=cfg.timeout_s,
                             max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, system=cfg.system)
    if cfg.backend == "llamacpp":
        if not cfg.path:
            raise UserError("teacher 'llamacpp' needs a path to a .gguf model")
        return LlamaCppTeacher(cfg.path, max_tokens=cfg.max_tokens, temperature=cfg.temperature, system=cfg.system)
    if cfg.backend == "jsonl":
        if not cfg.path:
            raise UserError("teacher 'jsonl' needs a path to an anchors file")
        return JsonlTeacher(cfg.path)
    if cfg.backend == "tasks":
        return TasksTeacher()
    raise UserError(f"unknown teacher backend {cfg.backend!r} (choose from {', '.join(BACKENDS)})")


class _Retry(Exception):
    """A transient failure: worth another attempt after `delay_s` (None: the usual backoff)."""

    def __init__(self, reason: str, delay_s: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The teacher must only ever contact base_url: a redirect would send the prompt (and key) elsewhere.
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class OpenAITeacher:
    """`POST {base_url}/chat/completions` on any OpenAI-compatible server, with retries."""

    RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
    RETRY_AFTER_MAX_S = 300.0  # honour the server's Retry-After, but never stall a run for longer

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.0,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        system: str = "",
    ):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"teacher base_url must be an http(s) URL, got {base_url!r}")
        if max_retries < 0:
            raise UserError("teacher max_retries must be >= 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.system = system
        # The key lives only in memory; it is read now so a missing one fails before any work is done.
        self._key: str | None = None
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key.strip():
                raise UserError(f"teacher API key: environment variable {api_key_env} is not set")
            self._key = key.strip()
        self._api_key_env = api_key_env
        # No proxies from the environment and no redirects: only base_url is ever contacted.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def __repr__(self) -> str:
        return f"OpenAITeacher(url={self.url!r}, model={self.model!r})"

    def answer(self, prompt: Prompt) -> str:
        """The server's answer for `prompt`, retrying transient failures with backoff and jitter."""
        return self.reply(prompt).text

    def reply(self, prompt: Prompt) -> Reply:
        """The answer for `prompt` (the teacher's system text first) with its usage."""
        return self.complete(with_system(chat_messages(prompt), self.system))

    def complete(self, messages: list[dict]) -> Reply:
        """The server's reply to `messages`, retrying transient failures with backoff and jitter; every request
        sent counts (a failure raises TeacherFailure with the count)."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature}
        ).encode()
        attempts = self.max_retries + 1
        t0 = time.perf_counter()
        for attempt in range(attempts):
            try:
                content, usage = self._post(body)
            except _Retry as e:
                reason = e.reason
                if attempt + 1 == attempts:
                    break
                time.sleep(e.delay_s if e.delay_s is not None else self._backoff(attempt))
            except TeacherError as e:
                raise TeacherFailure(str(e), attempt + 1, time.perf_counter() - t0) from None
            else:
                return Reply(content, *usage, requests=attempt + 1, seconds=time.perf_counter() - t0)
        raise TeacherFailure(self._scrub(f"teacher {self.url}: {reason} (gave up after {attempts} attempts)"),
                             attempts, time.perf_counter() - t0)

    def _backoff(self, attempt: int) -> float:
        # Exponential with jitter, so many workers hitting one rate limit do not retry in lockstep.
        return min(self.backoff_max_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _scrub(self, text: str) -> str:
        # Servers may echo request headers in error bodies: the key must never reach a message or log.
        return text.replace(self._key, "[key]") if self._key else text

    def _post(self, body: bytes) -> tuple[str, tuple[int, int]]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            self._http_error(e)
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retry(f"{type(e).__name__} talking to the server") from None
        except urllib.error.URLError as e:
            raise _Retry(f"cannot connect ({self._scrub(str(e.reason))})") from None
        except OSError as e:
            raise _Retry(f"{type(e).__name__} talking to the server") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retry("malformed JSON reply") from None
        if not isinstance(content, str) or not content.strip():
            raise _Retry("empty answer")
        return content, _usage(data)

    def _http_error(self, e: urllib.error.HTTPError) -> NoReturn:
        try:
            detail = e.read(65536).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        # Scrub before cutting to length, so no prefix of the key can survive the cut.
        detail = " ".join(self._scrub(detail).split())[:200]
        reason = f"HTTP {e.code}" + (f": {detail}" if detail else "")
        if e.code in self.RETRY_STATUS:
            wait = _retry_after(e.headers.get("Retry-After"))
            raise _Retry(reason, None if wait is None else min(wait, self.RETRY_AFTER_MAX_S)) from None
        if e.code in (401, 403):
            # A rejected key fails every prompt alike: that is configuration, not this prompt's problem.
            source = f"the key from ${self._api_key_env}" if self._api_key_env else "the request (no api_key_env set)"
            raise UserError(f"teacher {self.url} rejected {source} ({reason})") from None
        if e.code == 404:
            raise UserError(f"teacher {self.url}: not found ({reason}); check base_url and model") from None
        raise TeacherError(f"teacher {self.url}: {reason}") from None


def _usage(data: dict) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) from an OpenAI-style reply's `usage` field; 0 for what it lacks."""
    usage = data.get("usage") if isinstance(data, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    count = lambda key: usage[key] if isinstance(usage.get(key), int) and usage[key] >= 0 else 0  # noqa: E731
    return count("prompt_tokens"), count("completion_tokens")


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LlamaCppTeacher:
    """A local GGUF model through llama-cpp-python, loaded on first use."""

    def __init__(self, path: str | Path, *, max_tokens: int = 256, temperature: float = 0.0, system: str = ""):
        self.path = Path(path)
        self.system = system
        if not self.path.is_file():
            raise UserError(f"{self.path}: teacher model file not found")
        self.name = f"llamacpp:{self.path.name}"
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._llm = None
        self._lock = threading.Lock()  # a Llama context is not safe to use from two threads at once

    def _model(self):
        if self._llm is None:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                raise UserError("teacher 'llamacpp' needs llama-cpp-python: pip install llama-cpp-python") from None
            from pudl.llamacpp import open_llama  # quiet, and without the AMX repacking that segfaults on some VMs

            try:
                self._llm = open_llama(self.path, n_ctx=2048, n_threads=2)
            except (ValueError, RuntimeError) as e:
                raise UserError(f"{self.path}: cannot load the teacher model ({e})") from None
        return self._llm

    def answer(self, prompt: Prompt) -> str:
        """The local model's completion for `prompt`."""
        return self.reply(prompt).text

    def reply(self, prompt: Prompt) -> Reply:
        """The completion for `prompt` (the teacher's system text first), tokens counted by the model itself."""
        return self.complete(with_system(chat_messages(prompt), self.system), what=f"prompt {prompt.id!r}")

    def complete(self, messages: list[dict], what: str = "a chat") -> Reply:
        """The local model's reply to `messages`; llama.cpp's own token counts as the usage."""
        t0 = time.perf_counter()
        with self._lock:
            llm = self._model()
            try:
                out = llm.create_chat_completion(messages=messages, temperature=self.temperature,
                                                 max_tokens=self.max_tokens)
            except (ValueError, RuntimeError) as e:  # e.g. the prompt does not fit the context window
                raise TeacherFailure(f"{self.name}: {e}", 1, time.perf_counter() - t0) from None
        content = out["choices"][0]["message"].get("content") or ""
        if not content.strip():
            raise TeacherFailure(f"{self.name}: empty answer for {what}", 1, time.perf_counter() - t0)
        return Reply(content, *_usage(out), seconds=time.perf_counter() - t0)


class JsonlTeacher:
    """Anchors already on disk: JSONL rows `{"id" and/or "prompt", "anchor"}`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = f"jsonl:{self.path.name}"
        self._by_id: dict[str, str] = {}
        self._by_text: dict[str, tuple[str, int]] = {}
        self._ambiguous: dict[str, list[int]] = {}
        self._load()

    def _load(self) -> None:
        id_line: dict[str, int] = {}
        for where, lineno, row in jsonl_rows(self.path, {"id", "prompt", "anchor"}, "anchors file"):
            anchor = row.get("anchor")
            if not isinstance(anchor, str) or not anchor.strip():
                raise UserError(f"{where}: 'anchor' must be a non-empty string")
            pid, ptext = row.get("id"), row.get("prompt")
            if pid is None and ptext is None:
                raise UserError(f"{where}: a row needs an 'id' or a 'prompt'")
            for key, value in (("id", pid), ("prompt", ptext)):
                if value is not None and not isinstance(value, str):
                    raise UserError(f"{where}: '{key}' must be a string")
            if pid is not None:
                if pid in id_line:
                    raise UserError(f"{where}: duplicate id {pid!r} (first at line {id_line[pid]})")
                id_line[pid] = lineno
                self._by_id[pid] = anchor
            if ptext is not None:
                # The same prompt text with two different anchors is only an error if it is looked up by text.
                if ptext in self._by_text and self._by_text[ptext][0] != anchor:
                    self._ambiguous.setdefault(ptext, [self._by_text[ptext][1]]).append(lineno)
                else:
                    self._by_text.setdefault(ptext, (anchor, lineno))

    def answer(self, prompt: Prompt) -> str:
        """The stored anchor for `prompt`, by id first, then by prompt text."""
        if prompt.id in self._by_id:
            return self._by_id[prompt.id]
        if prompt.prompt in self._ambiguous:
            lines = ", ".join(map(str, self._ambiguous[prompt.prompt]))
            raise TeacherError(f"{self.path}: different anchors for prompt {prompt.id!r} (lines {lines})")
        if prompt.prompt in self._by_text:
            return self._by_text[prompt.prompt][0]
        raise TeacherError(f"no anchor for prompt {prompt.id!r} in {self.path}")


class TasksTeacher:
    """The built-in task suite's reference answer (`Prompt.answer`)."""

    name = "tasks"

    def answer(self, prompt: Prompt) -> str:
        """The prompt's reference answer."""
        if prompt.answer is None:
            raise TeacherError(f"no reference answer for prompt {prompt.id!r}")
        return prompt.answer
