"""How the language server reaches its editor: stdio (the default) or one TCP connection, and when it ends.

- stdio: pygls' own loop; stdout is the JSON-RPC channel, so anything printed by mistake goes to stderr.
- TCP (`--tcp HOST:PORT`, loopback only: LSP has no authentication): one session per server. A second
  client connecting while the first is served gets a window/showMessage saying so, and is disconnected;
  the server ends with the first session (as it would on stdio), so an editor starts one per workspace.
- The parent: `initialize`'s processId is watched; when that process is gone the server stops its worker and
  exits (an editor killed with SIGKILL must not leave a server and a model behind).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
import threading

from pygls.io_ import run_async

from codefill.errors import CodefillError

logger = logging.getLogger(__name__)
PARENT_POLL_S = 1.0


class TransportError(CodefillError, ValueError):
    """A transport that cannot be used; the message names the value."""


def parse_tcp(spec: str) -> tuple[str, int]:
    """"PORT" or "HOST:PORT" -> (host, port); the host must be a loopback address (default 127.0.0.1)."""
    host, _, port = spec.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise TransportError(f"--tcp {spec!r}: the port must be a number") from None
    if not 0 <= port_n <= 65535:
        raise TransportError(f"--tcp {spec!r}: port {port_n} is out of range [0, 65535]")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise TransportError(f"--tcp {spec!r}: {host!r} is not an IP address or localhost") from None
        if not loopback:
            raise TransportError(f"--tcp {spec!r}: only loopback addresses are served (LSP has no authentication)")
    return host, port_n


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


async def watch_parent(pid: int, on_gone) -> None:
    while pid_alive(pid):
        await asyncio.sleep(PARENT_POLL_S)
    logger.warning("parent process %d is gone; exiting", pid)
    on_gone()


def _frame(payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def serve_tcp(server, host: str, port: int, on_listening=None) -> None:
    """Serve one LSP session on host:port; return when it ends (exit, or the client disconnects)."""
    busy = False
    done = asyncio.Event

    async def main() -> None:
        finished = done()
        stop_event = threading.Event()
        server._stop_event = stop_event

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal busy
            peer = writer.get_extra_info("peername")
            if busy:
                logger.warning("refused a second client %s: one session per server", peer)
                writer.write(_frame({"jsonrpc": "2.0", "method": "window/showMessage", "params": {
                    "type": 1, "message": "codefill: this server already serves another client "
                                          "(one session per server); start another `codefill serve`"}}))
                await writer.drain()
                writer.close()
                return
            busy = True
            logger.info("client %s connected", peer)
            server.protocol.set_writer(writer)
            try:
                await run_async(stop_event=stop_event, reader=reader, protocol=server.protocol, logger=logger,
                                error_handler=server.report_server_error)
            finally:
                finished.set()

        tcp = await asyncio.start_server(session, host, port)
        actual = tcp.sockets[0].getsockname()[1]
        logger.info("serving LSP on %s:%d", host, actual)
        if on_listening is not None:
            on_listening(host, actual)
        async with tcp:
            await finished.wait()

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit, ConnectionError):
        pass


def serve_stdio(server) -> None:
    # stdout carries JSON-RPC; anything printed by mistake must not land in it.
    rpc_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    server.start_io(sys.stdin.buffer, rpc_out)
