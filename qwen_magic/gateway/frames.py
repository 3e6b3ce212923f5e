"""How an answer becomes frames: the native and OpenAI-compatible encoders."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .replies import (
    tools_input_tokens,
    canned_tool_calls,
    sample_of,
    _CODE_FOR_STATUS,
    Reply,
    _Failure,
    _failure,
    _final_usage,
    _new_request_id,
    _search_options,
    _split,
    default_answer,
    default_reasoning,
)


@dataclass(frozen=True)
class _Piece:
    reasoning: bool
    text: str
    # A tool call's fragment: (index, id, name) in its first fragment, (index, "", None) after.
    call: tuple[int, str, str | None] | None = None


@dataclass
class _Answer:
    """A reply resolved against one request: the frames and figures to send."""

    reply: Reply
    model: str
    request_id: str
    text: str
    reasoning: str
    pieces: list[_Piece]
    usage: dict[str, Any]
    sources: list[dict] | None = None  # what native frames carry as search_info, if any
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def compose(
        cls, reply: Reply | None, *, model: str, messages: list[dict], thinking: bool, json_mode: bool = False,
        parameters: Mapping[str, Any] | None = None, schema: Any = None,
    ) -> _Answer:
        if reply is None:
            reply = Reply(tool_calls=canned_tool_calls(parameters or {}, messages))
        search = _search_options(parameters or {}) if reply.search_results is not None else None
        canned = reply.text is None and reply.chunks is None
        if reply.chunks is not None:
            answer_pieces = list(reply.chunks)
        else:
            text = default_answer(model, messages, json_mode=json_mode) if reply.text is None else reply.text
            if reply.text is None and schema is not None and not reply.tool_calls:
                text = json.dumps(sample_of(schema), ensure_ascii=False)
            elif reply.text is None and reply.tool_calls:
                text = ""  # a turn of calls alone, as the service sends them
            answer_pieces = _split(text, reply.chunk_size)
        reasoning = reply.reasoning
        if not reasoning and thinking and canned:
            reasoning = default_reasoning(model, messages)
        pieces = [_Piece(True, part) for part in _split(reasoning, reply.chunk_size)]
        pieces += [_Piece(False, part) for part in answer_pieces]
        calls = _tool_call_pieces(reply)
        if calls:
            pieces = [piece for piece in pieces if piece.text or piece.reasoning] + calls
            reply = dataclasses.replace(reply, finish_reason="tool_calls") if reply.finish_reason == "stop" else reply
        if not pieces or pieces[-1].reasoning:
            # The finish_reason rides on an answer frame, even an empty one.
            pieces.append(_Piece(False, ""))
        text = "".join(answer_pieces)
        return cls(
            reply=reply,
            model=model,
            request_id=reply.request_id or _new_request_id(),
            text=text,
            reasoning=reasoning,
            pieces=pieces,
            usage=_final_usage(messages, text + "".join(p.text for p in calls), reasoning, reply, model=model,
                               thinking=thinking, search=search,
                               extra_input=tools_input_tokens(parameters or {}, messages)),
            sources=reply.search_results if search is not None and search.get("enable_source") is True else None,
        )

    @functools.cached_property
    def _chars_sent(self) -> tuple[list[int], list[int]]:
        """Characters (all, and of reasoning) sent after each frame, for running usage in O(1)."""
        total, reasoning = [0], [0]
        for piece in self.pieces:
            total.append(total[-1] + len(piece.text))
            reasoning.append(reasoning[-1] + (len(piece.text) if piece.reasoning else 0))
        return total, reasoning

    @property
    def whole_tool_calls(self) -> list[dict[str, Any]]:
        """The calls whole, as a non-streamed answer carries them."""
        calls: dict[int, dict[str, Any]] = {}
        for piece in self.pieces:
            if piece.call is not None:
                index, call_id, name = piece.call
                call = calls.setdefault(index, {"index": index, "id": call_id, "type": "function",
                                                "function": {"name": name, "arguments": ""}})
                call["function"]["arguments"] += piece.text
        return list(calls.values())

    def usage_after(self, sent: int) -> dict[str, Any]:
        """Running usage once ``sent`` frames are out: output grows with the text sent."""
        usage = copy.deepcopy(self.usage)
        if sent >= len(self.pieces):
            return usage
        chars, reasoning_chars_sent = self._chars_sent
        total_chars = chars[-1]
        sent_chars = chars[sent]
        final_output = int(self.usage["output_tokens"])
        output = round(final_output * sent_chars / total_chars) if total_chars else 0
        usage["output_tokens"] = output
        usage["total_tokens"] = int(self.usage["total_tokens"]) - (final_output - output)
        details = usage.get("output_tokens_details")
        if isinstance(details, dict) and "reasoning_tokens" in details and self.reasoning:
            reasoning_chars = reasoning_chars_sent[sent]
            details["reasoning_tokens"] = round(int(details["reasoning_tokens"]) * reasoning_chars / len(self.reasoning))
        return usage

    def failure(self, *, mid_stream: bool) -> _Failure:
        reply = self.reply
        status = reply.status if reply.status >= 400 else None
        code = reply.error_code or _CODE_FOR_STATUS.get(reply.status, "InternalError")
        message = reply.error_message
        if message is None and mid_stream and code == "DataInspectionFailed":
            message = "Output data may contain inappropriate content."
        failure = _failure(code, self.request_id, status=status, message=message)
        if reply.retry_after is not None:
            failure = _Failure(failure.status, failure.code, failure.message, failure.request_id, reply.retry_after)
        return failure


# --------------------------------------------------------------------------- wire encoders


def _compact(payload: Any, *, ascii_only: bool = False) -> str:
    return json.dumps(payload, ensure_ascii=ascii_only, separators=(",", ":"))


class _NativeEncoder:
    """DashScope native frames: ``id:``/``event:``/``:HTTP_STATUS``/``data:`` events."""

    def __init__(self, answer: _Answer, *, incremental: bool, multimodal: bool) -> None:
        self._answer = answer
        self._incremental = incremental
        self._multimodal = multimodal
        self._event_id = 0

    def _content(self, text: str) -> Any:
        if self._multimodal:
            return [{"text": text}] if text else []
        return text

    def _message(self, text: str, reasoning: str) -> dict[str, Any]:
        message: dict[str, Any] = {"content": self._content(text), "role": "assistant"}
        if self._answer.reasoning:
            message["reasoning_content"] = reasoning
        return message

    def _payload(self, message: dict[str, Any], finish_reason: str, usage: dict[str, Any], *,
                 first: bool = True) -> dict[str, Any]:
        output: dict[str, Any] = {"choices": [{"message": message, "finish_reason": finish_reason}]}
        sources = self._answer.sources
        if sources is not None:
            # The service sends the sources once, in the first frame; later frames, an empty list.
            output["search_info"] = {"search_results": sources if first else []}
        return {"output": output, "usage": usage, "request_id": self._answer.request_id}

    def _event(self, kind: str, status: int, payload: dict[str, Any]) -> bytes:
        return self._raw(kind, status, _compact(payload, ascii_only=self._answer.reply.ascii_json))

    def _raw(self, kind: str, status: int, data: str) -> bytes:
        self._event_id += 1
        return f"id:{self._event_id}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{data}\n\n".encode()

    def raw_frame(self, data: str) -> bytes:
        return self._raw("result", 200, data)

    def frame(self, index: int) -> bytes:
        answer = self._answer
        piece = answer.pieces[index]
        last = index == len(answer.pieces) - 1
        if piece.call is not None:
            message = {"content": self._content(""), "role": "assistant", "tool_calls": [_call_fragment(piece)]}
            finish_reason = answer.reply.finish_reason if last else "null"
            return self._event("result", 200, self._payload(message, finish_reason, answer.usage_after(index + 1),
                                                            first=index == 0))
        if self._incremental:
            text = "" if piece.reasoning else piece.text
            reasoning = piece.text if piece.reasoning else ""
        else:
            sent = answer.pieces[: index + 1]
            text = "".join(p.text for p in sent if not p.reasoning and p.call is None)
            reasoning = "".join(p.text for p in sent if p.reasoning)
        last = index == len(answer.pieces) - 1
        finish_reason = answer.reply.finish_reason if last else "null"
        payload = self._payload(self._message(text, reasoning), finish_reason, answer.usage_after(index + 1),
                                first=index == 0)
        return self._event("result", 200, payload)

    def closing(self) -> bytes:
        return b""

    def error_event(self, failure: _Failure) -> bytes:
        return self._event("error", failure.status, failure.native_body())

    def whole(self) -> dict[str, Any]:
        answer = self._answer
        message = self._message(answer.text, answer.reasoning)
        if answer.whole_tool_calls:
            message["tool_calls"] = answer.whole_tool_calls
        return self._payload(message, answer.reply.finish_reason, answer.usage_after(len(answer.pieces)))


def _compatible_usage(usage: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}
    renamed["output_tokens_details"] = "completion_tokens_details"
    return {renamed.get(key, key): value for key, value in usage.items()}


class _CompatibleEncoder:
    """OpenAI-compatible frames: ``data: {chunk}``, a usage chunk, ``data: [DONE]``."""

    def __init__(self, answer: _Answer, *, include_usage: bool) -> None:
        self._answer = answer
        self._include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        answer = self._answer
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{answer.request_id}",
            "object": "chat.completion.chunk",
            "created": answer.created,
            "model": answer.model,
            "choices": choices,
            "system_fingerprint": None,
        }
        if self._include_usage:
            payload["usage"] = None
        payload.update(extra)
        return self.raw_frame(_compact(payload, ascii_only=answer.reply.ascii_json))

    @staticmethod
    def raw_frame(data: str) -> bytes:
        return f"data: {data}\n\n".encode()

    def frame(self, index: int) -> bytes:
        piece = self._answer.pieces[index]
        if piece.call is not None:
            delta: dict[str, Any] = {"content": None, "tool_calls": [_call_fragment(piece)]}
        elif piece.reasoning:
            delta = {"content": None, "reasoning_content": piece.text}
        else:
            delta = {"content": piece.text}
        if index == 0:
            delta = {"role": "assistant", **delta}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    def closing(self) -> bytes:
        answer = self._answer
        finish = {"index": 0, "delta": {"content": ""}, "finish_reason": answer.reply.finish_reason, "logprobs": None}
        out = self._chunk([finish])
        if self._include_usage:
            out += self._chunk([], usage=_compatible_usage(answer.usage))
        return out + b"data: [DONE]\n\n"

    def error_event(self, failure: _Failure) -> bytes:
        return f"data: {_compact(failure.compatible_body())}\n\n".encode()

    def whole(self) -> dict[str, Any]:
        answer = self._answer
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.reasoning:
            message["reasoning_content"] = answer.reasoning
        if answer.whole_tool_calls:
            message["tool_calls"] = answer.whole_tool_calls
        return {
            "id": f"chatcmpl-{answer.request_id}",
            "object": "chat.completion",
            "created": answer.created,
            "model": answer.model,
            "choices": [{"index": 0, "message": message, "finish_reason": answer.reply.finish_reason, "logprobs": None}],
            "usage": _compatible_usage(answer.usage),
            "system_fingerprint": None,
        }


# --------------------------------------------------------------------------- tool calls


def _tool_call_pieces(reply: Reply) -> list[_Piece]:
    """A reply's tool calls as stream fragments: id and name first, then the arguments in pieces."""
    pieces = []
    for index, call in enumerate(reply.tool_calls or ()):
        arguments = call.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id") or f"call_{_new_request_id().replace('-', '')[:24]}"
        parts = _split(text, reply.chunk_size) or [""]
        pieces.append(_Piece(False, parts[0], (index, call_id, call["name"])))
        pieces += [_Piece(False, part, (index, "", None)) for part in parts[1:]]
    return pieces


def _call_fragment(piece: _Piece) -> dict[str, Any]:
    """One fragment as the service streams it: later fragments carry an empty id and no name."""
    assert piece.call is not None
    index, call_id, name = piece.call
    function: dict[str, Any] = {"arguments": piece.text}
    if name is not None:
        function = {"name": name, **function}
    return {"index": index, "id": call_id, "type": "function", "function": function}
