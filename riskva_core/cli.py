"""``riskva`` console script: a thin dispatcher over each step's own ``main(argv)``.

Subcommand modules are imported lazily so that ``riskva validate`` does not pay
for importing torch, and each step keeps its argparse next to its entry function.
Input errors (``RiskvaError``) print one line to stderr and exit with their code.
"""
from __future__ import annotations

import importlib
import sys

from riskva_core.errors import RiskvaError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("riskva_core.synth.generate", "Generate the synthetic construction-defect dataset"),
    "validate": ("riskva_core.data.validate", "Validate a raw CSV and its images (pandera)"),
    "prepare": ("riskva_core.data.prepare", "Validate, split and write JSONL or Parquet SFT data"),
    "preview": ("riskva_core.data.preview", "Summarise a prepared JSONL/Parquet file"),
    "tiny-model": ("riskva_core.model.tiny", "Build a tiny random-weight Qwen2.5-VL model folder"),
    "train": ("riskva_core.train.sft", "LoRA SFT (single process; use accelerate launch for DeepSpeed)"),
    "merge": ("riskva_core.model.merge", "Merge a LoRA adapter into its base model, verified"),
    "infer": ("riskva_core.evaluate.infer", "Run the model on an image, a list, a Parquet/JSONL file"),
    "evaluate": ("riskva_core.evaluate.report", "Score predictions against ground truth; write a report"),
    "register": ("riskva_core.registry.register", "Register a merged model folder in MLflow (alias challenger)"),
    "serve": ("riskva_core.registry.serve", "Serve the MLflow champion model over HTTP"),
}


def _usage() -> str:
    lines = ["usage: riskva <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'riskva <command> --help' for the command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    # The seed's spelling: `--preview FILE` as a top-level flag.
    if name == "--preview":
        name = "preview"
    if name not in COMMANDS:
        print(f"riskva: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except RiskvaError as exc:
        print(f"riskva {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"riskva {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
