"""How the `files` and `jobs` commands reach a tunequeue server: where the URL and the API key come from (a flag,
else the environment, else the config file) and an HTTP client that turns the server's errors into messages.

Pure HTTP: nothing here (or in the commands that use it) imports `api`, `shared` or `worker`, so these commands
work from any machine against a remote server."""

import logging
import os
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"  # what `make run` / `tunequeue dev` serve
URL_ENV = "TUNEQUEUE_URL"
KEY_ENV = "TUNEQUEUE_API_KEY"
CONFIG_ENV = "TUNEQUEUE_CONFIG"
CONFIG_KEYS = ("url", "api_key")
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
SLOW_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # uploads and dry runs: the server reads the whole file first


class ClientError(Exception):
    """A request that could not be made or that the server refused; the message says why (and what to do)."""


class ServerUnreachable(ClientError):
    pass


class ApiError(ClientError):
    """The server answered with an error; `message` is its own (OpenAI's `{"error": {"message": ...}}`)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        self.status, self.message, self.code = status, message, code
        super().__init__(f"{message} (HTTP {status}{f', {code}' if code else ''})")


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str
    key_source: str  # where the key came from, for the 401 message: the flag, the variable or the file


def config_path(environ: Mapping[str, str]) -> Path:
    explicit = environ.get(CONFIG_ENV)
    return Path(explicit).expanduser() if explicit else Path.home() / ".config" / "tunequeue" / "config.toml"


def read_config(environ: Mapping[str, str]) -> dict[str, str]:
    """The config file's `url` and `api_key`; no file at the default place is no settings, while a file named
    by TUNEQUEUE_CONFIG must exist."""
    path = config_path(environ)
    if not path.is_file():
        if environ.get(CONFIG_ENV):
            raise ClientError(f"{CONFIG_ENV} names {path}, which is not a file")
        return {}
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(f"the config file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(values) - set(CONFIG_KEYS))
    if unknown:
        raise ClientError(f"the config file {path} has unknown keys {unknown}; it takes {list(CONFIG_KEYS)}")
    for key, value in values.items():
        if not isinstance(value, str):
            raise ClientError(f'the config file {path}: {key} must be a string, e.g. {key} = "..."')
    return values


def resolve_connection(url: str | None, api_key: str | None, environ: Mapping[str, str] = os.environ) -> Connection:
    """Each of the two from its flag, else its environment variable, else the config file (read only when a
    value is still missing, so that explicit values never trip over a broken file); the URL defaults to the
    local server."""
    url = url or environ.get(URL_ENV) or None
    key_source = "--api-key" if api_key else KEY_ENV
    api_key = api_key or environ.get(KEY_ENV) or None
    if url is None or api_key is None:
        config = read_config(environ)
        url = url or config.get("url") or DEFAULT_URL
        if api_key is None and config.get("api_key"):
            api_key, key_source = config["api_key"], str(config_path(environ))
    api_key = (api_key or "").strip()  # a key pasted with its line break
    if not api_key:
        raise ClientError(
            f'no API key: pass --api-key, set {KEY_ENV}, or put api_key = "tq-..." in {config_path(environ)} '
            "(an admin makes keys with `tunequeue keys create --tenant NAME`)"
        )
    return Connection(normalized_url(url), api_key, key_source)


def normalized_url(url: str) -> str:
    """The server's root; a trailing /v1 (the openai SDK's base_url) is accepted too."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"the server URL {url!r} is not an http:// or https:// URL")
    return url.removesuffix("/v1")


def error_message(response: httpx.Response) -> ApiError:
    """The server's own message when it sent one in OpenAI's shape, else the start of whatever it sent."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        return ApiError(response.status_code, str(body["error"]["message"]), body["error"].get("code"))
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return ApiError(response.status_code, body["detail"])
    text = " ".join(response.text.split())[:200]
    return ApiError(response.status_code, f"{response.reason_phrase} from {response.request.url}: {text or '(empty)'}")


class Client:
    """One connection's requests. Every method returns the decoded JSON or raises ClientError."""

    def __init__(self, connection: Connection):
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would drown the output
        self.connection = connection
        self.http = httpx.Client(
            base_url=connection.url,
            headers={"Authorization": f"Bearer {connection.api_key}"},
            timeout=TIMEOUT,
        )

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.http.close()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        with self.transport():
            response = self.http.request(method, path, **kwargs)
        self.check(response)
        return response.json()

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        with self.transport(), self.http.stream(method, path, **kwargs) as response:
            if response.is_error:
                response.read()
                self.check(response)
            yield response

    def check(self, response: httpx.Response) -> None:
        if not response.is_error:
            return
        problem = error_message(response)
        if response.status_code == 401:
            problem = ApiError(401, f"{problem.message}; the key came from {self.connection.key_source}", problem.code)
        raise problem

    @contextmanager
    def transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(
                f"the server at {self.connection.url} did not answer in time ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach a tunequeue server at {self.connection.url} ({exc or type(exc).__name__}); start one "
                f"(`make run`) or point --url / {URL_ENV} at it"
            ) from None
