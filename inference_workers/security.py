"""Who may talk to a worker: processes on this machine, or CURVE-authenticated clients named in advance.

The workers run whatever token ids they are sent, so an endpoint other machines can reach is a remote
model for anyone on the network. The default endpoints stay on this machine (`ipc://` in a private
directory, `tcp://127.0.0.1`). Binding any other interface needs both:

- an explicit `allow_remote` (`--allow-remote`), so it never happens by a typo in an address, and
- CURVE keys (ZeroMQ's public-key encryption and authentication): the worker's own key pair, and a
  directory of the client public keys it accepts. A client must know the worker's public key and hold a
  key pair whose public half is in that directory; anyone else's connection is dropped by ZeroMQ's
  authenticator (ZAP) before a single message reaches the engine.

Keys are ZeroMQ certificate files (`zmq.auth.create_certificates`): NAME.key (public) and NAME.key_secret
(public + secret), made by `codefill keys`. Only the public half ever needs to be copied to another machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .protocol import WireError, check_endpoint, is_local_endpoint


@dataclass(frozen=True)
class ServerKeys:
    secret_key_file: Path  # this worker's NAME.key_secret
    authorized_clients: Path  # a directory of client NAME.key files; only these may connect


@dataclass(frozen=True)
class ClientKeys:
    server_public_key_file: Path  # the worker's NAME.key
    secret_key_file: Path  # this client's NAME.key_secret (its NAME.key must be in the worker's directory)


def generate_keys(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 0600) into out_dir; refuse to overwrite existing keys."""
    out = Path(out_dir)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise WireError(f"keys for {name!r} already exist in {out}; refusing to overwrite them")
    out.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(str(out), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise WireError(f"cannot read CURVE key file {path}: {e}") from e
    if secret and secret_key is None:
        raise WireError(f"{path} holds no secret key (give the NAME.key_secret file, not NAME.key)")
    return public, secret_key


def check_bind(endpoint: str, allow_remote: bool, keys: ServerKeys | None) -> str:
    """The endpoint a worker may bind, or WireError saying what is missing."""
    check_endpoint(endpoint, allow_remote=True)  # well-formed at all
    if is_local_endpoint(endpoint):
        return endpoint
    if not allow_remote:
        raise WireError(f"endpoint {endpoint!r} can be reached from other machines; binding it needs "
                        f"--allow-remote and CURVE keys (--curve-secret-key, --curve-authorized-clients)")
    if keys is None:
        raise WireError(f"endpoint {endpoint!r}: --allow-remote needs CURVE keys (--curve-secret-key and "
                        f"--curve-authorized-clients); without them anyone on the network could run the model")
    if not keys.authorized_clients.is_dir() or not any(keys.authorized_clients.glob("*.key")):
        raise WireError(f"authorized clients directory {keys.authorized_clients} has no NAME.key files")
    return endpoint


def secure_server(ctx: zmq.Context, sock: zmq.Socket, keys: ServerKeys) -> ThreadAuthenticator:
    """Make `sock` a CURVE server that admits only the authorized clients; call before bind. The returned
    authenticator must be stopped when the socket is closed."""
    public, secret = _load(keys.secret_key_file, secret=True)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.authorized_clients))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, keys: ClientKeys) -> None:
    """Make `sock` a CURVE client of the worker whose public key is given; call before connect."""
    server_public, _ = _load(keys.server_public_key_file, secret=False)
    public, secret = _load(keys.secret_key_file, secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public
