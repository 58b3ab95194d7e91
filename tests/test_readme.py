"""The README's quick-start, run exactly as written, as a new user would (also `make smoke`).

Convention (README.md follows it; keep the two in lockstep):

* a fenced block that opens with ```` ```bash ```` on the line right after the HTML comment
  line ``<!-- walkthrough -->`` is part of the walkthrough; every other block is not run;
* walkthrough blocks run in README order, each in its own ``bash -euo pipefail``, all in the
  same fresh temporary folder (files persist from block to block; shell variables and ``cd``
  do not) where ``configs`` links to the repository's configs/, with this environment:

      PATH           <repo>/.venv/bin first (as after `source .venv/bin/activate`)
      REPO           the repository root (blocks may use $REPO/configs/...)
      RISKVA_HOME    <tmp>/riskva_home
      HF_HUB_OFFLINE=1, DS_ACCELERATOR=cpu, TOKENIZERS_PARALLELISM=false
      (RISKVA_*, DAGSTER_*, MLFLOW_* from the calling shell are removed)

* any command failing fails the test, naming the block.

Every ``riskva <command>`` in ANY README code block (and ``python -m riskva_core.<module>``
/ ``accelerate launch … -m riskva_core.<module>``) must be a real command, and each
``--flag`` after it must appear in that command's ``--help``.

Provisional shape of the quick-start (the lead writes the real one)::

    ## Quick start

    <!-- walkthrough -->
    ```bash
    riskva synth --output_path data/raw --num_images 48 --image_size 128 96
    riskva validate --csv_path data/raw/metadata.csv --image_base_path data/raw
    ```

    <!-- walkthrough -->
    ```bash
    riskva prepare --csv_path data/raw/metadata.csv --image_base_path data/raw \\
      --format jsonl --output_path data/sft_jsonl
    riskva --preview data/sft_jsonl/train.jsonl
    ```

    <!-- walkthrough -->
    ```bash
    riskva tiny-model --output_dir models/base --dataset_path data/sft_jsonl
    accelerate launch --config_file "$REPO/configs/deepspeed_zero2.yaml" --num_processes 2 \\
      -m riskva_core.train --model_name_or_path models/base --dataset_path data/sft_jsonl \\
      --output_dir models/run1 --max_steps 4
    ```

    <!-- walkthrough -->
    ```bash
    riskva merge --base_model_path models/base --adapter_path models/run1/adapter --output_dir models/merged
    riskva infer --model_path models/merged --dataset_path data/sft_jsonl --split test \\
      --output_file predictions.json --compare_gt --report_dir report
    test -s report/report.md
    ```
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

from riskva_core.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
MARKER = "<!-- walkthrough -->"
MIN_BLOCKS = 4
# One block may train a tiny model on 2 CPU ranks; bounded so a hang fails instead of stalling CI.
BLOCK_TIMEOUT_S = int(os.environ.get("RISKVA_WALKTHROUGH_BLOCK_TIMEOUT", "1200"))
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_MODULE_TO_COMMAND = {module: name for name, (module, _) in COMMANDS.items()}
# The seed's launch command runs the training package itself (riskva_core/train/__main__.py).
_MODULE_TO_COMMAND["riskva_core.train"] = "train"


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    walkthrough: bool

    @property
    def title(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return f"README.md:{self.line} ({first[:70]})"


def code_blocks(text: str) -> list[Block]:
    """Every fenced code block, in order; ``walkthrough`` when the marker line precedes a bash fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        previous = lines[start - 1].strip() if start > 0 else ""
        blocks.append(Block(lang=lang, code="\n".join(body) + "\n", line=start + 1,
                            walkthrough=previous == MARKER and lang == "bash"))
        i += 1  # closing fence
    return blocks


def walkthrough_blocks(text: str) -> list[Block]:
    return [b for b in code_blocks(text) if b.walkthrough]


