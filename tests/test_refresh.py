"""Refresh: FIM evaluation metrics, hot reload of weights in running workers, and `codefill train --repo`.

Reload is checked on the real parts: the engine stepped in the test's thread, a worker subprocess over real
ZeroMQ sockets, and two msrun tensor-parallel ranks. Two tiny models with the same architecture and tokenizer
but different random weights (seeds 0 and 1) give different greedy tokens, so every answer can be told to
come from the old weights or the new ones, entirely.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import zmq

from codefill.inference_workers.client import WorkerClient, WorkerError
from codefill.inference_workers.startup import spawn_worker, stop_worker
from codefill.inference_workers.protocol import (
    Finished,
    FinishReason,
    GenerateRequest,
    Reloaded,
    ReloadWeights,
    Token,
    decode,
    encode,
)
from codefill.training.fim_eval import (
    FimEvalConfig,
    FimResult,
    FimScore,
    FimTask,
    edit_similarity,
    exact_match,
    levenshtein,
    make_tasks,
    normalise,
)
from helpers import FIXED_CORPUS, make_tiny_model_dir

MAX_SEQ_LEN, MAX_BATCH, NEW = 256, 4, 40
PROMPTS = [[1, 17, 42, 99, 230, 7, 311, 64], [1, 5, 6, 7], [1, 300, 301, 302, 303], [1, 88, 77, 66, 55, 44],
           [1, 9, 19, 29], [1, 120, 33, 5]]


# --- metrics and tasks ---------------------------------------------------------------------------------------


def test_levenshtein_and_edit_similarity_on_known_strings():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert edit_similarity("return x\n", "return x") == 1.0
    assert edit_similarity("return y", "return x") == pytest.approx(1 - 1 / 8)
    assert edit_similarity("", "") == 1.0 and edit_similarity("", "abcd") == 0.0


def test_exact_match_ignores_trailing_whitespace_only():
    assert exact_match("    x = 1   \n\n\n", "    x = 1\n")
    assert exact_match("a  \nb\t\n", "a\nb")
    assert not exact_match("x = 1", "    x = 1")  # indentation is part of the answer
    assert not exact_match("x = 1\ny = 2", "x = 1")
    assert normalise("a \n\nb  \n\n") == "a\n\nb"


def test_score_report():
    task = FimTask("f.py", 0, "", "x\n", "")
    score = FimScore([FimResult(task, "", e, s, True) for e, s in ((True, 1.0), (False, 0.5))])
    assert score.report("after") == "after: exact match 1/2 (50.0%), edit similarity 0.750"


def test_a_few_files_get_many_spans_each_and_a_tiny_file_is_used_whole(tmp_path):
    lines = FIXED_CORPUS.splitlines(keepends=True)
    (tmp_path / "big.py").write_text("".join(lines) * 4)
    (tmp_path / "tiny.py").write_text("x = 1\n\ny = 2\nz = 3\n")
    tasks = make_tasks(tmp_path, ["big.py", "tiny.py"], FimEvalConfig(max_tasks=100))
    assert len(tasks) == 100  # tiny.py gives every non-blank line, big.py the rest of the budget
    assert sorted(t.line for t in tasks if t.path == "tiny.py") == [0, 2, 3]
    assert len({t.line for t in tasks if t.path == "big.py"}) == 97
    assert [t.path for t in tasks[:6]] == ["big.py", "tiny.py"] * 3  # interleaved while both have spans
    assert FimEvalConfig().max_tasks >= 200  # hundreds of spans by default


def test_the_held_out_share_grows_until_there_are_enough_lines_and_no_further_than_the_cap(tmp_path):
    from codefill.training.refresh import MAX_AUTO_HELD_OUT, held_out_fraction_for
    from codefill.training.source_files import SourceConfig, iter_source_files

    for i in range(60):
        (tmp_path / f"m{i}.py").write_text("".join(f"x{i}_{k} = {k}\n\n" for k in range(10)))  # 10 non-blank

    def held_lines(fraction):
        return sum(10 for f in iter_source_files(tmp_path, SourceConfig(held_out_fraction=fraction)) if f.held_out)

    assert held_out_fraction_for(tmp_path, 0) == 0.05
    fractions = [held_out_fraction_for(tmp_path, n) for n in (20, 40, 60)]
    assert fractions == sorted(fractions) and fractions[0] >= 0.05
    for n, f in zip((20, 40, 60), fractions):
        assert held_lines(f) >= n  # enough lines...
        assert held_lines(f - 2e-9) < n or f == 0.05  # ...and the smallest share that has them
    assert held_out_fraction_for(tmp_path, 10_000) <= MAX_AUTO_HELD_OUT
    assert held_lines(held_out_fraction_for(tmp_path, 10_000)) <= 10 * 60 * 0.35  # capped, not everything


def test_tasks_are_deterministic_whole_lines_and_spread_over_files(tmp_path):
    lines = FIXED_CORPUS.splitlines(keepends=True)
    for name, part in (("a.py", lines[:40]), ("b.py", lines[40:]), ("c.py", lines[10:30])):
        (tmp_path / name).write_text("".join(part))
    cfg = FimEvalConfig(max_tasks=7, tasks_per_file=4, max_middle_lines=3, context_lines=6)
    tasks = make_tasks(tmp_path, ["c.py", "a.py", "b.py"], cfg)
    assert tasks == make_tasks(tmp_path, ["a.py", "b.py", "c.py"], cfg)  # same tasks, whatever the list order
    assert len(tasks) == 7 and [t.path for t in tasks[:6]] == ["a.py", "b.py", "c.py"] * 2
    for t in tasks:
        text = (tmp_path / t.path).read_text()
        file_lines = text.splitlines(keepends=True)
        assert t.middle.strip() and 1 <= len(t.middle.splitlines()) <= 3
        assert t.middle == "".join(file_lines[t.line:t.line + len(t.middle.splitlines())])
        assert t.prefix + t.middle + t.suffix in text  # one contiguous slice of the file
        assert len(t.prefix.splitlines()) <= 6 and len(t.suffix.splitlines()) <= 3
    other_seed = make_tasks(tmp_path, ["a.py", "b.py", "c.py"], FimEvalConfig(max_tasks=7, context_lines=6, seed=1))
    assert [t.line for t in other_seed] != [t.line for t in tasks]


def test_reload_messages_round_trip_and_are_checked():
    from codefill.inference_workers.protocol import WireError

    for msg in (ReloadWeights("r1", "/models/new ☺"), Reloaded("r1", False, "refused: rank 1 of 2: ...", 3)):
        assert decode(encode(msg), type(msg)) == msg
    with pytest.raises(WireError, match="ReloadWeights.model_dir has length 0"):
        ReloadWeights("r1", "")
    with pytest.raises(WireError, match="Reloaded.ok must be a bool"):
        Reloaded("r1", 1, "", 0)


# --- models: old, new, and two that must be refused ---------------------------------------------------------


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, seed=0)


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, seed=1)


@pytest.fixture(scope="module")
def corrupt_dir(new_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(new_dir, out)
    size = (out / "model.safetensors").stat().st_size
    with open(out / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)  # a copy cut short
    return out


@pytest.fixture(scope="module")
def mismatched_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, "tiny-gqa")  # same vocabulary, other heads


def greedy_reference(model_dir, prompts, n):
    from codefill.inference_workers.runner import Runner

    gen = Runner.from_model_dir(model_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)
    return [[t for t, _ in gen.generate(p, n)] for p in prompts]


@pytest.fixture(scope="module")
def references(old_dir, new_dir):
    old, new = greedy_reference(old_dir, PROMPTS, NEW), greedy_reference(new_dir, PROMPTS, NEW)
    for a, b in zip(old, new):
        assert a[:2] != b[:2], "the two tiny models must answer differently from the first tokens"
    return old, new


# --- the engine, stepped in this thread -------------------------------------------------------------------


class Replies:
    def __init__(self):
        self.log = []

    def __call__(self, identity, msg):
        self.log.append(msg)

    def tokens(self, rid):
        return [m.token_id for m in self.log if isinstance(m, Token) and m.request_id == rid]

    def finished(self, rid):
        (done,) = [m for m in self.log if isinstance(m, Finished) and m.request_id == rid]
        return done

    def reloaded(self, rid):
        (done,) = [m for m in self.log if isinstance(m, Reloaded) and m.request_id == rid]
        return done


@pytest.fixture
def engine_on_old(old_dir):
    from codefill.inference_workers.engine import Engine, EngineConfig
    from codefill.inference_workers.stops import token_bytes_of_model_dir
    from codefill.inference_workers.runner import Runner

    replies = Replies()
    runner = Runner.from_model_dir(old_dir, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH)
    return Engine(runner, EngineConfig(), token_bytes_of_model_dir(old_dir), replies), replies


def test_engine_switches_between_steps_and_no_request_mixes_weights(engine_on_old, new_dir, references):
    engine, replies = engine_on_old
    old, new = references
    for i in range(5):  # 4 take the slots, 1 waits in the queue
        engine.submit(b"c", GenerateRequest(f"early{i}", PROMPTS[i], NEW))
    for _ in range(3):
        engine.step()
    assert all(len(replies.tokens(f"early{i}")) >= 1 for i in range(4)) and replies.tokens("early4") == []
    engine.reload(b"c", ReloadWeights("r1", str(new_dir)))
    engine.submit(b"c", GenerateRequest("late", PROMPTS[5], NEW))
    engine.run_until_idle()
    for i in range(4):  # running when the reload came: finished on the old weights
        assert replies.tokens(f"early{i}") == old[i] and replies.finished(f"early{i}").n_generated == NEW
    assert replies.tokens("early4") == new[4]  # queued: waited for the new weights
    assert replies.tokens("late") == new[5]
    r = replies.reloaded("r1")
    assert r.ok and r.weights_version == 1 and str(new_dir) in r.message
    # nothing after the switch came from a slot cached under the old weights
    assert replies.finished("late").n_reused == 0 and replies.finished("early4").n_reused == 0
    order = [m.request_id for m in replies.log if isinstance(m, (Finished, Reloaded))]
    assert order.index("r1") > max(order.index(f"early{i}") for i in range(4))
    assert order.index("r1") < order.index("early4")
    # the prompt of an old-weights request, asked again: answered by the new weights, not replayed from cache
    engine.submit(b"c", GenerateRequest("again", PROMPTS[0], NEW))
    engine.run_until_idle()
    assert replies.tokens("again") == new[0] and replies.finished("again").n_replayed == 0


def test_engine_refuses_corrupt_and_mismatched_and_keeps_serving(engine_on_old, corrupt_dir, mismatched_dir,
                                                                  references):
    engine, replies = engine_on_old
    old, _ = references
    engine.reload(b"c", ReloadWeights("bad", str(corrupt_dir)))
    engine.reload(b"c", ReloadWeights("twice", str(corrupt_dir)))  # one at a time
    engine.run_until_idle()
    bad = replies.reloaded("bad")
    assert not bad.ok and "old weights keep serving" in bad.message and "model.safetensors" in bad.message
    assert not replies.reloaded("twice").ok and "already pending" in replies.reloaded("twice").message
    engine.reload(b"c", ReloadWeights("other", str(mismatched_dir)))
    engine.run_until_idle()
    other = replies.reloaded("other")
    assert not other.ok and "another architecture" in other.message and "n_heads 8 (serving 4)" in other.message
    assert other.weights_version == 0
    engine.submit(b"c", GenerateRequest("after", PROMPTS[0], NEW))
    engine.run_until_idle()
    assert replies.tokens("after") == old[0]


# --- a worker process over ZeroMQ -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(old_dir):
    process, endpoint = spawn_worker(old_dir, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH, timeout_s=300)
    yield endpoint
    stop_worker(process)


def test_hot_reload_under_load_drops_no_request(worker, new_dir, references):
    """Four long requests hold every slot, one more waits in the queue, then ReloadWeights and two more
    requests, all on one DEALER (so the worker reads them in that order): each answer is complete and all
    old or all new; the running ones finish on the old weights, everything after on the new."""
    old, new = references
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(worker)
    tokens: dict[str, list[int]] = {}
    finished: dict[str, Finished] = {}
    reloaded: list[Reloaded] = []

    def receive_one():
        assert sock.poll(60_000), "the worker went silent"
        msg = decode(sock.recv(), (Token, Finished, Reloaded))
        if isinstance(msg, Token):
            tokens.setdefault(msg.request_id, []).append(msg.token_id)
        elif isinstance(msg, Finished):
            finished[msg.request_id] = msg
        else:
            reloaded.append(msg)

    try:
        for i in range(4):
            sock.send(encode(GenerateRequest(f"run{i}", PROMPTS[i], NEW)))
        while not all(f"run{i}" in tokens for i in range(4)):  # all four are decoding
            receive_one()
        sock.send(encode(GenerateRequest("queued", PROMPTS[4], NEW)))
        sock.send(encode(ReloadWeights("reload", str(new_dir))))
        sock.send(encode(GenerateRequest("late0", PROMPTS[5], NEW)))
        sock.send(encode(GenerateRequest("late1", PROMPTS[0], NEW)))
        with WorkerClient(worker, timeout_s=30) as other:
            assert other.ping().ready  # health is answered while the reload is pending
        expected = {f"run{i}" for i in range(4)} | {"queued", "late0", "late1"}
        while set(finished) != expected or not reloaded:
            receive_one()
    finally:
        sock.close(linger=0)
    assert reloaded[0].ok and reloaded[0].request_id == "reload"
    for rid, f in finished.items():
        assert f.finish_reason == FinishReason.LENGTH and f.n_generated == NEW == len(tokens[rid]), rid
    for i in range(4):
        assert tokens[f"run{i}"] == old[i], f"run{i} mixed or switched weights"
    assert tokens["queued"] == new[4]
    assert tokens["late0"] == new[5] and tokens["late1"] == new[0]
    with WorkerClient(worker, timeout_s=60) as client:  # and a fresh client sees the new weights
        got, _ = client.complete(PROMPTS[1], NEW)
        assert [t.token_id for t in got] == new[1]


def test_worker_refuses_a_corrupt_or_mismatched_checkpoint_and_keeps_serving(worker, corrupt_dir, mismatched_dir,
                                                                            new_dir, references):
    _, new = references
    with WorkerClient(worker, timeout_s=120) as client:
        version = client.reload(new_dir).weights_version  # whatever ran before, serve `new` now
        with pytest.raises(WorkerError, match=r"did not reload .*corrupt.*old weights keep serving.*model\.safetensors"):
            client.reload(corrupt_dir)
        with pytest.raises(WorkerError, match=r"another architecture.*n_heads 8 \(serving 4\)"):
            client.reload(mismatched_dir)
        with pytest.raises(WorkerError, match="does not exist|cannot|missing"):
            client.reload(corrupt_dir.parent / "no-such-dir")
        got, _ = client.complete(PROMPTS[2], NEW)
        assert [t.token_id for t in got] == new[2]
        assert client.ping().ready
        assert client.reload(new_dir).weights_version == version + 1  # a good reload still works after refusals


# --- tensor parallel: two msrun ranks ---------------------------------------------------------------------


def test_tp2_reload_switches_every_rank_or_none(tmp_path_factory, tmp_path):
    from codefill.inference_workers import sharding as tp
    from codefill.inference_workers.launch import start_workers

    gqa_old = make_tiny_model_dir(tmp_path_factory, "tiny-gqa")
    gqa_new = make_tiny_model_dir(tmp_path_factory, "tiny-gqa", seed=1)
    old = greedy_reference(gqa_old, PROMPTS[:1], 12)[0]
    new = greedy_reference(gqa_new, PROMPTS[:1], 12)[0]
    assert old != new
    broken = tp.split_model_dir(gqa_new, 2, tmp_path / "broken")
    (broken / tp.shard_file_name(1, 2)).write_bytes(b"\x00" * 16)  # rank 1 cannot load; rank 0 can
    job = start_workers(gqa_old, 2, max_seq_len=MAX_SEQ_LEN, max_batch=2, ready_timeout_s=240)
    try:
        with WorkerClient(job.endpoint, timeout_s=120) as client:
            assert [t.token_id for t in client.complete(PROMPTS[0], 12)[0]] == old
            with pytest.raises(WorkerError, match=r"rank 1 of 2: .*rank-01-of-02\.safetensors"):
                client.reload(broken)
            assert [t.token_id for t in client.complete(PROMPTS[0], 12)[0]] == old  # no rank switched
            assert client.reload(gqa_new).ok
            assert [t.token_id for t in client.complete(PROMPTS[0], 12)[0]] == new
            assert client.ping().ready
    finally:
        assert job.stop(30) == 0  # the followers are still in step: STOP reaches them and they return


# --- codefill train --repo, end to end -------------------------------------------------------------------


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


def _repo(tmp_path, fraction, n_train, body):
    """A git repository of `n_train` train files and one held-out file (at `fraction`), file k holding
    "# module k" and body(k)."""
    from codefill.training.source_files import is_held_out

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    names = [f"mod_{i}.py" for i in range(40)]
    held = [n for n in names if is_held_out(n, fraction)][:1]
    train_names = [n for n in names if not is_held_out(n, fraction)][:n_train]
    assert held and len(train_names) == n_train
    for k, name in enumerate(train_names + held):
        (repo / name).write_text(f"# module {k}\n" + body(k))
    _git(repo, "add", ".")
    return repo


def test_train_repo_measures_decides_and_publishes(old_dir, worker, tmp_path, capsys):
    from codefill.cli import main

    fraction = 0.3
    lines = FIXED_CORPUS.splitlines(keepends=True)
    repo = _repo(tmp_path, fraction, 3, lambda k: "".join(lines[k * 5:]))
    out = tmp_path / "run"
    code = main(["train", "--repo", str(repo), "--model", str(old_dir), "--output", str(out), "--preset", "tiny-test",
                 "--seq-length", "64", "--max-steps", "30", "--held-out-fraction", str(fraction),
                 "--eval-tasks", "4", "--eval-max-new-tokens", "12", "--publish", worker])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "4 spans from 1 files" in text and "before: exact match" in text and "after : exact match" in text
    assert "decision: the new weights" in text and "95% interval [" in text and "because " in text
    assert (out / "model" / "model.safetensors").is_file()
    reference = greedy_reference(out / "model", PROMPTS[:1], 8)[0]
    with WorkerClient(worker, timeout_s=60) as client:
        served = [t.token_id for t in client.complete(PROMPTS[0], 8)[0]]
    if "are better" in text:
        assert f"published {out / 'model'}" in text and served == reference
    else:
        assert "not published" in text and served != reference


def test_train_repo_publishes_weights_that_got_better(old_dir, worker, tmp_path, capsys):
    """The "better, so publish" branch, made certain: every file of the repository repeats the same lines, so
    a few steps of training take the random model's held-out answers from noise to near copies (a higher edit
    similarity at least), and the workers must end up serving exactly the new weights."""
    from codefill.cli import main

    fraction = 0.3
    body = "".join(FIXED_CORPUS.splitlines(keepends=True)[:6]) * 4
    repo = _repo(tmp_path, fraction, 6, lambda k: body)
    out = tmp_path / "run"
    code = main(["train", "--repo", str(repo), "--model", str(old_dir), "--output", str(out), "--preset", "tiny-test",
                 "--seq-length", "64", "--max-steps", "60", "--held-out-fraction", str(fraction),
                 "--eval-tasks", "24", "--eval-max-new-tokens", "12", "--publish", worker])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "decision: the new weights are better" in text, text
    assert "is above the margin 0.01" in text, text
    assert f"published {out / 'model'}" in text, text
    reference = greedy_reference(out / "model", PROMPTS[:1], 8)[0]
    with WorkerClient(worker, timeout_s=60) as client:
        served = [t.token_id for t in client.complete(PROMPTS[0], 8)[0]]
    assert served == reference


# --- the decision on real finetunes: no change, a worse model ------------------------------------------------


PATTERN = "".join(FIXED_CORPUS.splitlines(keepends=True)[:6]) * 4


def test_a_finetune_that_changes_nothing_is_not_better_at_any_seed(old_dir, worker, tmp_path, capsys):
    """A learning rate of 1e-9 leaves the weights (and so every greedy answer) as they were: the paired
    differences are all 0 and no seed of the bootstrap may call that better; nothing is published."""
    from codefill.cli import main
    from codefill.training.fim_eval import FimEvalConfig, evaluate_model_dir
    from codefill.training.paired_decision import DecisionConfig
    from codefill.training.refresh import compare, served

    fraction = 0.3
    repo = _repo(tmp_path, fraction, 6, lambda k: PATTERN)
    out = tmp_path / "run"
    code = main(["train", "--repo", str(repo), "--model", str(old_dir), "--output", str(out), "--preset", "tiny-test",
                 "--seq-length", "64", "--max-steps", "4", "--lr", "1e-9", "--end-lr", "0",
                 "--held-out-fraction", str(fraction), "--eval-tasks", "24", "--eval-max-new-tokens", "12",
                 "--publish", worker])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "decision: the new weights are not better" in text and "not published" in text, text
    assert "difference +0.000" in text and "[+0.000, +0.000]" in text, text
    from codefill.training.refresh import data_path
    from codefill.training.tokenize_data import held_out_list_path, read_held_out_list

    root, held = read_held_out_list(held_out_list_path(data_path(out)))
    cfg = FimEvalConfig(max_tasks=24, max_new_tokens=12)
    tasks = make_tasks(root, held, cfg)
    before, after = (served(evaluate_model_dir(d, tasks, cfg)) for d in (old_dir, out / "model"))
    for seed in range(30):
        for margin in (0.0, 0.01):
            assert not compare(before, after, DecisionConfig(min_improvement=margin, seed=seed)).better


def test_a_finetune_made_worse_is_refused(tmp_path_factory, worker, tmp_path, capsys):
    """Start from a model that has learnt the repository's pattern, then finetune it hard on files that
    contradict it: the held-out answers get worse, and the refresh must refuse to publish."""
    from codefill.cli import main

    fraction = 0.3
    good_repo = _repo(tmp_path_factory.mktemp("good"), fraction, 6, lambda k: PATTERN)
    base = tmp_path / "base"
    assert main(["train", "--repo", str(good_repo), "--model", str(make_tiny_model_dir(tmp_path_factory)),
                 "--output", str(base), "--preset", "tiny-test", "--seq-length", "64", "--max-steps", "60",
                 "--held-out-fraction", str(fraction), "--eval-tasks", "24", "--eval-max-new-tokens", "12"]) == 0
    capsys.readouterr()
    noise = "".join(f"q{k * 7 % 13} = z{k % 5} ** {k}\n" for k in range(60))
    bad_repo = _repo(tmp_path, fraction, 6, lambda k: PATTERN if k == 6 else noise)  # file 6 is held out
    out = tmp_path / "worse"
    code = main(["train", "--repo", str(bad_repo), "--model", str(base / "model"), "--output", str(out),
                 "--preset", "tiny-test", "--seq-length", "64", "--max-steps", "60", "--lr", "1e-2",
                 "--held-out-fraction", str(fraction), "--eval-tasks", "24", "--eval-max-new-tokens", "12",
                 "--publish", worker])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "decision: the new weights are not better" in text and "not published" in text, text
    assert "got worse" in text, text
