"""OpenAI's request and error shapes: a request body checked into what the Engine needs, or an
ApiError that names the offending parameter.

Hand-written rather than a pydantic model of the whole OpenAI API: the server implements a
subset, and every parameter outside it must be refused by name (never silently ignored), which
a permissive schema would not do. Messages follow OpenAI's API reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class ApiError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Parameters a request may carry, and the value each unimplemented one may have (its default):
# any other value is refused by name. Unknown parameters are refused too, as OpenAI does.
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user",
          "top_k", "ignore_eos"}
UNIMPLEMENTED = {"n": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
                 "logprobs": (False, 0), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
                 "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
                 "parallel_tool_calls": (), "audio": (), "modalities": (["text"],), "prediction": (),
                 "reasoning_effort": (), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
                 "web_search_options": (), "best_of": (1,), "echo": (False,), "suffix": ("",),
                 "min_tokens": (0,), "repetition_penalty": (1, 1.0)}
CHAT_ONLY = {"messages", "max_completion_tokens"}
COMPLETION_ONLY = {"prompt"}
MAX_STOP = 4  # as OpenAI


@dataclass
class GenRequest:
    """One checked request: what to run and how."""

    model: str
    prompt: object  # chat messages, a string, or token ids
    chat: bool
    max_tokens: int | None
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_keys(body: dict, allowed: set) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in UNIMPLEMENTED:
            if value is None or any(value == d and type(value) is type(d) for d in UNIMPLEMENTED[key]):
                continue
            raise bad(f"'{key}' is not supported by this server (only its default is accepted)", key,
                      "unsupported_parameter")
        raise bad(f"Unrecognized request argument supplied: {key}", key, "unrecognized_parameter")


def _optional(body: dict, key: str, check, what: str, kind=None):
    """body[key] or None; a value of the wrong JSON type (`kind`: a type test) is invalid_type,
    one of the right type but out of range invalid_value."""
    value = body.get(key)
    if value is None:
        return None
    if not check(value):
        wrong_type = kind is not None and not kind(value)
        raise bad(f"'{key}' must be {what}, got {_show(value)}", key, "invalid_type" if wrong_type else "invalid_value")
    return value


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        raise bad(f"messages[{i}].content is missing", f"messages[{i}].content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are "
                          f"supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"messages[{i}].role {_show(role)} is not supported (system, developer, user, assistant)",
                      f"messages[{i}].role")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            key = sorted(extra)[0]
            raise bad(f"messages[{i}].{key} is not supported", f"messages[{i}].{key}", "unsupported_parameter")
        # Chat templates know system, user and assistant; OpenAI's developer role is the system one.
        out.append({"role": "system" if role == "developer" else role, "content": _content(m, i)})
    return out


def _prompt(value):
    """A completions prompt: a string, token ids, or a list holding exactly one of those."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise bad("'prompt' is empty", "prompt")
        return value
    if isinstance(value, list) and value and all(_is_int(t) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise bad("'prompt' holds several prompts; this server takes one prompt per request", "prompt",
                  "unsupported_parameter")
    raise bad("'prompt' must be a non-empty string or a list of token ids", "prompt")


def parse(body, chat: bool) -> GenRequest:
    """Check a /v1/chat/completions (chat=True) or /v1/completions body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_keys(body, COMMON | (CHAT_ONLY if chat else COMPLETION_ONLY))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the base's name or an adapter's (GET /v1/models lists them)", "model")
    if chat:
        if "messages" not in body:
            raise bad("'messages' is required", "messages")
        prompt = _messages(body["messages"])
    else:
        if "prompt" not in body:
            raise bad("'prompt' is required", "prompt")
        prompt = _prompt(body["prompt"])
    positive = "an integer of at least 1"
    max_tokens = _optional(body, "max_tokens", lambda v: _is_int(v) and v >= 1, positive, _is_int)
    if chat:
        newer = _optional(body, "max_completion_tokens", lambda v: _is_int(v) and v >= 1, positive, _is_int)
        max_tokens = newer if newer is not None else max_tokens
    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2",
                            _is_real)
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", _is_real)
    top_k = _optional(body, "top_k", lambda v: _is_int(v) and v >= -1, "an integer >= -1 (-1 or 0: no limit)",
                      _is_int)
    seed = _optional(body, "seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0", _is_int)
    stream = _optional(body, "stream", _is_bool, "a boolean", _is_bool)
    ignore_eos = _optional(body, "ignore_eos", _is_bool, "a boolean", _is_bool)
    stop = body.get("stop")
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise bad(f"'stop' has {len(stop)} strings; at most {MAX_STOP} are allowed", "stop")
        stops = stop
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("'stream_options' takes only include_usage", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("'stream_options.include_usage' must be a boolean", "stream_options.include_usage")
        if options.get("continuous_usage_stats"):
            raise bad("'stream_options.continuous_usage_stats' is not supported", "stream_options",
                      "unsupported_parameter")
    return GenRequest(model=model, prompt=prompt, chat=chat, max_tokens=max_tokens,
                      temperature=1.0 if temperature is None else float(temperature),
                      top_p=1.0 if top_p is None else float(top_p), top_k=max(0, top_k or 0), seed=seed,
                      stop=stops, stream=bool(stream), include_usage=include_usage, ignore_eos=bool(ignore_eos))
