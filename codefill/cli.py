"""`codefill`: the one command line for the whole product.

Each subcommand parses its arguments here and calls one function in the package that owns the work. Heavy
imports (MindSpore, torch) happen inside the subcommand, so `codefill --help` answers at once.

Errors that cross a boundary (bad config, bad checkpoint, bad tokenizer, bad arguments, a failing worker:
every subclass of `codefill.errors.CodefillError`) are printed as one `codefill: error: ...` line and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codefill.errors import CodefillError
from codefill.model.families import FAMILIES


class CliError(CodefillError):
    """Bad command-line input; the message names the offending argument and value."""


# --- subcommands ----------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> None:
    from codefill.model import convert

    if args.from_hf:
        out = convert.hf_to_model_dir(Path(args.from_hf), Path(args.output), family=args.family)
    else:
        out = convert.model_dir_to_hf(Path(args.to_hf), Path(args.output))
    print(f"wrote {out}")


def _model_or_bundled(args: argparse.Namespace, why: str = "") -> Path:
    """--model, or the bundled model when none is given (args.model is set to it); an install without the
    bundled model gets an error saying to give --model, and `why` if given."""
    if args.model is None:
        from codefill.bundled import bundled_model_dir

        if not (bundled_model_dir() / "config.json").exists():
            raise CliError(f"give --model MODEL_DIR (the bundled model {bundled_model_dir()} is not in this "
                           f"install){': ' + why if why else ''}")
        args.model = str(bundled_model_dir())
    return Path(args.model)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CliError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise CliError("--prompt-ids is empty")
    return ids


def _sampling(args: argparse.Namespace):
    from codefill.model.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _run(args: argparse.Namespace, prompt: list[int], stop_ids: frozenset[int]) -> list[int]:
    """Generate in this process, or with --tp N through N tensor-parallel worker ranks started for the call."""
    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    device = _device(args)
    max_seq_len = len(prompt) + args.max_new_tokens
    if args.tp is not None:
        from codefill.inference_workers.launch import generate_with_workers

        if args.tp < 1:
            raise CliError(f"--tp must be >= 1, got {args.tp}")
        out = generate_with_workers(Path(args.model), args.tp, prompt, args.max_new_tokens, _sampling(args),
                                    stop_ids=sorted(stop_ids), max_seq_len=max_seq_len, device=device)
        return [t for t, _ in out]
    from codefill.inference_workers.runner import Runner

    gen = Runner.from_model_dir(Path(args.model), max_seq_len=max_seq_len, max_batch=1, device=device)
    return [t for t, _ in gen.generate(prompt, args.max_new_tokens, _sampling(args), stop_ids=stop_ids)]


def _tokenizer(model_dir: Path):
    """The tokenizer of a MODEL_DIR or of a directory written by `codefill split`."""
    from codefill.inference_workers.sharding import load_tokenizer

    return load_tokenizer(model_dir)


def _emit(args: argparse.Namespace, ids: list[int], text: str) -> None:
    if args.json:
        print(json.dumps({"ids": ids, "text": text}, ensure_ascii=False))
    else:
        print(text)


def cmd_generate(args: argparse.Namespace) -> None:
    tok = _tokenizer(_model_or_bundled(args))
    prompt = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else tok.encode(args.prompt, bos=True)
    for i in prompt:
        if not 0 <= i < tok.vocab_size:
            raise CliError(f"prompt id {i} is outside the vocabulary [0, {tok.vocab_size})")
    ids = _run(args, prompt, frozenset({tok.eos_id}))
    _emit(args, ids, tok.decode([t for t in ids if t != tok.eos_id]))


def cmd_infill(args: argparse.Namespace) -> None:
    from codefill.model.fim import decode_middle, infilling_prompt_tokens

    tok = _tokenizer(_model_or_bundled(args))
    prompt = infilling_prompt_tokens(tok, args.prefix, args.suffix, spm=args.spm)
    ids = _run(args, prompt, frozenset(tok.stop_ids))
    _emit(args, ids, decode_middle(tok, ids))


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from codefill.lsp.server import Settings, main as serve_main

    _model_or_bundled(args, "the server tokenizes (workers see token ids only) and starts a worker on it unless "
                            "--endpoint names a running one")
    given = {  # Settings field: (flag, value); unset flags keep the Settings default
        "max_new_tokens": ("--max-new-tokens", args.max_new_tokens),
        "request_timeout_s": ("--request-timeout", args.request_timeout),
        "worker_max_seq_len": ("--worker-max-seq-len", args.worker_max_seq_len),
        "tp": ("--tp", args.tp),
    }
    for flag, value in given.values():
        if value is not None and value <= 0:
            raise CliError(f"{flag} must be positive, got {value}")
    values = {field: value for field, (_, value) in given.items() if value is not None}
    if args.endpoint is None:
        values["worker_device"] = _device(args)  # checked present before the server starts a worker on it
    settings = Settings(**values)
    # stdout carries JSON-RPC: logs go to stderr, which editors show in their LSP log.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="codefill-lsp %(levelname)s %(message)s")
    if args.tp is not None and args.endpoint is not None:
        raise CliError("--tp starts tensor-parallel workers; --endpoint uses running ones: give one of them")
    code = serve_main(model_dir=Path(args.model), endpoint=args.endpoint, settings=settings, tcp=args.tcp,
                      client_keys=_client_keys(args))
    if code:
        sys.exit(code)


def cmd_http(args: argparse.Namespace) -> None:
    import logging

    from codefill.http_api.server import HttpConfig, main as http_main, read_api_key
    from codefill.lsp.settings import Settings

    model = _model_or_bundled(args, "the server tokenizes (workers see token ids only) and starts a worker on it "
                                    "unless --endpoint names a running one")
    given = {"max_new_tokens": ("--max-new-tokens", args.max_new_tokens),
             "request_timeout_s": ("--request-timeout", args.request_timeout),
             "worker_max_seq_len": ("--worker-max-seq-len", args.worker_max_seq_len), "tp": ("--tp", args.tp)}
    for flag, value in given.values():
        if value is not None and value <= 0:
            raise CliError(f"{flag} must be positive, got {value}")
    if args.tp is not None and args.endpoint is not None:
        raise CliError("--tp starts tensor-parallel workers; --endpoint uses running ones: give one of them")
    if args.endpoint is not None:
        from codefill.inference_workers.protocol import WireError, check_endpoint

        try:
            check_endpoint(args.endpoint)
        except WireError as e:
            raise CliError(f"--endpoint: {e}") from e
    settings = Settings(endpoint=args.endpoint,
                        **{field: value for field, (_, value) in given.items() if value is not None})
    config = HttpConfig(host=args.host, port=args.port, allow_remote=args.allow_remote,
                        api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
                        model_name=args.model_name or model.name)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="codefill-http %(levelname)s %(message)s")
    http_main(model, settings, config, on_listening=lambda h, p: print(f"codefill: listening on http://{h}:{p}",
                                                                       file=sys.stderr, flush=True))


def _server_keys(args: argparse.Namespace):
    """CURVE keys for binding a non-local endpoint (both flags or neither)."""
    from codefill.inference_workers.security import ServerKeys

    given = (args.curve_secret_key, args.curve_authorized_clients)
    if given == (None, None):
        return None
    if None in given:
        raise CliError("--curve-secret-key and --curve-authorized-clients go together")
    return ServerKeys(Path(args.curve_secret_key), Path(args.curve_authorized_clients))


def _client_keys(args: argparse.Namespace):
    """serve: CURVE keys for a worker on another machine (both flags or neither, and only with --endpoint)."""
    from codefill.inference_workers.security import ClientKeys

    given = (args.curve_server_key, args.curve_secret_key)
    if given == (None, None):
        return None
    if None in given:
        raise CliError("--curve-server-key and --curve-secret-key go together")
    if args.endpoint is None:
        raise CliError("--curve-server-key / --curve-secret-key are for a remote --endpoint; give one")
    return ClientKeys(Path(args.curve_server_key), Path(args.curve_secret_key))


def cmd_worker(args: argparse.Namespace) -> None:
    from codefill.inference_workers.engine import EngineConfig
    from codefill.inference_workers.worker import main as worker_main

    d = EngineConfig()
    config = EngineConfig(
        max_queue=d.max_queue if args.max_queue is None else args.max_queue,
        prefill_chunk=d.prefill_chunk if args.prefill_chunk is None else args.prefill_chunk,
        step_timeout_s=d.step_timeout_s if args.step_timeout is None else args.step_timeout,
        drain_timeout_s=d.drain_timeout_s if args.drain_timeout is None else args.drain_timeout,
        prefix_reuse=not args.no_prefix_reuse, inflight_extension=not args.no_inflight_extension,
        speculate=d.speculate if args.speculate is None else args.speculate)
    worker_main(Path(args.model), args.endpoint, args.ready_file, max_seq_len=args.max_seq_len,
                max_batch=args.max_batch, parent_pid=args.parent_pid, config=config,
                allow_remote=args.allow_remote, keys=_server_keys(args), device=_device(args, check=False),
                memory=_memory(args))  # the worker checks the device itself, so its ready file reports a missing one


def cmd_keys(args: argparse.Namespace) -> None:
    from codefill.inference_workers.security import generate_keys

    public, secret = generate_keys(Path(args.output), args.name)
    print(f"public key {public} (copy it to the other side), secret key {secret} (keep it here)")


def cmd_workers(args: argparse.Namespace) -> None:
    from codefill.inference_workers.launch import run_workers

    code = run_workers(Path(args.model), args.tp, args.endpoint, master_addr=args.master_addr,
                       master_port=args.master_port, nnodes=args.nnodes, node_rank=args.node_rank,
                       log_dir=args.log_dir, max_seq_len=args.max_seq_len, max_batch=args.max_batch,
                       threads=args.threads, allow_remote=args.allow_remote, keys=_server_keys(args),
                       device=_device(args), memory=_memory(args))
    if code:
        sys.exit(code)


def cmd_split(args: argparse.Namespace) -> None:
    from codefill.inference_workers.sharding import split_model_dir

    out = split_model_dir(Path(args.model), args.tp, Path(args.output), overwrite=args.overwrite)
    print(f"wrote {args.tp} tensor-parallel shards to {out}")


def cmd_init_tiny(args: argparse.Namespace) -> None:
    from codefill.model.tiny import build_tiny_model_dir

    out = Path(args.output)
    if out.exists() and any(out.iterdir()):
        print(f"{out} already exists; keeping it")
        return
    build_tiny_model_dir(out, preset=args.preset, seed=args.seed)
    print(f"wrote an UNTRAINED tiny model (random weights, preset {args.preset}) to {out}")


def cmd_recipe(args: argparse.Namespace) -> None:
    from codefill.model.checkpoint import read_model_config
    from codefill.training.recipe import export_checkpoint, run_recipe

    if args.export_checkpoint is not None:
        if args.trainer != "torch":
            raise CliError("--export-checkpoint reads the torch trainer's checkpoints; add --trainer torch")
        model_dir = export_checkpoint(Path(args.output), Path(args.export_checkpoint))
        print(f"wrote {model_dir}: {read_model_config(model_dir)[2]}")
        return
    model_dir = run_recipe(Path(args.recipe), Path(args.output), progress=not args.no_progress, trainer=args.trainer,
                           corpus=args.corpus, time_budget_s=args.time_budget, prepare=args.prepare,
                           checkpoint_dtype=args.checkpoint_dtype, autocast=args.autocast, torch_compile=args.compile)
    if model_dir is None:
        print(f"prepared {args.output} (tokenizer, init, data); run without --prepare to train")
    else:
        print(f"wrote the trained model to {model_dir}")


def cmd_eval_humaneval(args: argparse.Namespace) -> None:
    from codefill.evaluation import humaneval

    config = humaneval.HumanEvalConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                       ks=tuple(int(k) for k in args.k.split(",")), max_new_tokens=args.max_new_tokens,
                                       limit=args.limit, seed=args.seed, workers=args.workers)
    device = _device(args) if args.endpoint is None else "cpu"  # with --endpoint the workers run the model
    summary = humaneval.run(_model_or_bundled(args), config, Path(args.out), endpoint=args.endpoint, device=device)
    print(humaneval.report(summary))


def cmd_eval_compare(args: argparse.Namespace) -> None:
    from codefill.evaluation import compare
    from codefill.training.paired_decision import DecisionConfig

    report = compare.run(args.a, args.b, args.out, DecisionConfig(confidence=args.confidence, seed=args.seed))
    print(compare.markdown(report))
    print(f"report written to {args.out}")


def cmd_eval_infill(args: argparse.Namespace) -> None:
    from codefill.evaluation import infilling
    from codefill.training.fim_eval import FimEvalConfig

    modes = tuple(m for m in args.modes.split(",") if m)
    blank = {} if args.blank_line_min_tokens is None else {"blank_line_min_tokens": args.blank_line_min_tokens}
    fim = FimEvalConfig(max_tasks=args.fim_tasks, max_new_tokens=args.fim_max_new_tokens, **blank)
    config = infilling.InfillConfig(modes=modes or infilling.MODES, spm=not args.psm, limit=args.limit,
                                    workers=args.workers, **blank)
    held = None
    if args.recipe is not None:
        from codefill.training.recipe import load_recipe

        given = [f for f, v in (("--source", args.source), ("--held-out-fraction", args.held_out_fraction),
                                ("--extensions", args.extensions), ("--exclude", args.exclude)) if v is not None]
        if given:
            raise CliError(f"--recipe {args.recipe} sets the held-out files; drop {', '.join(given)}")
        held = infilling.HeldOutConfig.of_recipe(load_recipe(args.recipe), fim)
    elif args.source is not None:  # flags not given keep of_source's defaults
        given = {"exclude": tuple(e for e in (args.exclude or "").split(",") if e)}
        if args.held_out_fraction is not None:
            given["held_out_fraction"] = args.held_out_fraction
        if args.extensions is not None:
            given["extensions"] = tuple(e for e in args.extensions.split(",") if e) or None
        held = infilling.HeldOutConfig.of_source(args.source, fim, **given)
    device = _device(args) if args.endpoint is None else "cpu"  # with --endpoint the workers run the model
    summary = infilling.run(_model_or_bundled(args), Path(args.out), config, held_out=held, baseline=args.baseline,
                            humaneval=not args.no_humaneval, endpoint=args.endpoint, device=device)
    print(infilling.report(summary))


def cmd_demo(args: argparse.Namespace) -> None:
    from codefill.demo import run_demo

    from codefill.bundled import bundled_model_dir

    run_demo(Path(args.model) if args.model else bundled_model_dir())


def cmd_data_alpaca(args: argparse.Namespace) -> None:
    from codefill.training.alpaca import convert_alpaca_file

    summary = convert_alpaca_file(Path(args.input), Path(args.output), skip_invalid=args.skip_invalid,
                                  overwrite=args.overwrite)
    print(summary.report())


def cmd_data_tokenize(args: argparse.Namespace) -> None:
    from codefill.training import tokenize_data

    model, src, out = Path(args.model), Path(args.input), Path(args.output)
    if args.mode == "instruct":
        summary = tokenize_data.tokenize_instruct(model, src, out, args.seq_length, truncate=args.truncate,
                                                  overwrite=args.overwrite)
    elif args.mode == "pretrain":
        summary = tokenize_data.tokenize_pretrain(model, src, out, args.seq_length, overwrite=args.overwrite)
    else:
        from codefill.training.fim_examples import FimConfig
        from codefill.training.source_files import SourceConfig

        extensions = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e) \
            if args.extensions else None
        summary = tokenize_data.tokenize_fim(
            model, src, out, args.seq_length,
            fim=FimConfig(fim_rate=args.fim_rate, spm_rate=args.spm_rate, seed=args.seed,
                          line_rate=args.line_rate, line_lines=args.line_lines, window_tokens=args.window_tokens,
                          pack=args.pack, passes=args.passes),
            sources=SourceConfig(max_file_bytes=args.max_file_bytes, extensions=extensions,
                                 held_out_fraction=args.held_out_fraction),
            overwrite=args.overwrite)
    print(summary.report())


# --- corpus (issue 16): `data corpus`, `data pin` ---


def cmd_data_corpus(args: argparse.Namespace) -> None:
    from codefill.training.corpus import DEFAULT_CACHE, CorpusConfig, build_corpus

    config = CorpusConfig.load(args.corpus)
    tokenizer = Path(args.tokenizer) if args.tokenizer else _model_or_bundled(args) / "tokenizer.model"
    build_corpus(config, Path(args.output), cache=Path(args.cache) if args.cache else DEFAULT_CACHE,
                 source_dir=Path(args.source_dir) if args.source_dir else None,
                 stdlib_root=Path(args.stdlib_root) if args.stdlib_root else None, tokenizer=tokenizer)
    print((Path(args.output) / "CORPUS.md").read_text().split("## Packages")[0].rstrip())


def cmd_data_pin(args: argparse.Namespace) -> None:
    from codefill.training.sdists import pin_from_pypi

    for requirement in args.requirements:
        print(pin_from_pypi(requirement).line())


def _add_corpus_commands(data) -> None:
    p = data.add_parser("corpus", help="a permissively licensed corpus from pinned PyPI sdists and the standard "
                                       "library: xz text shards and a data card")
    p.add_argument("corpus", metavar="CORPUS.toml", help="e.g. recipes/corpus/pypi.toml")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--cache", help="download cache (default ~/.cache/codefill/corpus)")
    p.add_argument("--source-dir", help="read the pinned archives from this folder (no network)")
    p.add_argument("--stdlib-root", help="use this folder as the standard library")
    p.add_argument("--tokenizer", help="tokenizer.model to count tokens with (default: --model's)")
    _model_arg(p, required=False, help="whose tokenizer counts tokens (default: the bundled model)")
    p.set_defaults(func=cmd_data_corpus)
    p = data.add_parser("pin", help="print pins-file lines (NAME==VERSION sha256:HEX URL) from PyPI's JSON API")
    p.add_argument("requirements", nargs="+", metavar="NAME==VERSION")
    p.set_defaults(func=cmd_data_pin)


def cmd_bench(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model = Path(args.model) if args.model else None
    device = _device(args)
    if device != "cpu" and (args.what in ("lsp", "profile", "size") or (args.what == "workers" and not args.skip_tp)):
        raise CliError(f"bench {args.what}{'' if args.skip_tp else ' (with its TP part)'} runs on cpu only so far, "
                       f"not --device {device}")
    if args.what == "model":
        from codefill.bench_model import run

        report = run(out, preset=args.preset, device=device)
    elif args.what == "workers":  # (a) TP=1 vs TP=2; (b) keystroke replay; (c) concurrent typists
        from codefill import bench_workers, bench_workers_tp

        report = {}
        if not args.skip_tp:
            report["tp"] = bench_workers_tp.run(out, preset=args.preset)
        report["keystrokes"] = bench_workers.run(out, model_dir=model, preset=args.preset, device=device)
    elif args.what == "train":
        from codefill.bench_train import run

        if args.recipe:  # the recipe's architecture and row shape, e.g. to choose a model size by throughput
            from codefill.training.recipe import load_recipe

            recipe = load_recipe(args.recipe)
            report = run(out, preset=recipe.name, seq_length=recipe.train.seq_length,
                         micro_batch=recipe.train.micro_batch, grad_accum=1, steps=3, arch=recipe.arch_config(),
                         device=device)
        else:
            report = run(out, preset=args.preset, device=device)
    elif args.what == "lsp":
        from codefill.bench_lsp import run

        report = run(out, model_dir=model, preset=args.preset)
    elif args.what == "size":  # the largest model the CPU serves within the bundled model's limits
        from codefill.bench_size import run
        from codefill.bundled import bundled_model_dir

        # --model: that trained model beside the bundled one, measured against the same limits
        bundled = bundled_model_dir()
        report = run(out) if model is None else run(out, models={f"bundled ({bundled.name})": bundled,
                                                                  str(model): model})
    elif args.what == "speculation":
        from codefill.bench_speculation import run

        report = run(out, model_dir=model)
    elif args.what == "profile":
        from codefill.bench_profile import run

        report = run(out, preset=args.preset)
    else:  # argparse restricts the choices
        raise CliError(f"unknown benchmark {args.what!r}")
    print(json.dumps(report, indent=2))
    print(f"report written to {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from codefill.training.train_config import LoraConfig, preset

    device = _device(args)  # before anything is read: a device that is not here is the first error
    if args.repo and device != "cpu":
        raise CliError(f"--repo (refresh) runs on cpu only so far, not --device {device}")
    cfg = preset(args.preset or ("refresh" if args.repo else "lora"))
    overrides = {k: getattr(args, k) for k in ("max_steps", "lr", "end_lr", "warmup_ratio", "micro_batch",
                                               "grad_accum", "clip_norm", "weight_decay", "save_every",
                                               "keep_last", "eval_every", "seed") if getattr(args, k) is not None}
    cfg = replace(cfg, dp=args.dp, tp=args.tp, **overrides)
    if args.full:
        cfg = replace(cfg, lora=None)
    elif any(v is not None for v in (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)):
        base = cfg.lora or LoraConfig()
        cfg = replace(cfg, lora=LoraConfig(
            rank=args.lora_rank or base.rank, alpha=args.lora_alpha or base.alpha,
            dropout=base.dropout if args.lora_dropout is None else args.lora_dropout,
            targets=tuple(args.lora_targets.split(",")) if args.lora_targets else base.targets))
    out = Path(args.output)
    data = Path(args.data) if args.data else None
    if args.repo:  # refresh: tokenize, evaluate, finetune, evaluate, decide, publish (training/refresh.py)
        _refresh(args, cfg, out)
        return
    if args.publish:
        raise CliError("--publish needs --repo: only a refresh measures the new weights before publishing them")
    if data is None:
        raise CliError("give --data DATA.mindrecord or --repo PATH")
    held = Path(args.held_out_data) if args.held_out_data else None
    if cfg.dp > 1 or cfg.tp > 1:
        from codefill.training.launch_train import train_on_ranks

        losses = train_on_ranks(Path(args.model), data, out, cfg, held_out_data=held, resume=args.resume,
                                device=device)
        ranks = f"{cfg.dp} data-parallel" if cfg.tp == 1 else f"{cfg.tp} tensor-parallel"
        last = f"; final loss {losses[-1]:.4f}" if losses else ""
        print(f"trained {len(losses)} steps on {ranks} ranks{last}; model in {out / 'model'}")
    else:
        from codefill.training.trainer import train

        r = train(Path(args.model), data, out, cfg, held_out_data=held, resume=args.resume, device=device)
        last = f"; final loss {r.losses[-1]:.4f}" if r.losses else ""
        print(f"trained to step {r.steps}{last}, {r.tokens_per_s:,.0f} tokens/s; model in {r.model_dir}")


def _refresh(args: argparse.Namespace, cfg, out: Path) -> None:
    from dataclasses import replace

    from codefill.inference_workers.client import WorkerError
    from codefill.training.fim_eval import FimEvalConfig
    from codefill.training.paired_decision import DecisionConfig
    from codefill.training.refresh import refresh

    if args.data or args.held_out_data:
        raise CliError("--repo makes its own rows and held-out files; drop --data / --held-out-data")
    if args.publish:
        from codefill.inference_workers.protocol import WireError, check_endpoint

        try:
            check_endpoint(args.publish)
        except WireError as e:
            raise CliError(f"--publish: {e}") from e
    eval_cfg = FimEvalConfig()
    if args.eval_tasks is not None:
        eval_cfg = replace(eval_cfg, max_tasks=args.eval_tasks)
    if args.eval_max_new_tokens is not None:
        eval_cfg = replace(eval_cfg, max_new_tokens=args.eval_max_new_tokens)
    decision = DecisionConfig()
    if args.min_improvement is not None:
        decision = replace(decision, min_improvement=args.min_improvement)
    kwargs = {} if args.held_out_fraction is None else {"held_out_fraction": args.held_out_fraction}
    result = refresh(Path(args.model), Path(args.repo), out, cfg, seq_length=args.seq_length, eval_config=eval_cfg,
                     decision=decision, publish=args.publish, resume=args.resume, **kwargs)
    print(result.report())
    if args.publish and not result.better:
        print(f"not published to {args.publish}")
    if result.publish_error is not None:
        raise WorkerError(f"publishing {result.model_dir} to {args.publish} failed: {result.publish_error}")


def cmd_merge(args: argparse.Namespace) -> None:
    from codefill.inference_workers.sharding import merge_split_dir

    out = merge_split_dir(Path(args.input), Path(args.output), overwrite=args.overwrite)
    print(f"merged tensor-parallel shards of {args.input} into {out}")


# --- parser ---------------------------------------------------------------------------------------------
# One builder per group of subcommands, called in the order `codefill --help` lists them; option sets that
# several subcommands share are defined once, in the helpers below.


def _model_arg(p: argparse.ArgumentParser, *, required: bool = True, metavar: str | None = "MODEL_DIR",
               help: str | None = None) -> None:
    p.add_argument("--model", required=required, metavar=metavar, help=help)


def _bundled_model_arg(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--model for the commands that take the bundled model without it (the command calls _model_or_bundled)."""
    default = "default: the bundled model, models/codefill-pypi-5m"
    _model_arg(p, required=False, help=f"{help} ({default})" if help else default)


