"""The language model behind the advisor: one small interface, one implementation per kind of server.

``ChatModel.complete(system, user)`` returns the model's text or raises ``LlmUnavailable`` (a
timeout, a refused connection, an error status): the advisor then falls back to the detector's
own message. ``OpenAIChat`` speaks the OpenAI chat-completions API through the ``openai``
package, so it works with OpenAI itself and with any compatible server (vLLM, Ollama,
llama.cpp's server, LM Studio...): ``CHOLINE_LLM_BASE_URL``, ``CHOLINE_LLM_MODEL``,
``CHOLINE_LLM_API_KEY``.

JSON mode: with ``json_mode="auto"`` the first request asks for ``response_format={"type":
"json_object"}``; a server that refuses that parameter (a 400 or 422 naming it) is asked again
without it, and remembered as one that does not support it. The answer is parsed leniently
either way (``choline_core.advice.parse_answer``).

The API key is a ``SecretStr``: it is registered for log redaction by the settings, passed to
the client only, and never appears in an error message this module raises.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from pydantic import SecretStr

from choline_core.logs import redact

log = logging.getLogger(__name__)


class LlmUnavailable(Exception):
    """The model did not answer usefully (timeout, connection, error status, empty answer)."""


@dataclass
class Completion:
    text: str
    model: str
    seconds: float
    json_mode: bool


class ChatModel(ABC):
    """A chat model the advisor can ask. Implementations must not log or raise the API key."""

    name: str = "model"

    @abstractmethod
    async def complete(self, system: str, user: str, *, max_tokens: int = 1500) -> Completion:
        """The model's answer to ``user`` under ``system``; ``LlmUnavailable`` when there is none."""

    async def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release connections."""


class OpenAIChat(ChatModel):
    """Any OpenAI-compatible chat-completions server."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: SecretStr | None = None,
        timeout: float = 60.0,
        json_mode: str = "auto",
    ) -> None:
        from openai import AsyncOpenAI

        self.name = model
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.json_mode = json_mode  # auto | on | off
        self._json_ok: bool | None = None if json_mode == "auto" else json_mode == "on"
        key = api_key.get_secret_value() if api_key is not None else ""
        self._client = AsyncOpenAI(
            api_key=key or "not-needed",  # local servers take any key; the client insists on one
            base_url=base_url or None,
            timeout=timeout,
            max_retries=0,  # the advisor has its own budget: one try, then the detector's message
        )
        for noisy in ("openai", "openai._base_client", "httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(max(logging.getLogger(noisy).level, logging.WARNING))

    async def complete(self, system: str, user: str, *, max_tokens: int = 1500) -> Completion:
        import openai

        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        use_json = self._json_ok is not False
        t0 = time.monotonic()
        for _ in range(2):
            kwargs: dict[str, object] = {
                "model": self.model,
                "messages": messages,
                "temperature": 0.2,
                "max_tokens": max_tokens,
            }
            if use_json:
                kwargs["response_format"] = {"type": "json_object"}
            try:
                resp = await self._client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if use_json and self.json_mode == "auto" and _about_json_mode(exc):
                    log.info("the model server %s refuses JSON mode; asking without it", self.base_url or "(openai)")
                    self._json_ok, use_json = False, False
                    continue
                raise LlmUnavailable(f"the model server refused the request: {_short(exc)}") from None
            except openai.APITimeoutError:
                raise LlmUnavailable(f"no answer from the model within {self.timeout:g}s") from None
            except openai.APIConnectionError as exc:
                raise LlmUnavailable(f"cannot reach the model server: {_short(exc)}") from None
            except openai.APIStatusError as exc:
                raise LlmUnavailable(f"the model server answered {exc.status_code}: {_short(exc)}") from None
            except openai.OpenAIError as exc:
                raise LlmUnavailable(f"the model call failed: {_short(exc)}") from None
            if use_json and self.json_mode == "auto":
                self._json_ok = True
            choices = getattr(resp, "choices", None) or []
            content = choices[0].message.content if choices and choices[0].message else None
            if not content or not content.strip():
                raise LlmUnavailable("the model gave an empty answer")
            return Completion(
                text=content,
                model=getattr(resp, "model", None) or self.model,
                seconds=time.monotonic() - t0,
                json_mode=use_json,
            )
        raise LlmUnavailable("the model server refused the request")

    async def close(self) -> None:
        await self._client.close()


def _about_json_mode(exc: Exception) -> bool:
    text = str(exc).lower()
    return "response_format" in text or "json" in text


def _short(exc: Exception) -> str:
    """An error's text for a user: one line, at most 200 characters, secrets redacted."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text)[:200]
