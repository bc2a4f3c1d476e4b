"""One API over several models (`meadow api MODEL MODEL ...`), as Ollama serves all its models on one port: each model
has an app of its own (create_app), and a request goes to the app of the model its body names. The lists of models
(`GET /v1/models`, `/api/tags`, `/api/ps`) hold every app's; everything else (the pages, the swarm's and the points'
views, which show the whole swarm, stored responses, which the apps share) is the first app's."""

from __future__ import annotations

import json
from typing import Awaitable, Callable, MutableMapping

Scope = MutableMapping
Message = MutableMapping
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

LISTS = {"/v1/models": "data", "/api/tags": "models", "/api/ps": "models"}  # path -> the key of its list


class ModelRouter:
    """An ASGI app that hands each request to the app of the model it names (`apps`: model id -> app)."""

    def __init__(self, apps: dict[str, ASGIApp]):
        self.apps = apps
        self.first = next(iter(apps.values()))

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan: the apps have no startup or shutdown of their own
            return await self.first(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in LISTS:
            return await self._merged(scope, send, LISTS[path])
        if method == "GET" and path.startswith("/v1/models/"):
            return await self._app(path.removeprefix("/v1/models/"))(scope, receive, send)
        if method != "POST":
            return await self.first(scope, receive, send)
        chunks, more = [], True  # the whole body, as the app would read it anyway to parse it
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:  # the body read, then what comes after it (the client leaving)
            return replayed.pop() if replayed else await receive()

        await self._app(_model_named(body))(scope, replay, send)

    def _app(self, name: str | None) -> ASGIApp:
        """The app of model `name` (Ollama's clients may add the default tag); the first one's (which refuses a name
        it does not serve, naming those this API serves) for any other."""
        if name is not None and name.removesuffix(":latest") in self.apps:
            return self.apps[name.removesuffix(":latest")]
        return self.first

    async def _merged(self, scope: Scope, send, key: str) -> None:
        """The apps' answers to a list of models, as one: the first's (its status and headers), with all their items."""
        answers = [await _answer(app, dict(scope)) for app in self.apps.values()]  # (an app adds its own keys)
        start, body = answers[0]
        if start["status"] == 200:
            merged = json.loads(body)
            merged[key] = [item for _, other in answers for item in json.loads(other)[key]]
            body = json.dumps(merged).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def _model_named(body: bytes) -> str | None:
    """The model a request's JSON body names (`model`, or Ollama's older `name`); None if it names none."""
    try:
        request = json.loads(body)
    except ValueError:
        return None
    name = request.get("model") or request.get("name") if isinstance(request, dict) else None
    return name if isinstance(name, str) else None


async def _answer(app: ASGIApp, scope: Scope) -> tuple[Message, bytes]:
    """`app`'s answer to a GET request (`scope`): its start message and whole body."""
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        messages.append(message)

    await app(scope, receive, send)
    return messages[0], b"".join(message.get("body", b"") for message in messages[1:])
