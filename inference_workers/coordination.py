"""Rank coordination: how rank 0 tells the other tensor-parallel ranks which step to run, and the two-phase
weight reload across them.

Rank 0's `runner.Runner` announces every prefill chunk and decode step before running it. For each it
broadcasts one fixed-size int32 message (`Broadcast`, a compiled graph, so it works across nodes over
MindSpore's own collectives; no extra sockets)

    [op, n, slot, start_pos, payload...]   op PREFILL: payload = n token ids (n <= PREFILL_CHUNK)
                                           op DECODE:  payload = max_batch tokens then max_batch positions
                                           op STOP:    the followers return
                                           op STAGE:   payload = a model directory's path, n UTF-8 bytes
                                                       packed 4 to an int32 (little-endian; up to 2 KB)
                                           op COMMIT / DISCARD: switch to the staged weights / drop them
                                           op VERIFY:  as PREFILL, through the graph with every position's logits

padded to HEADER + max(PREFILL_CHUNK, 2 * max_batch) values, so the broadcast graph compiles once. Then every
rank runs the same graph on its shard; the collectives inside it keep the ranks in step. Followers loop in
`follow` until STOP.

Reloading weights (between steps, with no request active): rank 0 broadcasts STAGE with the path (every rank
reads the same shared path: ranks on one host, or a filesystem all hosts mount). Each rank loads its shard
beside the live weights and reports ok or its error; an AllGather of those reports is the barrier after which
every rank knows whether all of them loaded. Rank 0 then broadcasts COMMIT (every rank copies its staged
shard into the model's Parameters; the graphs are kept) or DISCARD (nothing changes anywhere). A follower's
load error is reported, never raised, so a bad checkpoint cannot kill a rank; the next step runs on one set
of weights on every rank because each rank handles COMMIT before the next step's message.

A follower that fails raises and its process dies; rank 0 then blocks in the next collective, which is why
the launcher watches every rank's process and kills the job (launch.py), and why the engine runs steps under
a watchdog.

`LocalChannel` is the same interface for a world of one rank: it announces nothing and gathers its own report.
"""

from __future__ import annotations

import sys

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .sharding import TensorParallelError
from .tp_cells import Collective

PREFILL_CHUNK = 512  # tokens per prefill graph call; longer prompts are prefilled in chunks

HEADER = 4  # op, n, slot, start_pos
OP_PREFILL, OP_DECODE, OP_STOP = 1, 2, 3
OP_STAGE, OP_COMMIT, OP_DISCARD = 4, 5, 6
OP_VERIFY = 7
STATUS_LEN = 256  # one rank's reload report in the AllGather: [ok, then up to 255 bytes of its error]


class _Broadcast(nn.Cell):
    def __init__(self):
        super().__init__()
        self.broadcast = ops.Broadcast(0)

    def construct(self, x):
        return self.broadcast((x,))[0]


class LocalChannel:
    """The channel of a single rank: nothing to tell anyone."""

    rank, world = 0, 1
    payload_capacity = 1 << 20  # int32 values: a model directory path of up to 4 MB

    def announce(self, op: int, n: int = 0, slot: int = 0, start_pos: int = 0, payload=None) -> None:
        pass

    def gather(self, status: np.ndarray) -> np.ndarray:
        return status.reshape(1, -1)


class Channel:
    """One fixed-size int32 message from rank 0 to every rank per step, over a compiled Broadcast graph."""

    def __init__(self, rank: int, world: int, max_batch: int):
        self.rank, self.world = rank, world
        self.size = HEADER + max(PREFILL_CHUNK, 2 * max_batch)
        self.payload_capacity = self.size - HEADER
        self._broadcast = _Broadcast()
        self._gather: Collective | None = None  # built on first use: every rank reaches it after STAGE

    def announce(self, op: int, n: int = 0, slot: int = 0, start_pos: int = 0, payload=None) -> None:
        """Rank 0: send one step message and wait until it has left."""
        if self.rank != 0:
            raise TensorParallelError(f"only rank 0 sends steps; this is rank {self.rank}")
        msg = np.zeros(self.size, np.int32)
        msg[:HEADER] = (op, n, slot, start_pos)
        if payload is not None:
            msg[HEADER:HEADER + len(payload)] = payload
        self._broadcast(ms.Tensor(msg)).asnumpy()

    def receive(self) -> np.ndarray:
        return self._broadcast(ms.Tensor(np.zeros(self.size, np.int32))).asnumpy()

    def gather(self, status: np.ndarray) -> np.ndarray:
        """Every rank's float32 [STATUS_LEN] report -> [world, STATUS_LEN] on every rank (a barrier)."""
        if self._gather is None:
            self._gather = Collective(ops.AllGather())
        return self._gather(ms.Tensor(status.reshape(1, -1).astype(np.float32))).asnumpy()


# --- the payloads of STAGE and of the reload reports --------------------------------------------------------


def encode_path(path: str, capacity: int) -> tuple[int, np.ndarray]:
    """(byte length, int32 payload) of a path for a STAGE message with `capacity` payload values."""
    raw = path.encode("utf-8")
    if not raw or len(raw) > 4 * capacity:
        raise TensorParallelError(f"model directory path of {len(raw)} bytes does not fit a step message "
                                  f"(1 to {4 * capacity} bytes): {path[:80]!r}")
    return len(raw), np.frombuffer(raw + b"\0" * (-len(raw) % 4), dtype="<i4").astype(np.int32)


def decode_path(payload: np.ndarray, n: int) -> str:
    return payload.astype("<i4").tobytes()[:n].decode("utf-8")


def reload_status(error: str | None) -> np.ndarray:
    """One rank's report: [1, 0...] loaded, or [0, the error's first UTF-8 bytes...]."""
    out = np.zeros(STATUS_LEN, np.float32)
    if error is None:
        out[0] = 1.0
    else:
        raw = error.encode("utf-8")[:STATUS_LEN - 1]
        out[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def reload_failures(statuses: np.ndarray) -> list[str]:
    """'rank R of N: error' for every rank whose report in the gathered [world, STATUS_LEN] is not ok."""
    failed = []
    for rank, row in enumerate(statuses):
        if row[0] != 1.0:
            text = bytes(row[1:].astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")
            failed.append(f"rank {rank} of {len(statuses)}: {text}")
    return failed


# --- a follower rank -------------------------------------------------------------------------------------


def follow(runner, channel: Channel) -> int:
    """A follower rank's loop over its `runner.Runner`: run each step rank 0 broadcasts, until STOP. Returns
    the number of steps run."""
    steps = 0
    while True:
        msg = channel.receive()
        op, n, slot, start_pos = (int(v) for v in msg[:HEADER])
        payload = msg[HEADER:]
        if op == OP_STOP:
            return steps
        if op == OP_PREFILL:
            runner.run_prefill_chunk(payload[:n], slot, start_pos)
        elif op == OP_VERIFY:
            runner.run_verify(payload[:n], slot, start_pos)
        elif op == OP_DECODE:
            b = runner.max_batch
            runner.run_decode(payload[:b], payload[b:2 * b])
        elif op == OP_STAGE:
            error = runner.stage(decode_path(payload, n))
            if error is not None:
                print(f"codefill rank {channel.rank}: cannot stage new weights: {error}", file=sys.stderr, flush=True)
            channel.gather(reload_status(error))
        elif op == OP_COMMIT:
            runner.commit()
        elif op == OP_DISCARD:
            runner.discard()
        else:
            raise TensorParallelError(f"rank {channel.rank}: unknown op {op} in step message {msg[:HEADER].tolist()}")
        steps += 1
