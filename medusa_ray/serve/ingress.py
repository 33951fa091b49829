"""The OpenAI ingress that records prompts (``serve.capture``); loaded by name in the ingress replicas."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest

from medusa_ray.serve.capture import Recorder


class CapturingIngress(OpenAiIngress):
    """Serve LLM's OpenAI ingress, recording each sampled chat request before answering it."""

    def __init__(self, *args: Any, capture: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._recorder = Recorder(capture["directory"], capture["rate"], capture["max_bytes"])

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self._recorder.record(body.messages)
        return await super().chat(body, request)
