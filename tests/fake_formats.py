"""The fake's renderings of Ollama's /v1/responses and /v1/messages answers, built from native chat objects.

Like Ollama, the fake generates a native /api/chat answer and converts it: each streamed chat object becomes zero
or more SSE events, and a non-stream answer becomes one JSON object. Each function names the Go source it follows.
A native `{"error": …}` object makes no event, as in Ollama (its converters decode it as an empty chat chunk), so
a failed generation ends the stream without its closing events.
"""

import json
import os
import time


def go_json(obj, sort_keys: bool = False) -> str:
    """Serialise like Go's encoding/json: compact, `<>&` and U+2028/9 escaped; struct key order kept, or sorted
    keys for a Go map (``sort_keys``)."""
    text = json.dumps(obj, separators=(",", ":"), sort_keys=sort_keys)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _event(kind: str, data: dict, sort_keys: bool = False) -> str:
    """One SSE event as Ollama writes it: `event:` line, `data:` line, blank line (middleware writeEvent/writeSSE)."""
    return f"event: {kind}\ndata: {go_json(data, sort_keys)}\n\n"


def _arguments(call: dict) -> str:
    return go_json(call["function"]["arguments"])


# -- /v1/responses: openai/responses.go (ResponsesStreamConverter, ToResponse), middleware/openai.go ---------------
def responses_usage(final: dict, cached) -> dict:
    """ResponsesUsage: Ollama writes cached_tokens 0 unless the server reports cached prompt tokens."""
    prompt, output = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "total_tokens": prompt + output,
        "input_tokens_details": {"cached_tokens": final.get("prompt_eval_cached_count", 0) if cached else 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def response_object(rid: str, model: str, status: str, output: list, usage, request: dict) -> dict:
    """The response object: a Go map in stream events (buildResponseObject, written with sorted keys), and a struct
    with these fields in this order in a non-stream answer (ResponsesResponse)."""
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "completed_at": None, "status": status,
        "incomplete_details": None, "model": model, "previous_response_id": None,
        "instructions": request.get("instructions") or None, "output": output, "error": None,
        "tools": [{k: t.get(k) for k in ("type", "name", "description", "strict", "parameters")}
                  for t in request.get("tools") or []],
        "tool_choice": "auto", "truncation": "disabled", "parallel_tool_calls": True,
        "text": {"format": {"type": "text"}}, "top_p": request.get("top_p", 1), "presence_penalty": 0,
        "frequency_penalty": 0, "top_logprobs": 0, "temperature": request.get("temperature", 1),
        "reasoning": _reasoning(request),
        "usage": usage, "max_output_tokens": request.get("max_output_tokens"), "max_tool_calls": None,
        "store": False, "background": False, "service_tier": "default", "metadata": {}, "safety_identifier": None,
        "prompt_cache_key": None,
    }  # fmt: skip