def _generation_args(p: argparse.ArgumentParser) -> None:
    """generate and infill: how many tokens, how they are sampled, the output, and where the model runs."""
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help='print {"ids": [...], "text": "..."} on the last line')
    p.add_argument("--tp", type=int, help="run on N tensor-parallel worker ranks (msrun) instead of in-process")
    _device_arg(p)


def _cache_args(p: argparse.ArgumentParser, *, max_seq_len_help: str, max_batch_help: str) -> None:
    """worker and workers: the KV cache's slots, where the model runs, and the memory plan that sizes the cache
    when the slots are not given (inference_workers/memory_plan.py)."""
    from codefill.inference_workers.startup import SERVING_SLOTS  # the one default, shared with the launchers

    p.add_argument("--max-seq-len", type=int, help=f"{max_seq_len_help}; default: as the memory plan allows")
    p.add_argument("--max-batch", type=int,
                   help=f"{max_batch_help}; default: as many as fit in memory, at most {SERVING_SLOTS}")
    _device_arg(p)
    p.add_argument("--device-memory", type=float, metavar="GiB",
                   help="memory per device for the memory plan (default: measured; $CODEFILL_DEVICE_MEMORY)")
    p.add_argument("--memory-fraction", type=float, help="share of that memory the plan may use (default 0.9)")


