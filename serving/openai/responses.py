"""The answers of the HTTP API in OpenAI's shapes, with instructloop's extra fields: every choice
carries its `response_id` (the handle for feedback); every answer and chunk names `model` (the
version that produced its tokens) and carries `completion_id` and `model_version`; a stream
that a hot swap restarted on new weights says so with a chunk whose `restarted` is true.

Bodies are plain dicts serialised once with json.dumps: this is the hot path, and the openai
SDK reads them into its own models, extra fields included.
"""

from __future__ import annotations

from typing import Any

from instructloop.serving.completion_service import Run

CHAT = "chat.completion"
TEXT = "text_completion"
VERSION_HEADER = "x-instructloop-model-version"


def _usage(run: Run) -> dict[str, int]:
    prompt = len(run.p.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in run.cands)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(kind: str, run: Run, version: str) -> dict[str, Any]:
    """A whole answer: `kind` is CHAT (choices with a `message`) or TEXT (choices with `text`)."""
    choices = []
    for c in run.cands:
        text = "".join(c.text)
        choice: dict[str, Any] = {"index": c.index}
        if kind == CHAT:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = c.finish_reason or "abort"
        choice["response_id"] = c.response_id
        choices.append(choice)
    return {
        "id": run.completion_id,
        "object": kind,
        "created": int(run.created),
        "model": version,
        "choices": choices,
        "usage": _usage(run),
        "completion_id": run.completion_id,
        "model_version": version,
        "logged": run.p.log,
    }


class ChunkWriter:
    """The chunks of one streamed answer (`kind` CHAT or TEXT), in OpenAI's streaming shapes:
    every chunk carries one choice, or none (the restart and usage chunks)."""

    def __init__(self, kind: str, run: Run, include_usage: bool) -> None:
        self.kind = kind
        self.run = run
        self.include_usage = include_usage
        self._object = "chat.completion.chunk" if kind == CHAT else TEXT
        self._created = int(run.created)

    def _chunk(self, version: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.run.completion_id,
            "object": self._object,
            "created": self._created,
            "model": version,
            "choices": choices,
            "completion_id": self.run.completion_id,
            "model_version": version,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _choice(
        self, index: int, response_id: str, text: str, finish: str | None, role: bool = False
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.kind == CHAT:
            choice["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        choice["response_id"] = response_id
        return choice

    def opening(self, version: str) -> list[dict[str, Any]]:
        """A chat stream opens with the assistant's role for every choice (as OpenAI's and
        vLLM's do); a text stream has no opening."""
        if self.kind != CHAT:
            return []
        return [
            self._chunk(version, [self._choice(c.index, c.response_id, "", None, True)])
            for c in self.run.cands
        ]

    def restarted(self, version: str) -> dict[str, Any]:
        """A hot swap aborted the answer and the server started it again on `version`: the
        client drops every delta so far (response ids stay the same)."""
        chunk = self._chunk(version, [])
        chunk["restarted"] = True
        return chunk

    def text(self, version: str, texts: list[tuple[Any, str]]) -> list[dict[str, Any]]:
        """New text, one chunk per choice (as vLLM sends them: clients that read only a chunk's
        first choice still see every candidate's text)."""
        return [
            self._chunk(version, [self._choice(c.index, c.response_id, t, None)]) for c, t in texts
        ]

    def end(self, version: str, held: dict[int, str]) -> list[dict[str, Any]]:
        """After logging: each choice's last text and finish reason (one chunk per choice, as
        OpenAI sends them), then the usage chunk if the request asked for it."""
        out = []
        for c in self.run.cands:
            chunk = self._chunk(
                version,
                [
                    self._choice(
                        c.index, c.response_id, held.get(c.index, ""), c.finish_reason or "abort"
                    )
                ],
            )
            chunk["logged"] = self.run.p.log
            out.append(chunk)
        if self.include_usage:
            chunk = self._chunk(version, [])
            chunk["usage"] = _usage(self.run)
            chunk["logged"] = self.run.p.log
            out.append(chunk)
        return out