def _reasoning(request: dict):
    """The request's reasoning settings, echoed back; None when it sets neither."""
    reasoning = request.get("reasoning") if isinstance(request.get("reasoning"), dict) else {}
    effort, summary = reasoning.get("effort") or None, reasoning.get("summary") or None
    return {"effort": effort, "summary": summary} if effort or summary else None


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponsesEvents:
    """Turns native chat objects into Responses SSE events, one chat object at a time (ResponsesStreamConverter):
    created and in_progress first, reasoning, function calls or text as they come, and on the done object the
    closing events and response.completed with the usage."""

    def __init__(self, rid: str, item_id: str, model: str, request: dict, cached):
        self.rid, self.item_id, self.model, self.request, self.cached = rid, item_id, model, request, cached
        self.seq = self.index = 0
        self.first, self.tools = True, False
        self.text = self.thinking = None  # None until the message (or reasoning) item is open
        self.items = []  # finished output items, for the final response

    def __call__(self, obj: dict) -> bytes:
        message, out = obj.get("message") or {}, ""
        if self.first:
            self.first = False
            for kind in ("response.created", "response.in_progress"):
                out += self._event(kind, {"response": self._response("in_progress", [], None)})
        if message.get("thinking"):
            out += self._reasoning(message["thinking"])
        if message.get("tool_calls"):
            out += self._function_calls(message["tool_calls"])
        elif message.get("content") and not self.tools:
            out += self._text(message["content"])
        return (out + (self._complete(obj) if obj.get("done") else "")).encode()

    def _event(self, kind: str, data: dict) -> str:
        data.update(type=kind, sequence_number=self.seq)  # newEvent: a Go map, written with sorted keys
        self.seq += 1
        return _event(kind, data, sort_keys=True)

    def _response(self, status: str, output: list, usage) -> dict:
        return response_object(self.rid, self.model, status, output, usage, self.request)

    def _reasoning(self, piece: str) -> str:
        out = ""
        if self.thinking is None:
            self.thinking = ""
            item = {"id": "rs_1", "type": "reasoning", "summary": []}
            out += self._event("response.output_item.added", {"output_index": self.index, "item": item})
        self.thinking += piece
        delta = {"item_id": "rs_1", "output_index": self.index, "summary_index": 0, "delta": piece}
        return out + self._event("response.reasoning_summary_text.delta", delta)

    def _finish_reasoning(self) -> str:
        if self.thinking is None:
            return ""
        text, self.thinking, index = self.thinking, None, self.index
        item = {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
                "encrypted_content": text}  # fmt: skip
        self.items.append(item)
        self.index += 1
        done = {"item_id": "rs_1", "output_index": index, "summary_index": 0, "text": text}
        return self._event("response.reasoning_summary_text.done", done) + self._event(
            "response.output_item.done", {"output_index": index, "item": item}
        )

    def _function_calls(self, calls: list) -> str:
        out = self._finish_reasoning()
        for i, call in enumerate(calls):
            fid, index = f"fc_{i}", self.index + i
            head = {"id": fid, "type": "function_call", "call_id": call["id"], "name": call["function"]["name"]}
            item = {**head, "status": "completed", "arguments": _arguments(call)}
            self.items.append(item)
            where = {"item_id": fid, "output_index": index}
            out += self._event(
                "response.output_item.added",
                {"output_index": index, "item": {**head, "status": "in_progress", "arguments": ""}},
            )
            out += self._event("response.function_call_arguments.delta", {**where, "delta": _arguments(call)})
            out += self._event("response.function_call_arguments.done", {**where, "arguments": _arguments(call)})
            out += self._event("response.output_item.done", {"output_index": index, "item": item})  # fmt: skip
        self.index += len(calls)
        self.tools = True
        return out

    def _text(self, piece: str) -> str:
        out, where = self._finish_reasoning(), {"item_id": self.item_id, "output_index": self.index, "content_index": 0}
        if self.text is None:
            self.text = ""
            item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
            out += self._event("response.output_item.added", {"output_index": self.index, "item": item})
            out += self._event("response.content_part.added", {**where, "part": _output_text("")})
        self.text += piece
        return out + self._event("response.output_text.delta", {**where, "delta": piece, "logprobs": []})

    def _complete(self, obj: dict) -> str:
        out, output = self._finish_reasoning(), list(self.items)
        if self.text is not None and not self.tools:
            where = {"item_id": self.item_id, "output_index": self.index, "content_index": 0}
            item = {"id": self.item_id, "type": "message", "status": "completed", "role": "assistant",
                    "content": [_output_text(self.text)]}  # fmt: skip
            out += self._event("response.output_text.done", {**where, "text": self.text, "logprobs": []})
            out += self._event("response.content_part.done", {**where, "part": _output_text(self.text)})
            out += self._event("response.output_item.done", {"output_index": self.index, "item": item})
            output.append(item)
        response = self._response("completed", output, responses_usage(obj, self.cached))
        response["completed_at"] = int(time.time())
        return out + self._event("response.completed", {"response": response})


