"""``wattmesh api token``: bearer tokens for the coordinator's HTTP API ([api] tokens_file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from broker.topics import check_id

if TYPE_CHECKING:
    from coordinator.api import ApiToken

api_app = typer.Typer(help="The coordinator's HTTP API.", no_args_is_help=True)
token_app = typer.Typer(
    help="Bearer tokens (stored only as their SHA-256, with a role).", no_args_is_help=True
)
api_app.add_typer(token_app, name="token")

TokensFile = Annotated[
    Path, typer.Argument(metavar="TOKENS.toml", help="The \\[api] tokens_file of the coordinator.")
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _load(path: Path) -> dict[str, ApiToken]:
    from coordinator.api import TokenError, load_tokens  # noqa: PLC0415 - keeps --help fast

    if not path.exists():
        return {}
    try:
        return load_tokens(path)
    except TokenError as err:
        raise _fail(str(err)) from err


@token_app.command("add")
def add(
    tokens_file: TokensFile,
    name: Annotated[str, typer.Option("--name", help="Who or what holds the token.")],
    role: Annotated[
        str, typer.Option("--role", help="viewer (reads all), site (its own site), operator.")
    ],
    site: Annotated[str | None, typer.Option("--site", help="The site of a site token.")] = None,
) -> None:
    """Make a token and print it once; only its SHA-256 is written to TOKENS.toml (mode 600).

    The coordinator reads the file at start: restart it to take a new token into use.
    """
    if role not in ("viewer", "site", "operator"):
        raise _fail("--role must be viewer, site or operator")
    if (role == "site") != (site is not None):
        raise _fail("a site token needs --site; other roles take none")
    if site is not None:
        try:
            check_id(site)
        except ValueError as err:
            raise _fail(str(err)) from err
    from coordinator.api import (  # noqa: PLC0415 - keeps --help fast
        ApiToken,
        hash_token,
        new_token,
        write_tokens,
    )

    tokens = _load(tokens_file)
    if any(t.name == name for t in tokens.values()):
        raise _fail(f"a token named {name!r} exists (revoke it first)")
    token = new_token()
    entry = ApiToken(name, role, hash_token(token), site)  # type: ignore[arg-type]
    tokens[entry.sha256] = entry
    write_tokens(tokens_file, tokens)
    typer.echo(token)


@token_app.command("list")
def list_tokens(tokens_file: TokensFile) -> None:
    """List the tokens' names, roles and sites (never the tokens)."""
    for t in sorted(_load(tokens_file).values(), key=lambda t: t.name):
        typer.echo(f"{t.name}\t{t.role}\t{t.site or '-'}")


@token_app.command("revoke")
def revoke(
    tokens_file: TokensFile,
    name: Annotated[str, typer.Option("--name", help="The token to revoke.")],
) -> None:
    """Remove a token (restart the coordinator to make it take effect)."""
    from coordinator.api import write_tokens  # noqa: PLC0415 - keeps --help fast

    tokens = _load(tokens_file)
    kept = {k: t for k, t in tokens.items() if t.name != name}
    if len(kept) == len(tokens):
        raise _fail(f"no token named {name!r}")
    write_tokens(tokens_file, kept)
    typer.echo(f"revoked {name}")


def mcp(
    api: Annotated[
        str, typer.Option("--api", help="The coordinator's API base URL (\\[api] host:port).")
    ] = "http://127.0.0.1:8080",
    transport: Annotated[
        str, typer.Option("--transport", help="stdio (one token from --token-env) or http.")
    ] = "stdio",
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the token (stdio).")
    ] = "WATTMESH_API_TOKEN",
    host: Annotated[str, typer.Option(help="Address to listen on (http).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (http).")] = 8765,
    scenario: Annotated[
        Path | None,
        typer.Option(help="Scenario the what-if tool simulates (default: the community's)."),
    ] = None,
) -> None:
    """Serve the coordinator's API as MCP tools for AI agents (reads, and dispatch for operators).

    Every tool is one call to the API with the caller's token, so its roles hold: over stdio the token comes from --token-env; over http (streamable HTTP on /mcp) each request brings its own bearer token and one the API does not accept gets 401.
    """  # noqa: E501 - one line per paragraph: the help wraps it to the terminal
    from wattmesh import mcp_server  # noqa: PLC0415 - keeps --help fast

    if transport == "stdio":
        token = mcp_server.token_from_env(token_env)
        if token is None:
            raise _fail(f"set {token_env} to an API token (wattmesh api token add)")
        mcp_server.run_stdio(api, token, scenario)
    elif transport == "http":
        mcp_server.run_http(api, host, port, scenario)
    else:
        raise _fail("--transport must be stdio or http")