def _simple_commands(code: str) -> list[list[str]]:
    """Shell words of each simple command in ``code`` (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", code)
    commands: list[list[str]] = []
    for line in joined.splitlines():
        try:
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError:  # unbalanced quotes in prose-like blocks: not a command line
            continue
        current: list[str] = []
        for tok in tokens:
            if tok and set(tok) <= set(";&|()<>"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            commands.append(current)
    return commands


def riskva_invocations(code: str) -> list[tuple[str, list[str]]]:
    """(command, --flags) for each ``riskva CMD``/``-m riskva_core.MODULE`` in ``code``."""
    found: list[tuple[str, list[str]]] = []
    for words in _simple_commands(code):
        for i, word in enumerate(words):
            if Path(word).name == "riskva" and i + 1 < len(words):
                name, rest = words[i + 1], words[i + 2:]
                if name == "--preview":  # the seed's spelling of `riskva preview FILE`
                    name = "preview"
            elif word == "-m" and i + 1 < len(words) and words[i + 1].startswith("riskva_core."):
                module, rest = words[i + 1], words[i + 2:]
                name = _MODULE_TO_COMMAND.get(module, module)
            else:
                continue
            if name.startswith(("<", "$", "{", "[")) or name in ("-h", "--help"):
                continue  # a placeholder (`riskva <command> --help`) or the usage itself
            flags = []
            for tok in rest:
                if tok == "--":
                    break
                if tok.startswith("--") and len(tok) > 2:
                    flags.append(tok.split("=", 1)[0])
            found.append((name, flags))
            break
    return found


@lru_cache(maxsize=None)
def command_help(name: str) -> str:
    """``riskva NAME --help`` through the real dispatcher, in-process (one import per module)."""
    from riskva_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([name, "--help"])
        except SystemExit as exc:
            code = exc.code or 0
    assert code == 0, f"riskva {name} --help exited {code}: {err.getvalue()[-500:]}"
    return out.getvalue()


def _readme_text() -> str:
    assert README.is_file(), f"{README} is missing: the quick-start walkthrough lives there"
    return README.read_text(encoding="utf-8")


def _walkthrough_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RISKVA_", "DAGSTER_", "MLFLOW_"))}
    env.pop("VIRTUAL_ENV", None)
    env.update(
        PATH=os.pathsep.join([str(VENV_BIN), str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]),
        VIRTUAL_ENV=str(REPO / ".venv"),
        REPO=str(REPO),
        RISKVA_HOME=str(tmp / "riskva_home"),
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


# ------------------------------------------------------------------ the parser itself

SAMPLE = __doc__.split("Provisional shape of the quick-start (the lead writes the real one)::", 1)[1]
SAMPLE = "\n".join(ln[4:] if ln.startswith("    ") else ln for ln in SAMPLE.splitlines())


def test_parser_finds_only_marked_bash_blocks_in_order():
    text = SAMPLE + "\n```bash\nriskva serve --port 5001\n```\n\n<!-- walkthrough -->\n```text\nnot run\n```\n"
    blocks = walkthrough_blocks(text)
    assert len(blocks) == 4 and all(b.lang == "bash" for b in blocks)
    assert blocks[0].code.startswith("riskva synth") and "compare_gt" in blocks[3].code
    assert [b.line for b in blocks] == sorted(b.line for b in blocks)
    assert len(code_blocks(text)) == 6


def test_invocations_join_continuations_and_see_module_launches():
    code = walkthrough_blocks(SAMPLE)[2].code
    assert riskva_invocations(code) == [
        ("tiny-model", ["--output_dir", "--dataset_path"]),
        ("train", ["--model_name_or_path", "--dataset_path", "--output_dir", "--max_steps"]),
    ]
    assert riskva_invocations("riskva --preview x.jsonl && riskva <command> --help  # --not-a-flag\n") == [
        ("preview", [])]
    assert riskva_invocations("echo hi | .venv/bin/riskva infer --model_path=m --image_path a.jpg\n") == [
        ("infer", ["--model_path", "--image_path"])]


def test_sample_walkthrough_uses_only_real_commands_and_flags():
    """The provisional sample obeys the same rule as the README (so it stays a usable template)."""
    _check_commands_and_flags([b for b in code_blocks(SAMPLE)])


# ------------------------------------------------------------------ the README

def _check_commands_and_flags(blocks: list[Block]) -> int:
    problems, seen = [], 0
    for block in blocks:
        for name, flags in riskva_invocations(block.code):
            seen += 1
            if name not in COMMANDS:
                problems.append(f"{block.title}: `riskva {name}` is not a command (have: {', '.join(COMMANDS)})")
                continue
            help_text = command_help(name)
            for flag in flags:
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                    problems.append(f"{block.title}: `riskva {name} {flag}` is not in `riskva {name} --help`")
    assert not problems, "\n".join(problems)
    return seen


def test_readme_commands_and_flags_exist():
    seen = _check_commands_and_flags(code_blocks(_readme_text()))
    assert seen >= MIN_BLOCKS, f"README code blocks mention only {seen} riskva invocations"


def test_readme_has_a_walkthrough():
    blocks = walkthrough_blocks(_readme_text())
    assert len(blocks) >= MIN_BLOCKS, (
        f"README.md has {len(blocks)} walkthrough blocks; mark each quick-start ```bash block "
        f"with a `{MARKER}` line right above it (at least {MIN_BLOCKS})")


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
def test_readme_walkthrough_runs_in_order(tmp_path: Path):
    blocks = walkthrough_blocks(_readme_text())
    assert len(blocks) >= MIN_BLOCKS
    env = _walkthrough_env(tmp_path)
    work = tmp_path / "walkthrough"
    work.mkdir()
    # As in a checkout: `configs/...` resolves (the README may also write "$REPO/configs/...").
    (work / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    for index, block in enumerate(blocks, 1):
        log = logs / f"block{index:02d}.log"
        start = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", block.code], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | str = proc.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = f"timed out after {BLOCK_TIMEOUT_S}s"
            finally:
                # Whatever the block started in the background (a server, a stuck rank) ends with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        output = log.read_text(encoding="utf-8", errors="replace")
        elapsed = time.monotonic() - start
        assert rc == 0, (f"walkthrough block {index}/{len(blocks)} at {block.title} failed "
                         f"({rc}, {elapsed:.0f}s):\n--- block ---\n{block.code}--- output (tail) ---\n"
                         f"{output[-4000:]}")
        print(f"block {index}: {block.title} ok in {elapsed:.0f}s")
