"""The Batch File API's HTTP side: files and batches on the compatible-mode root, over httpx.

httpx is what dashscope 2.x already depends on (dashscope itself has no batch client): the
seven calls are plain JSON and multipart requests that need no second SDK. Every failure
becomes one ``BatchAPIError`` line, with the API key masked.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from IPython.core.error import UsageError

from ..client import NO_KEY_HELP, Connection, QwenAPIError, Secret, _resolved_config, _shortened, \
    dashscope_root_for, redact
from ..i18n import N_, _

if TYPE_CHECKING:  # pragma: no cover
    import httpx

ENDPOINT = "/v1/chat/completions"

# What to do about a failure to create a batch, by code or, failing that, by HTTP status
# (translated where the error line is written, as the client's advice is).
_ADVICE_ON_CREATE: dict[str | int, str] = {
    "model_not_found": N_("This model is not offered in the Batch API of this region: pick another with -m, "
                        "or run without --batch."),
    429: N_("DashScope's Batch API is at capacity: try again in a few minutes."),
}
_ADVICE_BY_CODE = {
    "mismatched_model": N_("One batch takes one model: run one job per model."),
    "duplicate_custom_id": N_("Every row of a batch job needs a key of its own."),
}


class BatchAPIError(QwenAPIError):
    """A failed Batch API call: one line, with advice that fits batches."""

    def __init__(self, code: str, message: str, *, advice: str | None = None, **details: Any) -> None:
        super().__init__(code, message, **details)
        better = advice or _ADVICE_BY_CODE.get(code)
        if better:
            self.advice = better
            self.args = (self.line(),)


class BatchClient:
    """The Files and Batches endpoints of one compatible-mode root, with one key."""

    def __init__(self, base_url: str, api_key: Secret | None, *, timeout: float | None = None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self._key = api_key
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        seconds = timeout or 60.0
        self._http = httpx.Client(base_url=self.base_url, headers=headers,
                                  timeout=httpx.Timeout(seconds, connect=min(seconds, 10.0)))

    def upload(self, content: bytes, filename: str) -> str:
        """Upload a JSONL file for a batch; return its file id."""
        answer = self._call("POST", "/files", files={"file": (filename, content, "application/jsonl")},
                            data={"purpose": "batch"})
        return str(answer["id"])

    def create(self, input_file_id: str, window: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        return self._call("POST", "/batches", advice=_ADVICE_ON_CREATE, json={
            "input_file_id": input_file_id, "endpoint": ENDPOINT, "completion_window": window,
            "metadata": dict(metadata)})

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/batches/{batch_id}")

    def list(self, *, after: str | None = None, limit: int = 20) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self._call("GET", "/batches", params=params)

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._call("POST", f"/batches/{batch_id}/cancel")

    def content(self, file_id: str) -> bytes:
        return self._call("GET", f"/files/{file_id}/content", raw=True)

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, raw: bool = False, advice: Mapping[str | int, str] | None = None,
              **arguments: Any) -> Any:
        """One request; any failure is a ``BatchAPIError`` line with the key masked."""
        import httpx

        where = _shortened(self.base_url, 60)
        try:
            response = self._http.request(method, path, **arguments)
        except httpx.TimeoutException:
            raise BatchAPIError("Timeout", _("no answer from {url} in time").format(url=where)) from None
        except httpx.HTTPError as error:
            reason = redact(str(error) or type(error).__name__, self._key)
            raise BatchAPIError("ConnectionError", _("cannot reach {url} ({reason})").format(url=where, reason=reason)) from None
        request_id = response.headers.get("x-request-id")
        if response.status_code >= 400:
            raise self._failure(response, request_id, advice or {}) from None
        if raw:
            return response.content
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BatchAPIError("NotDashScope", _("the server at {url} did not answer with DashScope's JSON (HTTP {status})")
                                .format(url=where, status=response.status_code), request_id=request_id) from None
        return answer

    def _failure(self, response: "httpx.Response", request_id: str | None,
                 advice: Mapping[str | int, str]) -> BatchAPIError:
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            said = response.text[:300].lower()
            if "<html" in said or "<!doctype" in said:
                return BatchAPIError("NotDashScope", _("the server at {url} answered with an HTML page (HTTP {status}), "
                                                       "not DashScope's API").format(url=_shortened(self.base_url, 60),
                                                                                     status=status), status=status)
            return BatchAPIError(f"HTTP{status}", redact(response.text or _("no message"), self._key),
                                 request_id=request_id, status=status, advice=advice.get(status))
        error = answer.get("error") if isinstance(answer.get("error"), dict) else answer
        code = str(error.get("code") or f"HTTP{status}")
        message = redact(str(error.get("message") or _("no message")), self._key)
        return BatchAPIError(code, message, request_id=answer.get("request_id") or request_id, status=status,
                             advice=advice.get(code) or advice.get(status))


_clients: dict[tuple[str, str | None, float | None], BatchClient] = {}
_clients_lock = threading.Lock()


def batch_client(connection: Connection) -> tuple[BatchClient, str]:
    """The Batch API client of this connection (reused), and its region (``cn-beijing``...).

    The root is the compatible mode's on the configured host (``…/compatible-mode/v1``), found
    as the chat's is; no key is a ``UsageError`` that says how to set one.
    """
    try:
        config = _resolved_config(dataclasses.replace(connection, protocol="openai"))
    except ValueError as error:
        raise UsageError(_("dashscope's configuration cannot be used: {error}").format(error=error)) from None
    if not config.api_key:
        raise UsageError(_(NO_KEY_HELP))
    root = dashscope_root_for(config.protocol_base_url, "openai")
    identity = (root, str(config.api_key), config.timeout)
    with _clients_lock:
        client = _clients.get(identity)
        if client is None:
            client = _clients[identity] = BatchClient(root, config.api_key, timeout=config.timeout)
    return client, region_of(root, config.region)


def region_of(base_url: str, configured: str | None) -> str:
    """The region a base URL serves: from DashScope's host names, else the configured region."""
    host = (urlsplit(base_url).hostname or "").lower()
    if host.startswith("dashscope-intl."):
        return "ap-southeast-1"
    if host == "dashscope.aliyuncs.com":
        return "cn-beijing"
    found = re.fullmatch(r"[^.]+\.([a-z0-9-]+)\.maas\.aliyuncs\.com", host)  # workspace hosts
    if found:
        return found.group(1)
    return configured or "cn-beijing"