def _device_arg(p: argparse.ArgumentParser) -> None:
    """--device and --precision, for every command that runs the model (resolved by _device)."""
    p.add_argument("--device", help="where the model runs: cpu, ascend or gpu (default: $CODEFILL_DEVICE, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="weights, activations and KV cache (default: $CODEFILL_PRECISION, else fp32 on cpu and bf16 "
                        "on accelerators; model/precision.py)")


def _device(args: argparse.Namespace, check: bool = True) -> str:
    """--device, else $CODEFILL_DEVICE, else cpu; DeviceError unless that device is present here (check).
    --precision is checked against it and exported as $CODEFILL_PRECISION to every process the command starts."""
    import os

    from codefill.model.device import device_setting, resolve_device
    from codefill.model.precision import PRECISION_ENV, resolve

    device = resolve_device(args.device) if check else device_setting(args.device)
    precision = resolve(getattr(args, "precision", None), device)
    if getattr(args, "precision", None):
        os.environ[PRECISION_ENV] = precision
    return device


def _memory(args: argparse.Namespace):
    from codefill.inference_workers.memory_plan import MemoryConfig

    return MemoryConfig.from_flags(args.device_memory, args.memory_fraction)


def _remote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-remote", action="store_true",
                   help="allow binding an endpoint other machines can reach (needs the CURVE keys below)")
    p.add_argument("--curve-secret-key", metavar="NAME.key_secret", help="this worker's CURVE key pair")
    p.add_argument("--curve-authorized-clients", metavar="DIR", help="directory of client NAME.key files allowed in")


