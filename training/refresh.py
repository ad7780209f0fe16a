"""`codefill train --repo PATH --model MODEL_DIR --output OUT [--publish ENDPOINT]`: refresh the serving model
on the user's repository, and switch the running workers to it only if it got better.

    1. tokenize   the repository's train files into FIM rows, OUT.data/train.mindrecord (tokenize_fim; a
                  deterministic share of files is held out and listed in OUT.data/train.heldout.json). The
                  share starts at 5% and, unless --held-out-fraction is given, grows (up to 20%) until the
                  held-out files hold enough non-blank lines for the evaluation's spans (held_out_fraction_for).
                  An existing OUT.data is reused (resume); delete it to re-read the repository.
    2. before     greedy FIM score of MODEL_DIR on spans cut from the held-out files (fim_eval.py: 256 by
                  default, more per file when there are few files), each answer scored as the language
                  server would show it (fim_eval.as_served)
    3. finetune   the `refresh` preset (LoRA) by default: trainer.train, or msrun ranks for --dp > 1 or
                  --tp > 1 (full finetune only: tp_train.py); the merged weights land in OUT/model
    4. after      the same spans on OUT/model
    5. decide     a paired comparison of the two on the same spans, with a confidence level
                  (paired_decision.py): better only when edit similarity's interval lies above
                  --min-improvement and no measure got significantly worse
    6. publish    only if better and an endpoint is given: ReloadWeights(OUT/model) to the running workers
                  (WorkerClient.reload). They switch between steps with no request dropped or mixed, and
                  refuse a directory that does not load on every rank or does not match what they serve.

No held-out file means nothing to measure on: that is refused before training (raise --held-out-fraction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fim_eval import FimEvalConfig, FimScore, as_served, evaluate_model_dir, make_tasks
from .paired_decision import Decision, DecisionConfig, decide
from .source_files import SourceConfig, held_out_score, iter_source_files
from .train_config import TrainConfig
from .train_error import TrainError


@dataclass
class RefreshResult:
    model_dir: Path  # OUT/model, the finetuned weights
    before: FimScore  # as served
    after: FimScore
    decision: Decision
    published: bool = False
    weights_version: int | None = None  # the workers' count of reloads after publishing
    publish_error: str | None = None  # why publishing failed (the workers kept the old weights)

    @property
    def better(self) -> bool:
        return self.decision.better

    def report(self) -> str:
        files = len({r.task.path for r in self.before.results})
        lines = [f"held-out FIM evaluation: {self.before.n} spans from {files} files, greedy, scored as served",
                 "  " + self.before.report("before"), "  " + self.after.report("after "), self.decision.report()]
        if self.published:
            lines.append(f"published {self.model_dir} to the workers (weights version {self.weights_version})")
        elif self.publish_error is not None:
            lines.append(f"publishing failed, the workers keep the old weights: {self.publish_error}")
        return "\n".join(lines)


def data_path(out: str | Path) -> Path:
    """Where the repository's rows go: OUT.data/train.mindrecord, beside OUT."""
    out = Path(out)
    return out.with_name(out.name + ".data") / "train.mindrecord"


MAX_AUTO_HELD_OUT = 0.2  # the adaptive held-out share never keeps more than this of the files from training


def held_out_fraction_for(repo: str | Path, min_lines: int, start: float = SourceConfig().held_out_fraction,
                          cap: float = MAX_AUTO_HELD_OUT) -> float:
    """The smallest held-out fraction >= `start` (and <= `cap`) whose held-out files hold at least `min_lines`
    non-blank lines, the span starts an evaluation can draw. Files join the held-out part in the order of
    their held_out_score, so a larger fraction only adds files to the ones a smaller one held out."""
    scored = sorted((held_out_score(f.path), sum(1 for line in f.text.splitlines() if line.strip()))
                    for f in iter_source_files(repo, SourceConfig(held_out_fraction=0.0)))
    lines, fraction = 0, start
    for score, n in scored:
        if score >= fraction:
            if lines >= min_lines or score >= cap:
                break
            fraction = min(cap, score + 1e-9)
        lines += n
    return fraction


