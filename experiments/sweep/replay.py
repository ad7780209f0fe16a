"""Score the replica's generations with codefill's own evaluation: the same tasks, prompts, cuts at <EOT>/EOS
and at the end of the line, and the same sandboxed test runs as `codefill eval infill`; only the model's
forward passes happened elsewhere. Run from the repository root:

    .venv/bin/python experiments/sweep/replay.py SWEEP.json [...]

writes eval_results/sweep/NAME/infill.json (+ the per-task rows) for every run, and adds each run's
configuration, learning curve and scores (not its generations) to experiments/sweep/results.json.
"""
import json
import sys
from pathlib import Path

from codefill.evaluation import infilling
from codefill.evaluation.infilling import HeldOutConfig, InfillConfig
from codefill.model.tokenizer import Tokenizer
from codefill.training.fim_eval import FimEvalConfig
from codefill.training.recipe import load_recipe

HERE = Path(__file__).parent
RESULTS = HERE / "results.json"
prompts = json.loads((HERE / "carry" / "prompts.json").read_text())
tok = Tokenizer("models/codefill-stdlib/tokenizer.model")
held = HeldOutConfig.of_recipe(load_recipe("recipes/codefill-stdlib-v3.toml"),
                               FimEvalConfig(max_tasks=256, max_new_tokens=64))
results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}

for path in sys.argv[1:]:
    for name, r in json.loads(Path(path).read_text()).items():
        table = {tuple(p): g for k in ("single", "held") for p, g in zip(prompts[k], r["generated"][k])}

        def complete(prompt, max_new, stops):
            return table[tuple(prompt)]  # a KeyError here: the prompts are not the ones generated from

        s = infilling._score(complete, tok, 1024, f"replica {name} {r['config']}", "infill", "replica",
                             Path("eval_results/sweep") / name, InfillConfig(modes=("single",)), held, True, False)
        one, eol, h = s["humaneval_infilling"]["single"], s["humaneval_infilling"]["single_eol"], s["held_out_fim"]
        served = s["humaneval_infilling"]["single_served"]
        results[name] = {
            "config": r["config"], "parameters": r["params"], "train_s_gpu": r["train_s"],
            "held_out_loss": round(r["held_out_loss"], 4),
            "curve": [{"step": c["step"], "held_out_loss": round(c["held_out_loss"], 4)} for c in r["curve"]],
            "single_pass": one["pass@1"], "single_eol_pass": eol["pass@1"], "single_eol_exact": eol["exact_match"],
            "single_eol_similarity": round(eol["edit_similarity"], 4), "single_stopped_with_eot": one["stopped_with_eot"],
            "held_out_exact": h["exact_match"], "held_out_similarity": round(h["edit_similarity"], 4),
            "held_out_stopped": r["eot"]["held"], "single_served_pass": served["pass@1"],
            "single_served_exact": served["exact_match"], "held_out_served_exact": h["served"]["exact_match"],
            "held_out_served_similarity": round(h["served"]["edit_similarity"], 4)}
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name:34s} held-out loss {r['held_out_loss']:.3f}  single: pass {100 * one['pass@1']:.1f}%, "
              f"cut at EOL {100 * eol['pass@1']:.1f}%, exact {100 * eol['exact_match']:.1f}%, "
              f"similarity {eol['edit_similarity']:.3f}, <EOT> {one['stopped_with_eot']}  "
              f"held-out: exact {100 * h['exact_match']:.1f}%, similarity {h['edit_similarity']:.3f}; as served: "
              f"single pass {100 * served['pass@1']:.1f}%, held-out exact {100 * h['served']['exact_match']:.1f}%, "
              f"similarity {h['served']['edit_similarity']:.3f}", flush=True)