def _eval_run_args(p: argparse.ArgumentParser) -> None:
    """eval humaneval and eval infill: the sandbox's parallelism, the report's directory, running workers."""
    p.add_argument("--workers", type=int, default=2, help="sandboxed test processes at a time")
    p.add_argument("--out", default="eval_results", metavar="DIR")
    p.add_argument("--endpoint", help="evaluate the workers serving MODEL_DIR there (e.g. `codefill workers --tp N`); "
                                      "MODEL_DIR then gives only the tokenizer")
    _device_arg(p)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """convert, generate, infill."""
    p = sub.add_parser("convert", help="convert between Hugging Face and codefill model directories")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="HF_DIR")
    g.add_argument("--to-hf", metavar="MODEL_DIR")
    p.add_argument("--output", required=True)
    p.add_argument("--family", choices=list(FAMILIES), default=None,
                   help="with --from-hf: the model family, when the checkpoint does not show it (default: from "
                        "its model_type and tokenizer files)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="continue a prompt")
    _bundled_model_arg(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", metavar="TEXT")
    g.add_argument("--prompt-ids", metavar="1,2,3")
    _generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("infill", help="fill in the middle between a prefix and a suffix")
    _bundled_model_arg(p)
    p.add_argument("--prefix", required=True)
    p.add_argument("--suffix", required=True)
    p.add_argument("--spm", action="store_true", help="suffix-prefix-middle order where the family was trained with it (Code Llama); "
                        "default prefix-suffix-middle")
    _generation_args(p)
    p.set_defaults(func=cmd_infill)


def _add_serve_commands(sub: argparse._SubParsersAction) -> None:
    """serve (the language server), http (the HTTP APIs), worker and workers (inference), keys (for remote
    workers), split (shards)."""
    p = sub.add_parser("serve", help="run the language server")
    p.add_argument("--stdio", action="store_true", help="speak LSP over stdin/stdout (the default)")
    p.add_argument("--tcp", metavar="[HOST:]PORT", help="serve one LSP client on a loopback TCP port instead of stdio")
    p.add_argument("--tp", type=int, help="start N tensor-parallel worker ranks (msrun) instead of one worker")
    _bundled_model_arg(p, "its tokenizer; and a worker on it unless --endpoint")
    p.add_argument("--endpoint", help="a running worker's ZeroMQ endpoint (ipc://PATH or tcp://127.0.0.1:PORT)")
    p.add_argument("--max-new-tokens", type=int, help="longest middle, in tokens (default: lsp.server.Settings)")
    p.add_argument("--worker-max-seq-len", type=int, help="context length of the worker this server starts")
    p.add_argument("--request-timeout", type=float, help="seconds of worker silence before a request fails")
    _device_arg(p)
    p.add_argument("--curve-server-key", metavar="WORKER.key", help="--endpoint on another machine: its public key")
    p.add_argument("--curve-secret-key", metavar="NAME.key_secret",
                   help="--endpoint on another machine: this client's key pair (its NAME.key is in the worker's list)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("http", help="serve llama.cpp's /infill and OpenAI's /v1/completions on the same workers")
    p.add_argument("--port", type=int, default=8012, help="TCP port (default %(default)s, llama.vim's; 0: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (others than loopback: --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other machines can reach (needs --api-key-file)")
    p.add_argument("--api-key-file", metavar="FILE", help="a file holding the key clients send as 'Bearer KEY'")
    p.add_argument("--tp", type=int, help="start N tensor-parallel worker ranks (msrun) instead of one worker")
    _bundled_model_arg(p, "its tokenizer; and a worker on it unless --endpoint")
    p.add_argument("--endpoint", help="a running worker's ZeroMQ endpoint (ipc://PATH or tcp://127.0.0.1:PORT)")
    p.add_argument("--model-name", help="the model id /v1/models answers (default: MODEL_DIR's name)")
    p.add_argument("--max-new-tokens", type=int, help="longest answer when a request names none (default 64)")
    p.add_argument("--worker-max-seq-len", type=int, help="context length of the worker this server starts")
    p.add_argument("--request-timeout", type=float, help="seconds of worker silence before a request fails")
    p.set_defaults(func=cmd_http)

    p = sub.add_parser("worker", help="run one inference worker (one process, TP=1) on a ZeroMQ endpoint")
    _model_arg(p)
    p.add_argument("--endpoint", required=True, help="ipc://PATH or tcp://127.0.0.1:PORT (others: --allow-remote)")
    p.add_argument("--ready-file", help="where to write the ready/error status JSON")
    _cache_args(p, max_seq_len_help="positions per cache slot (prompt + new tokens)",
                max_batch_help="cache slots: requests decoded together")
    p.add_argument("--max-queue", type=int, help="waiting requests before OVERLOADED")
    p.add_argument("--prefill-chunk", type=int, help="prompt ids prefilled per engine iteration")
    p.add_argument("--step-timeout", type=float, help="seconds; a longer model call fails the worker (not ready)")
    p.add_argument("--drain-timeout", type=float, help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--no-prefix-reuse", action="store_true")
    p.add_argument("--no-inflight-extension", action="store_true")
    p.add_argument("--speculate", type=int, metavar="N",
                   help="ids a lone greedy request drafts from its own context per step (0: off; default 4)")
    p.add_argument("--parent-pid", type=int, help="exit when this process stops being the parent")
    _remote_args(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("keys", help="make a CURVE key pair (NAME.key public, NAME.key_secret) for remote workers")
    p.add_argument("--output", required=True, help="directory to write the two files into")
    p.add_argument("--name", required=True, help="e.g. worker, or the client's host name")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("workers", help="run N tensor-parallel worker ranks with msrun behind one ZeroMQ endpoint")
    _model_arg(p, metavar=None, help="a MODEL_DIR or a directory written by `codefill split`")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size: ranks in all")
    p.add_argument("--endpoint", help="ZeroMQ endpoint rank 0 binds (default: ipc:// in a private directory)")
    p.add_argument("--master-addr", default="127.0.0.1", help="msrun's master address (multi-node)")
    p.add_argument("--master-port", type=int, help="msrun's master port (default: a free one; fixed for multi-node)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job; each runs tp/nnodes ranks")
    p.add_argument("--node-rank", type=int, default=0, help="this node's index; rank 0 (the server) is on node 0")
    p.add_argument("--log-dir", help="msrun's log directory (default: in the private run directory)")
    _cache_args(p, max_seq_len_help="positions per cache slot (default: 2048, or the model's own if fewer)",
                max_batch_help="cache slots (concurrent sequences)")
    p.add_argument("--threads", type=int, help="kernel threads per rank (default: cores / local ranks)")
    _remote_args(p)
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("split", help="pre-split a model into tensor-parallel shards, one file per rank")
    _model_arg(p)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_split)


def _add_new_model_commands(sub: argparse._SubParsersAction) -> None:
    """init-tiny (random weights), recipe (trained from scratch), demo (a live completion from one)."""
    p = sub.add_parser("init-tiny", help="build an untrained tiny model directory (random weights) for demos")
    p.add_argument("--output", required=True)
    p.add_argument("--preset", default="tiny-test")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("recipe", help="train a small model from scratch as a recipe file says (tokenizer, "
                                      "FIM data, training); run again to continue an interrupted run")
    p.add_argument("recipe", metavar="RECIPE.toml", help="e.g. recipes/codefill-pypi-cpu.toml")
    p.add_argument("--output", required=True, metavar="OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    p.add_argument("--trainer", choices=["mindspore", "torch"], default="mindspore",
                   help="torch: the PyTorch trainer (bf16 on CUDA), for a GPU machine")
    p.add_argument("--corpus", metavar="DIR", help="the `codefill data corpus` directory, in place of the recipe's")
    p.add_argument("--prepare", action="store_true", help="stop before training: tokenizer, init and rows only")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="torch: stop cleanly with a checkpoint before this many seconds; run again to continue")
    p.add_argument("--checkpoint-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="torch: weights in checkpoints (bfloat16 halves what comes back from a GPU machine)")
    p.add_argument("--autocast", choices=["bf16", "fp32"],
                   help="torch: matrix products in bf16 with float32 weights (default: bf16 on CUDA, fp32 on a CPU; "
                        "bf16 is faster on CPUs with AVX512-BF16 or AMX)")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the training forward and loss")
    p.add_argument("--export-checkpoint", metavar="MODEL_DIR",
                   help="torch: write OUT's newest checkpoint as a MODEL_DIR and stop (to evaluate a run in progress)")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("demo", help="start the language server on a model and show a live completion")
    _bundled_model_arg(p)
    p.set_defaults(func=cmd_demo)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """data alpaca, data tokenize."""
    data = sub.add_parser("data", help="prepare training data").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("alpaca", help="code-alpaca records -> conversations JSON (the seed's prompt template)")
    p.add_argument("--input", required=True, metavar="code_alpaca.json")
    p.add_argument("--output", required=True, metavar="conversations.json")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed records instead of failing")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_data_alpaca)

    p = data.add_parser("tokenize", help="tokenize into MindRecord rows of seq_length+1 ids and labels")
    p.add_argument("--mode", required=True, choices=["instruct", "pretrain", "fim"],
                   help="instruct: conversations, prompt labels masked; pretrain: packed text; "
                        "fim: a source directory or git repository with fill-in-the-middle examples")
    _model_arg(p, help="whose tokenizer to use")
    p.add_argument("--input", required=True, help="conversations JSON, text documents, or a source directory")
    p.add_argument("--output", required=True, metavar="OUT.mindrecord")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--truncate", action="store_true", help="instruct: cut over-long conversations (else dropped)")
    p.add_argument("--fim-rate", type=float, default=0.9)
    p.add_argument("--spm-rate", type=float, default=0.5)
    p.add_argument("--line-rate", type=float, default=0.0, help="fim: share of middles cut at line starts")
    p.add_argument("--line-lines", type=int, default=0,
                   help="fim: a line-cut middle is 1 to this many lines (0: between two random line starts)")
    p.add_argument("--window-tokens", type=int, default=0, help="fim: shorter documents (0: a row's worth)")
    p.add_argument("--pack", action="store_true", help="fim: several whole examples per row")
    p.add_argument("--passes", type=int, default=1, help="fim: examples drawn this many times (seed + k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-fraction", type=float, default=0.05, help="fim: files held out for evaluation")
    p.add_argument("--max-file-bytes", type=int, default=1_000_000)
    p.add_argument("--extensions", help="fim: only these, e.g. .py,.js")
    p.set_defaults(func=cmd_data_tokenize)
    _add_corpus_commands(data)


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """train (finetune or refresh)."""
    p = sub.add_parser("train", help="finetune a model (full or LoRA) on tokenized rows or on a repository (FIM)")
    _model_arg(p)
    p.add_argument("--data", metavar="DATA.mindrecord", help="rows from `codefill data tokenize`")
    p.add_argument("--repo", metavar="PATH", help="refresh: FIM rows from this repository, LoRA by default")
    p.add_argument("--output", required=True, metavar="OUT")
    p.add_argument("--preset", help="training preset: lora (default), full, refresh (--repo), tiny-test")
    p.add_argument("--held-out-data", metavar="HELD.mindrecord", help="else a few rows of DATA are held out")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in OUT")
    p.add_argument("--dp", type=int, default=1, help="data-parallel ranks (msrun)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (msrun), sharded as serving shards; full finetune only, not with --dp")
    p.add_argument("--seq-length", type=int, help="--repo: positions per row")
    p.add_argument("--publish", metavar="ENDPOINT",
                   help="--repo: if the new weights score better on the held-out files, make the workers at "
                        "ENDPOINT serve them (no request dropped; a bad checkpoint is refused)")
    p.add_argument("--min-improvement", type=float, metavar="MARGIN",
                   help="--repo: better only if the 95%% interval of the gain in mean edit similarity lies above "
                        "MARGIN (0.01) and no measure got significantly worse")
    p.add_argument("--held-out-fraction", type=float,
                   help="--repo: share of files held out for evaluation (default 0.05, raised up to 0.2 until the "
                        "held-out files hold a line for every evaluated span)")
    p.add_argument("--eval-tasks", type=int, help="--repo: held-out FIM spans evaluated before and after (256)")
    p.add_argument("--eval-max-new-tokens", type=int, help="--repo: longest answer per FIM task (64)")
    for name, typ in (("max-steps", int), ("lr", float), ("end-lr", float), ("warmup-ratio", float),
                      ("micro-batch", int), ("grad-accum", int), ("clip-norm", float), ("weight-decay", float),
                      ("save-every", int), ("keep-last", int), ("eval-every", int), ("seed", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--full", action="store_true", help="full finetune instead of LoRA")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help="comma-separated of wq,wk,wv,wo,w1,w2,w3")
    _device_arg(p)
    p.set_defaults(func=cmd_train)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """eval humaneval, eval infill, eval compare."""
    evals = sub.add_parser("eval", help="measure a model: HumanEval pass@k, infilling, held-out FIM"
                           ).add_subparsers(dest="eval_command", required=True)
    p = evals.add_parser("humaneval", help="HumanEval pass@k (unbiased estimator), every sample run in a sandbox")
    _bundled_model_arg(p)
    p.add_argument("--samples", type=int, default=1, help="samples per problem (n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (then --samples must be 1)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus cut when sampling")
    p.add_argument("--k", default="1", help="comma-separated k values of pass@k, each <= --samples")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--limit", type=int, help="only the first N problems")
    p.add_argument("--seed", type=int, default=0)
    _eval_run_args(p)
    p.set_defaults(func=cmd_eval_humaneval)

    p = evals.add_parser("infill", help="HumanEval single/multi-line infilling (tests run) and held-out FIM "
                                        "(exact match, edit similarity), for a model or the n-gram baseline")
    _bundled_model_arg(p, "with --baseline: only its tokenizer is used")
    p.add_argument("--baseline", choices=["ngram"], help="score the n-gram/copy baseline instead of the model")
    p.add_argument("--modes", default="single,multi", help="HumanEval infilling modes: single, multi")
    p.add_argument("--no-humaneval", action="store_true", help="held-out FIM only")
    p.add_argument("--psm", action="store_true", help="PSM prompts (default SPM, as the language server sends)")
    p.add_argument("--blank-line-min-tokens", type=int, metavar="N",
                   help="on a blank cursor line, no <EOT> before N ids (default: the language server's setting "
                        "blank_line_min_tokens); 0: the model's own first choice")
    p.add_argument("--limit", type=int, help="at most N HumanEval infilling tasks per mode (evenly spread)")
    p.add_argument("--source", metavar="DIR", help="held-out FIM on this directory or repository ('stdlib': the "
                                                  "Python standard library); the baseline's train files")
    p.add_argument("--held-out-fraction", type=float, help="share of files held out, by path hash (default 0.05)")
    p.add_argument("--extensions", help="comma-separated (default .py); empty: every text file")
    p.add_argument("--exclude", help="comma-separated fnmatch patterns of paths to skip")
    p.add_argument("--recipe", metavar="RECIPE.toml", help="held-out FIM on the held-out files of the recipe that "
                                                           "trained MODEL_DIR: its source, filters and split")
    p.add_argument("--fim-tasks", type=int, default=256, help="held-out FIM tasks")
    p.add_argument("--fim-max-new-tokens", type=int, default=64)
    _eval_run_args(p)
    p.set_defaults(func=cmd_eval_infill)

    p = evals.add_parser("compare", help="two evaluations of the same tasks, paired: per mode and measure, the "
                                         "difference B - A with a bootstrap interval and a sign test")
    p.add_argument("a", metavar="A_DIR", help="an `eval infill` or `eval humaneval` --out folder (model A)")
    p.add_argument("b", metavar="B_DIR", help="the same evaluation of model B")
    p.add_argument("--out", default="eval_results/compare")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap resamples")
    p.set_defaults(func=cmd_eval_compare)


def _add_merge_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge tensor-parallel shards (a split directory) back into one MODEL_DIR")
    p.add_argument("--input", required=True, metavar="SPLIT_DIR")
    p.add_argument("--output", required=True, metavar="MODEL_DIR")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and write its report")
    p.add_argument("what", choices=["model", "workers", "lsp", "train", "profile", "speculation", "size"])
    p.add_argument("--preset", default="small", help="architecture of the random-weight model benchmarked")
    _model_arg(p, required=False, help="workers/lsp/speculation: benchmark this model instead of a preset; "
                                       "size: this trained model beside the bundled one, against the same limits")
    p.add_argument("--skip-tp", action="store_true", help="workers: skip part (a), TP=1 vs TP=2")
    p.add_argument("--recipe", metavar="RECIPE.toml", help="train: time the recipe's model and rows instead")
    p.add_argument("--out", default="bench_results")
    _device_arg(p)
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codefill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_model_commands(sub)
    _add_serve_commands(sub)
    _add_new_model_commands(sub)
    _add_data_commands(sub)
    _add_train_commands(sub)
    _add_eval_commands(sub)
    _add_merge_command(sub)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from codefill import native_logs

    native_logs.quiet()  # before anything imports mindspore, here and in every process we start
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except CodefillError as e:  # bad input or environment; anything else is a bug and keeps its traceback
        where = f" ({native_logs.where()})" if "mindspore" in sys.modules else ""
        print(f"codefill: error: {e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