def responses_body(rid: str, item_id: str, model: str, final: dict, request: dict, cached) -> str:
    """A non-stream answer (ToResponse): a Go struct, so field order, written by json.Encoder with a newline."""
    message, output = final["message"], []
    if message.get("thinking"):
        output.append({"id": f"rs_{rid}", "type": "reasoning",
                       "summary": [{"type": "summary_text", "text": message["thinking"]}],
                       "encrypted_content": message["thinking"]})  # fmt: skip
    for i, call in enumerate(message.get("tool_calls") or []):
        output.append({"id": f"fc_{rid}_{i}", "type": "function_call", "status": "completed", "call_id": call["id"],
                       "name": call["function"]["name"], "arguments": _arguments(call)})  # fmt: skip
    if not message.get("tool_calls"):
        output.append({"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                       "content": [_output_text(message["content"])]})  # fmt: skip
    body = response_object(rid, model, "completed", output, responses_usage(final, cached), request)
    body["completed_at"] = int(time.time())
    if body["reasoning"]:  # *string fields with omitempty in the struct
        body["reasoning"] = {key: value for key, value in body["reasoning"].items() if value}
    return go_json(body) + "\n"


# -- /v1/messages: anthropic/anthropic.go (StreamConverter, ToMessagesResponse, NewError), middleware/anthropic.go ---
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}  # fmt: skip
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def anthropic_error(status: int, message: str) -> str:
    """Anthropic's error body (NewError): its type follows the status; request_id is a random `req_` id."""
    kind = ANTHROPIC_ERRORS.get(status, "api_error")
    error = {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_{os.urandom(12).hex()}"}
    return go_json(error)


def message_id() -> str:
    return f"msg_{os.urandom(12).hex()}"


def anthropic_usage(final: dict, cached) -> dict:
    """Usage: without cache reporting just the two counts; with it, input_tokens is the uncached part."""
    prompt, output = final.get("prompt_eval_count", 0), final.get("eval_count", 0)
    if not cached:
        return {"input_tokens": prompt, "output_tokens": output}
    read = min(final.get("prompt_eval_cached_count", 0), prompt)
    return {"input_tokens": prompt - read, "cache_creation_input_tokens": 0, "cache_read_input_tokens": read,
            "output_tokens": output}  # fmt: skip


def _stop_reason(final: dict, tool_calls) -> str:
    return "tool_use" if tool_calls else STOP_REASONS.get(final.get("done_reason"), "stop_sequence")


class MessagesEvents:
    """Turns native chat objects into Anthropic SSE events (StreamConverter.Process): message_start with the
    estimate of the input made from the request, one content block per kind, and on the done object
    message_delta with the real counts, then message_stop."""

    def __init__(self, mid: str, model: str, estimate: int, cached):
        self.mid, self.model, self.estimate, self.cached = mid, model, estimate, cached
        self.first, self.index, self.open, self.tools = True, 0, None, False

    def __call__(self, obj: dict) -> bytes:
        message, out = obj.get("message") or {}, ""
        if self.first:
            self.first = False
            out += self._start()
        if message.get("thinking"):
            out += self._delta("thinking", "thinking", message["thinking"])
        if message.get("content"):
            out += self._delta("text", "text", message["content"])
        for call in message.get("tool_calls") or []:
            out += self._tool_use(call)
        if obj.get("done"):
            out += self._close()
            stop = {"stop_reason": _stop_reason(obj, self.tools)}
            usage = anthropic_usage(obj, self.cached)
            out += _event("message_delta", {"type": "message_delta", "delta": stop, "usage": usage})
            out += _event("message_stop", {"type": "message_stop"})
        return out.encode()

    def _start(self) -> str:
        usage = {"input_tokens": self.estimate, "output_tokens": 0}
        if self.cached:
            usage = {"input_tokens": self.estimate, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                     "output_tokens": 0}  # fmt: skip
        start = {"id": self.mid, "type": "message", "role": "assistant", "model": self.model, "content": [],
                 "usage": usage}  # fmt: skip
        return _event("message_start", {"type": "message_start", "message": start})

    def _block(self, kind: str, body: dict) -> str:
        return _event(kind, {"type": kind, "index": self.index, **body})

    def _close(self) -> str:
        if self.open is None:
            return ""
        out = self._block("content_block_stop", {})
        self.index, self.open = self.index + 1, None
        return out

    def _delta(self, kind: str, field: str, value: str) -> str:
        out = ""
        if self.open != kind:
            out += self._close()
            self.open = kind
            out += self._block("content_block_start", {"content_block": {"type": kind, field: ""}})
        return out + self._block("content_block_delta", {"delta": {"type": f"{kind}_delta", field: value}})

    def _tool_use(self, call: dict) -> str:
        out, self.tools = self._close(), True
        start = {"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": {}}
        out += self._block("content_block_start", {"content_block": start})
        out += self._block(
            "content_block_delta", {"delta": {"type": "input_json_delta", "partial_json": _arguments(call)}}
        )
        out += self._block("content_block_stop", {})
        self.index += 1
        return out


def messages_body(mid: str, final: dict, cached) -> str:
    """A non-stream answer (ToMessagesResponse), written by json.Encoder with a newline."""
    message, content = final["message"], []
    if message.get("thinking"):
        content.append({"type": "thinking", "thinking": message["thinking"]})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        args = call["function"]["arguments"]
        content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"], "input": args})
    reason = _stop_reason(final, message.get("tool_calls"))
    body = {"id": mid, "type": "message", "role": "assistant", "model": final["model"], "content": content,
            "stop_reason": reason, "usage": anthropic_usage(final, cached)}  # fmt: skip
    return go_json(body) + "\n"


# -- requests: what the middlewares hand to the chat handler ------------------------------------------------------
def responses_messages(body: dict) -> list:
    """Chat messages of a Responses request (FromResponsesRequest): instructions, then the input text or items."""
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output") or "")})
        elif isinstance(item, dict):
            messages.append({"role": item.get("role") or "assistant", "content": item.get("content") or ""})
    return messages


def responses_tools(body: dict) -> list:
    """Function tools of a Responses request, in the native shape the chat handler takes."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    return [{"function": {"name": t.get("name", ""), "parameters": t.get("parameters")}} for t in tools]


ANTHROPIC_CHECKS = (  # AnthropicMessagesMiddleware's 400s, in its order
    (lambda body: body.get("model"), "model is required"),
    (lambda body: isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0,
     "max_tokens is required and must be positive"),
    (lambda body: body.get("messages"), "messages is required"),
)  # fmt: skip


def anthropic_messages(body: dict) -> list:
    """Chat messages of a Messages request (FromMessagesRequest): the system prompt, then each message; a user
    message of tool_result blocks becomes a tool message."""
    messages = [{"role": "system", "content": body["system"]}] if body.get("system") else []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        blocks = content if isinstance(content, list) else []
        is_result = any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)
        messages.append({"role": "tool" if is_result else message.get("role"), "content": content or ""})
    return messages


def anthropic_tools(body: dict) -> list:
    """Tools of a Messages request, in the native shape the chat handler takes."""
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    return [{"function": {"name": t.get("name", ""), "parameters": t.get("input_schema")}} for t in tools]
