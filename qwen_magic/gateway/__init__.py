"""An offline DashScope gateway: the real wire protocol, scripted answers.

Tests, tutorials and demos point the real ``dashscope`` SDK at this loopback
server instead of Alibaba Cloud. It speaks DashScope's native protocol
(``/api/v1``) and the OpenAI-compatible mode (``/compatible-mode/v1``) over
real HTTP, so everything between the notebook and the socket runs for real:
the SDK's request building, SSE parsing, error mapping, retries and timeouts.

What the gateway answers is scripted with :class:`Reply`: text and how it is
cut into frames, reasoning, delays, usage figures, errors before or during
the stream, a cut connection or a stall. Without a script it gives a
deterministic answer that names the model and echoes the prompt.

Streams use ``Transfer-Encoding: chunked`` with hand-written framing, so a cut
connection is visible to the client as an incomplete body, exactly as a
dropped connection to the real service would be.
"""

from .replies import INVALID_API_KEY, MISSING_MODEL_PREFIX, RecordedRequest, Reply, default_answer
from .server import Gateway, serve

__all__ = ["Gateway", "RecordedRequest", "Reply", "serve", "INVALID_API_KEY", "MISSING_MODEL_PREFIX",
           "default_answer"]
