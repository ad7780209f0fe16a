"""The language server's link to its inference worker: connect or start it, notice when it is down, come back.

Three ways to get a worker, tried in this order:

- `endpoint` (a setting or `--endpoint`): a worker someone else runs; the server only connects;
- `tp > 1`: N tensor-parallel ranks under msrun (`inference_workers.launch.start_workers`), owned by us;
- otherwise one worker process on the model directory (`startup.spawn_worker`), owned by us.

States: starting -> up <-> down. A request that fails (the worker is silent past the timeout, refuses,
or a worker we own has exited) turns the link down: the failing request gets an error response, the user
gets ONE window/showMessage per outage, and later requests get an empty answer at once instead of waiting
out a timeout. Meanwhile a background task pings every `reconnect_interval_s` and, for a worker we own that
has exited, starts a new one; the first good Pong turns the link up again (and says so in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codefill.inference_workers.client import AsyncWorkerClient, WorkerError
from codefill.inference_workers.startup import spawn_worker, stop_worker, worker_log

from .settings import Settings

logger = logging.getLogger(__name__)


class WorkerDown(WorkerError):
    """The worker is known to be down; the request was not sent."""


@dataclass
class Link:
    client: AsyncWorkerClient
    max_seq_len: int


class Backend:
    def __init__(self, model_dir: Path, settings: Settings, notify: Callable[[str], None], keys=None):
        self.model_dir, self.settings, self.notify = model_dir, settings, notify
        self.keys = keys  # security.ClientKeys for a remote endpoint (CURVE), or None
        self.process: subprocess.Popen | None = None  # one worker we spawned
        self.job = None  # launch.Job: tensor-parallel ranks we started
        self.link: Link | None = None
        self.down_reason: str | None = None  # set while down
        self._starting: asyncio.Task | None = None
        self._reconnect: asyncio.Task | None = None
        self._told = False  # the user was told about the current outage
        self.restarts = 0

    # --- public ---

    async def get(self) -> Link:
        """The live link, starting the worker on first use; WorkerDown at once while the worker is down."""
        if self.down_reason is not None:
            raise WorkerDown(self.down_reason)
        if self.link is not None:
            self.check_owned_alive()
            return self.link
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        try:
            # shield: a cancelled completion must not cancel the startup that later requests share
            self.link = await asyncio.shield(self._starting)
        except WorkerError as e:
            self._starting = None
            self.mark_down(f"codefill could not start its worker: {e}")
            raise WorkerError(self.down_reason) from e
        return self.link

    def mark_down(self, reason: str) -> None:
        """A request failed: tell the user once, answer quickly from now on, and try to come back."""
        if self.down_reason is None:
            logger.error("worker down: %s", reason)
        self.down_reason = reason
        if not self._told:
            self._told = True
            self.notify(reason)
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    def check_owned_alive(self) -> None:
        """Raise WorkerError if the worker we spawned has exited (its log tail says why)."""
        if self.process is not None and self.process.poll() is not None:
            log = worker_log(self.process)
            tail = log.read_text(errors="replace")[-1000:] if log is not None and log.exists() else ""
            raise WorkerError(f"the worker (pid {self.process.pid}) exited with status {self.process.returncode}; "
                              f"codefill restarts it. Log {log}:\n{tail}")
        if self.job is not None and (why := self.job.failure()) is not None:
            raise WorkerError(f"the tensor-parallel workers failed: {why}; codefill restarts them")

    async def while_alive(self, coro):
        """Await `coro`, but fail at once if a worker we own dies meanwhile, instead of at the timeout."""
        task = asyncio.ensure_future(coro)
        if self.process is None and self.job is None:
            return await task
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=0.2)
                if done:
                    return task.result()
                self.check_owned_alive()
        finally:
            task.cancel()  # no-op when done; otherwise its cleanup sends Cancel

    def reconfigure(self, settings: Settings) -> None:
        """New settings; a changed endpoint drops the current link (the next request connects anew)."""
        changed = settings.endpoint != self.settings.endpoint
        self.settings = settings
        if changed:
            self.close_link()
            self._starting, self.down_reason, self._told = None, None, False

    def close_link(self) -> None:
        if self.link is not None:
            client, self.link = self.link.client, None
            try:
                # Later, not now: requests being cancelled still send their Cancel on this socket.
                asyncio.get_running_loop().call_later(0.1, client.close)
            except RuntimeError:
                client.close()

    def stop(self) -> None:
        """Close the link and stop what we started (a worker someone else runs is left running)."""
        for task in (self._reconnect, self._starting):
            if task is not None and not task.done():
                task.cancel()
        self.close_link()
        self._stop_owned()

    # --- internals ---

    def _stop_owned(self) -> None:
        if self.process is not None:
            stop_worker(self.process)
            self.process = None
        if self.job is not None:
            with contextlib.suppress(Exception):
                self.job.stop()
            self.job = None

    async def _start(self) -> Link:
        s = self.settings
        endpoint = s.endpoint
        if endpoint is None:
            if s.tp > 1:
                from codefill.inference_workers.launch import start_workers

                kwargs = {"ready_timeout_s": s.worker_start_timeout_s, "device": s.worker_device}
                if s.worker_max_seq_len is not None:
                    kwargs["max_seq_len"] = s.worker_max_seq_len
                self.job = await asyncio.to_thread(start_workers, self.model_dir, s.tp, **kwargs)
                endpoint = self.job.endpoint
                logger.info("%d tensor-parallel ranks on %s", s.tp, endpoint)
            else:
                self.process, endpoint = await asyncio.to_thread(
                    spawn_worker, self.model_dir, timeout_s=s.worker_start_timeout_s, max_seq_len=s.worker_max_seq_len,
                    device=s.worker_device)
                logger.info("worker %d on %s, log %s", self.process.pid, endpoint, worker_log(self.process))
        # CURVE keys are for the endpoint the user named; workers this server started are local
        client = AsyncWorkerClient(endpoint, timeout_s=s.request_timeout_s,
                                   keys=self.keys if s.endpoint is not None else None)
        try:
            pong = await client.ping()
        except BaseException:
            client.close()
            raise
        return Link(client, pong.max_seq_len)

    async def _reconnect_loop(self) -> None:
        while self.down_reason is not None:
            await asyncio.sleep(self.settings.reconnect_interval_s)
            try:
                if self.process is not None or self.job is not None:
                    try:
                        self.check_owned_alive()
                    except WorkerError:
                        self.close_link()
                        await asyncio.to_thread(self._stop_owned)
                        self.restarts += 1
                if self.link is None:
                    if self.settings.endpoint is None and self.process is None and self.job is None \
                            and self.restarts == 0:
                        return  # the worker could not start at all: do not spin on a broken model
                    self.link = await self._start()
                else:
                    pong = await asyncio.wait_for(self.link.client.ping(), self.settings.reconnect_interval_s * 2)
                    self.link.max_seq_len = pong.max_seq_len
                self.down_reason, self._told = None, False
                logger.info("worker back up%s", f" (restart {self.restarts})" if self.restarts else "")
            except (WorkerError, OSError, TimeoutError) as e:
                # a link to an endpoint is kept: zmq reconnects the same socket by itself
                logger.info("worker still down: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