def served(score: FimScore) -> FimScore:
    return FimScore([as_served(r) for r in score.results])


def compare(before: FimScore, after: FimScore, config: DecisionConfig = DecisionConfig()) -> Decision:
    """The paired decision over two scores of the same spans."""
    if [r.task for r in before.results] != [r.task for r in after.results]:
        raise TrainError(f"before ({before.n}) and after ({after.n}) were not scored on the same spans")
    return decide([r.similarity for r in before.results], [r.similarity for r in after.results],
                  [r.exact for r in before.results], [r.exact for r in after.results], config)


def refresh(model_dir: str | Path, repo: str | Path, out: str | Path, cfg: TrainConfig, *,
            seq_length: int | None = None, held_out_fraction: float | None = None,
            eval_config: FimEvalConfig = FimEvalConfig(), decision: DecisionConfig = DecisionConfig(),
            publish: str | None = None,
            publish_timeout_s: float = 600.0, resume: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> RefreshResult:
    """Steps 1-6 of the module docstring. A failed publish is reported in the result, not raised."""
    from .tokenize_data import held_out_list_path, read_held_out_list, tokenize_fim

    model_dir, out = Path(model_dir), Path(out)
    if cfg.tp > 1:  # refuse what tensor-parallel training does not support before tokenizing and evaluating
        from codefill.model.checkpoint import read_model_config

        from .train_config import check_train_tp

        check_train_tp(cfg, read_model_config(model_dir)[0])
    data = data_path(out)
    if not data.exists():
        if held_out_fraction is None:
            held_out_fraction = held_out_fraction_for(repo, eval_config.max_tasks)
        log(tokenize_fim(model_dir, Path(repo), data, seq_length or cfg.seq_length,
                         sources=SourceConfig(held_out_fraction=held_out_fraction)).report())
    root, held_out = read_held_out_list(held_out_list_path(data))
    tasks = make_tasks(root, held_out, eval_config)
    if not tasks:
        raise TrainError(f"no held-out files in {root} (listed in "
                         f"{held_out_list_path(data)}): nothing to measure the new weights on; pass a larger "
                         f"--held-out-fraction (and delete {data.parent} to re-tokenize)")
    log(f"evaluating {model_dir} on {len(tasks)} FIM spans from {len(held_out)} held-out files")
    before = served(evaluate_model_dir(model_dir, tasks, eval_config, progress="before" if progress else None))
    log("  " + before.report("before"))

    if cfg.dp > 1 or cfg.tp > 1:
        from .launch_train import train_on_ranks

        losses = train_on_ranks(model_dir, data, out, cfg, resume=resume)
        log(f"trained {len(losses)} steps on {cfg.dp * cfg.tp} ranks; final loss {losses[-1]:.4f}")
        new_dir = out / "model"
    else:
        from .trainer import train

        r = train(model_dir, data, out, cfg, resume=resume, progress=progress)
        if r.model_dir is None:
            raise TrainError(f"training in {out} stopped at step {r.steps} of {cfg.max_steps}: no model to evaluate")
        log(f"trained to step {r.steps}" + (f"; final loss {r.losses[-1]:.4f}" if r.losses else ""))
        new_dir = r.model_dir

    after = served(evaluate_model_dir(new_dir, tasks, eval_config, progress="after" if progress else None))
    result = RefreshResult(Path(new_dir), before, after, compare(before, after, decision))
    if publish is not None and result.better:
        from codefill.inference_workers.client import WorkerClient, WorkerError

        try:
            with WorkerClient(publish, timeout_s=publish_timeout_s) as client:
                result.weights_version = client.reload(result.model_dir).weights_version
            result.published = True
        except WorkerError as e:
            result.publish_error = str(e)
    return result
